"""The request stages of a chat turn, before it is routed: the conversation's commands
read from its history (core/commands.py; the last message's answered by llproxy itself),
and a loop of identical tool calls noted or broken (core/toolloop.py). What comes out is
the payload the model sees, the conversation's settings and model, or llproxy's own answer
as a Reply in the internal form, so every dialect's translation and accounting apply.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import field
from typing import Any

import orjson

from .answer import as_stream
from .call import JSON, JsonPayload, Payload, Reply
from .commands import Commands, History, read
from .keys import ApiKey
from .record import RequestRecord
from .toolloop import check, with_note
from .values import request_value

CHAT = "chat/completions"
_EVENT_STREAM = "text/event-stream"


@request_value
class Turn:
    payload: Payload  # what goes to the model
    settings: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None  # the conversation's own choice (`!/model`), over the request's
    answer: str | None = None  # llproxy answers this text itself; nothing goes upstream


class TurnStages:
    """The stages as one process runs them: commands (unless off) and tool loops."""

    def __init__(self, commands: Commands | None, loop_mode: str, loop_repeats: int) -> None:
        self.commands = commands  # None: commands are off
        self.loop_mode = loop_mode
        self.loop_repeats = loop_repeats

    def seen(self, chat: Mapping[str, Any], key: ApiKey | None) -> Mapping[str, Any]:
        """A chat body as its model would see it: without the commands and llproxy's
        answers (what a token count counts; the same body when there are none)."""
        messages = chat.get("messages")
        commands = self.commands
        if not isinstance(messages, list) or commands is None or not commands.enabled_for(key):
            return chat
        history = read(messages, commands.prefix)
        return {**chat, "messages": history.messages} if history.changed else chat

    async def read(self, target: str, payload: Payload, record: RequestRecord) -> Turn:
        """The turn as the model (or llproxy) answers it. A request that is no chat, or
        a chat with nothing for llproxy in it, goes on as it came (the same payload)."""
        if target != CHAT or not isinstance(payload, JsonPayload):
            return Turn(payload)
        messages = payload.body.get("messages")
        if not isinstance(messages, list):
            return Turn(payload)
        commands = self.commands
        if commands is not None and not commands.enabled_for(record.key):
            commands = None
        history = read(messages, commands.prefix) if commands is not None else History(messages)
        model = None
        if commands is not None:
            model = commands.model(history, record.key)
            if history.command is not None:
                record.stage = "command"
                asked = model or payload.model
                text = await commands.answer(history, record.key, record.client, asked)
                return Turn(payload, history.settings, model, text)
        kept = history.messages
        verdict = check(kept, history.settings.get("tool-loops", self.loop_mode), self.loop_repeats)
        if verdict is not None:
            record.stage = f"tool_loop_{verdict.action}"
            if verdict.action == "break":
                return Turn(payload, history.settings, model, verdict.text)
            kept = with_note(kept, verdict.text)
        if kept is not messages:
            # The client's own request (Native) is no longer what is sent: a cloud
            # back-end of its dialect gets the call translated instead.
            payload = JsonPayload({**payload.body, "messages": kept})
        return Turn(payload, history.settings, model)


def local_reply(text: str, model: str, stream: bool) -> Reply:
    """llproxy's own answer as a model's would be, whole or as a stream that has ended."""
    document = {
        "id": f"chatcmpl-llproxy-{secrets.token_hex(8)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    reply = Reply(200, JSON.decode(), orjson.dumps(document), document=document)
    if stream:
        return Reply(200, _EVENT_STREAM, as_stream(reply, CHAT), _Ended())
    return reply


class _Ended:
    """A stream whose every chunk came with its first."""

    ended = True

    async def next(self) -> bytes:
        return b""

    def close(self) -> None:
        """Nothing to stop."""

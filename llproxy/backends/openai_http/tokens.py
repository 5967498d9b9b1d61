"""Token counts by a model's own server, of the prompt the model will see: llama.cpp renders
its chat template (`POST /apply-template`) and tokenizes that text (`POST /tokenize`);
vLLM's `/tokenize` takes the messages and renders them itself. Both routes are at the
server's root. A server that does neither is not asked again for a while."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from ...core.deadlines import Watchdog
from ...core.registry import Replica, Upstream
from ...core.sse import json_document
from .transport import ConnectFailed, UpstreamBroken, UpstreamPool

TOKENIZE_TIMEOUT = 2.0  # for all of one count
TOKENIZER_RETRY = 300.0
MAX_ANSWER = 1024 * 1024  # a token list of a long prompt, as JSON


class TokenCounter:
    """Counts through one worker's pools; remembers which way each server counts."""

    def __init__(self, pool: UpstreamPool, watchdog: Watchdog) -> None:
        self.pool = pool
        self.watchdog = watchdog
        self._way: dict[Upstream, str] = {}  # "template" or "messages": what worked there
        self._none_until: dict[Upstream, float] = {}

    async def count(self, replica: Replica, chat: Mapping[str, Any]) -> int | None:
        """The tokens of a chat's prompt (messages and tools, templated), counted by the
        replica's server; None when it cannot count them or does not answer in time."""
        upstream = replica.upstream
        if self._none_until.get(upstream, 0.0) > time.monotonic():
            return None
        prompt = {key: chat[key] for key in ("messages", "tools") if chat.get(key)}
        learned = self._way.get(upstream, "template")
        ways = [learned, *({"template", "messages"} - {learned})]
        try:
            with self.watchdog.deadline(TOKENIZE_TIMEOUT):
                for way in ways:
                    if way == "template":
                        counted = await self._templated(upstream, prompt)
                    else:
                        counted = await self._tokenized(replica, prompt)
                    if counted:
                        self._way[upstream] = way
                        return counted
        except TimeoutError:
            pass
        self._way.pop(upstream, None)
        self._none_until[upstream] = time.monotonic() + TOKENIZER_RETRY
        return None

    async def _templated(self, upstream: Upstream, prompt: Mapping[str, Any]) -> int | None:
        """llama.cpp: the template rendered, then that text tokenized as its completion
        route does (special tokens such as `<|im_start|>` parsed as the tokens they are,
        BOS added where the model wants one): the count it bills."""
        rendered = await self.post(upstream, "apply-template", prompt)
        text = rendered.get("prompt") if isinstance(rendered, dict) else None
        if not isinstance(text, str):
            return None
        body = {"content": text, "add_special": True}
        return _length(await self.post(upstream, "tokenize", body))

    async def _tokenized(self, replica: Replica, prompt: Mapping[str, Any]) -> int | None:
        """vLLM: the messages tokenized with the model's template (a llama.cpp server reads
        only `content` here, and answers no tokens)."""
        body = {"model": replica.upstream_id, **prompt}
        return _length(await self.post(replica.upstream, "tokenize", body))

    async def post(
        self, upstream: Upstream, path: str, body: Mapping[str, Any], from_root: bool = True
    ) -> Any:
        """The JSON a 200 answer to a small POST carries, else None."""
        try:
            payload = orjson.dumps(body)
        except orjson.JSONEncodeError:  # nested past orjson's depth: not for the server
            return None
        try:
            response = await self.pool.post(upstream, path, payload, from_root=from_root)
            try:
                raw = await response.read(MAX_ANSWER)
            finally:  # the connection back to its pool only when read to its end
                response.release() if response.at_eof() else response.close()
        except (ConnectFailed, UpstreamBroken):
            return None
        return json_document(raw) if response.status == 200 else None


def _length(answer: Any) -> int | None:
    """vLLM's `count`, else the length of `tokens` (llama.cpp)."""
    if not isinstance(answer, dict):
        return None
    count = answer.get("count")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    tokens = answer.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None

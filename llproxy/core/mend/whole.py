"""A whole answer mended: each choice's message through the stages at once. An answer
whose text holds a closing `</think>` and no opening one had its block opened by the
chat template: what comes before the tag is reasoning."""

from __future__ import annotations

from typing import Any

from ..record import RequestRecord
from .pipeline import REASONING, Mender
from .plan import Plan
from .thinking import CLOSE, OPEN
from .toolcalls import ToolCall


def closes_only(text: str) -> bool:
    at = text.find(CLOSE)
    return at >= 0 and OPEN not in text[:at]


def mend_document(document: dict[str, Any], plan: Plan, record: RequestRecord) -> bool:
    """Mend the messages of a checked chat answer in place; True when one changed."""
    changed = False
    for choice in document.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            changed = _message(choice, message, plan, record) or changed
    return changed


def _message(
    choice: dict[str, Any], message: dict[str, Any], plan: Plan, record: RequestRecord
) -> bool:
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    return not _untouched(message, text, plan) and _mended(choice, message, text, plan, record)


def _mended(
    choice: dict[str, Any], message: dict[str, Any], text: str, plan: Plan, record: RequestRecord
) -> bool:
    """The message through the stages; True when it changed."""
    mender = Mender(plan, record, plan.think_open or (plan.thinking and closes_only(text)))
    items = (mender.content(text) if text else []) + mender.finish()
    texts: dict[str, list[str]] = {}
    calls: list[ToolCall] = []
    for item in items:
        if isinstance(item, ToolCall):
            calls.append(item)
        else:
            texts.setdefault(item[0], []).append(item[1])
    new_content = "".join(texts.get("content", ()))
    thought = "".join(texts.get("reasoning_content", ()))
    hidden = not mender.show and any(message.get(name) for name in REASONING)
    if new_content == text and not thought and not calls and not hidden:
        return False
    message["content"] = new_content if new_content or not calls else None
    if not mender.show:
        for name in REASONING:
            message.pop(name, None)
    elif thought:
        earlier = message.get("reasoning_content")
        message["reasoning_content"] = (earlier if isinstance(earlier, str) else "") + thought
    if calls:
        earlier_calls = message.get("tool_calls")
        made = [call.as_message_call() for call in calls]
        message["tool_calls"] = (earlier_calls if isinstance(earlier_calls, list) else []) + made
        if choice.get("finish_reason") != "length":
            choice["finish_reason"] = "tool_calls"
    return True


def _untouched(message: dict[str, Any], text: str, plan: Plan) -> bool:
    """Whether no stage could change this message, told without running them (most
    answers): no `<` that could open or close a thinking block or a call, no `[` or
    backtick that could open a call when tools are offered, no block opened by the chat
    template, and no reasoning to take away from a client that asked for none."""
    if plan.think_open or "<" in text:
        return False
    if plan.tools and ("[" in text or "`" in text):
        return False
    return plan.show_thinking or not plan.thinking or not any(message.get(n) for n in REASONING)

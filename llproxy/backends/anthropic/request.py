"""An OpenAI chat-completions body as an Anthropic Messages request.

System messages (wherever they stand) become `system`; tool results become `tool_result`
blocks of the user turn that follows the assistant's calls; consecutive turns of one role
are merged, since the Messages API wants user and assistant to alternate. Fields Anthropic
has no equal for are left out.
"""

from __future__ import annotations

from typing import Any

import orjson

from ...core.errors import InvalidRequest
from ...core.sse import json_document
from ..translated import append_turn, chat_messages, content_text, object_of

# Anthropic requires max_tokens; every Claude model allows at least this many.
DEFAULT_MAX_TOKENS = 4096
# OpenAI's reasoning efforts as thinking budgets (Anthropic's least is 1024).
_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384}
MIN_BUDGET = 1024


def to_messages(chat: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The Messages request for a chat body, addressed to `model_id`."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in chat_messages(chat):
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(content_text(message.get("content")))
            continue
        if role == "tool":
            append_turn(turns, "user", "content", [_tool_result(message)])
        elif role == "user":
            append_turn(turns, "user", "content", _user_blocks(message.get("content")))
        elif role == "assistant":
            append_turn(turns, "assistant", "content", _assistant_blocks(message))
        else:
            raise InvalidRequest(f"messages[{i}].role: unknown role {role!r}", param="messages")
    body: dict[str, Any] = {"model": model_id, "messages": turns, "max_tokens": _max_tokens(chat)}
    if any(system):
        body["system"] = "\n\n".join(text for text in system if text)
    _sampling(chat, body)
    _tools(chat, body)
    if chat.get("stream") is True:
        body["stream"] = True
    user = chat.get("user")
    if isinstance(user, str) and user:
        body["metadata"] = {"user_id": user}
    return body


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url" and (image := _image(part.get("image_url"))):
            blocks.append(image)
    return blocks


def _image(image_url: Any) -> dict[str, Any] | None:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        return None
    if url.startswith("data:") and ";base64," in url:
        media_type, _, data = url[5:].partition(";base64,")
        source = {"type": "base64", "media_type": media_type, "data": data}
        return {"type": "image", "source": source}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    # Earlier thinking is not sent back: Anthropic takes it only with the signature it
    # made, which an OpenAI-shaped history does not carry.
    text = content_text(message.get("content"))
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = object_of(call.get("function"))
        arguments = function.get("arguments")
        parsed = json_document(arguments.encode()) if isinstance(arguments, str) else arguments
        blocks.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or ""),
                "name": str(function.get("name") or ""),
                "input": parsed if isinstance(parsed, dict) else {},
            }
        )
    return blocks


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    result: Any = content if isinstance(content, str) else _user_blocks(content)
    if not isinstance(result, str) and not result:
        result = orjson.dumps(content).decode() if content is not None else ""
    return {
        "type": "tool_result",
        "tool_use_id": str(message.get("tool_call_id") or ""),
        "content": result,
    }


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _max_tokens(chat: dict[str, Any]) -> int:
    return (
        _positive_int(chat.get("max_completion_tokens"))
        or _positive_int(chat.get("max_tokens"))
        or DEFAULT_MAX_TOKENS
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sampling(chat: dict[str, Any], body: dict[str, Any]) -> None:
    effort = chat.get("reasoning_effort")
    budget = min(_BUDGETS.get(effort, 0) if isinstance(effort, str) else 0, body["max_tokens"] - 1)
    if budget >= MIN_BUDGET:
        # With thinking on, Anthropic takes neither a temperature nor top_k.
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    else:
        if _number(chat.get("temperature")):
            body["temperature"] = min(float(chat["temperature"]), 1.0)  # OpenAI's go to 2
        if _positive_int(chat.get("top_k")):
            body["top_k"] = chat["top_k"]
    if _number(chat.get("top_p")):
        body["top_p"] = chat["top_p"]
    stop = chat.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if stops := [s for s in stops if isinstance(s, str) and s]:
        body["stop_sequences"] = stops


def _tools(chat: dict[str, Any], body: dict[str, Any]) -> None:
    tools = []
    for tool in chat.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        schema = function.get("parameters")
        entry = {
            "name": function["name"],
            "input_schema": schema if isinstance(schema, dict) else {"type": "object"},
        }
        if isinstance(function.get("description"), str):
            entry["description"] = function["description"]
        tools.append(entry)
    if tools:
        body["tools"] = tools
    choice = chat.get("tool_choice")
    chosen: dict[str, Any] | None = None
    if choice in ("auto", "none"):
        chosen = {"type": choice}
    elif choice == "required":
        chosen = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        chosen = {"type": "tool", "name": str(choice["function"].get("name") or "")}
    if chat.get("parallel_tool_calls") is False and tools:
        chosen = {**(chosen or {"type": "auto"}), "disable_parallel_tool_use": True}
    if chosen is not None and tools:
        body["tool_choice"] = chosen

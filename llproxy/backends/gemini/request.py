"""An OpenAI chat-completions body as a Gemini `generateContent` request.

System messages become `systemInstruction`; the assistant is `model`; tool calls become
`functionCall` parts and tool results `functionResponse` parts, which Gemini pairs with
the calls by name and order (it has no ids): each result is named after the call its
`tool_call_id` answers. Consecutive turns of one role are merged.
"""

from __future__ import annotations

from typing import Any

from ...core.errors import InvalidRequest
from ...core.sse import json_document
from ..translated import append_turn, chat_messages, content_text, object_of
from .reply import SIGNATURE_MARK

# OpenAI's reasoning efforts as thinking budgets.
_BUDGETS = {"minimal": 512, "low": 2048, "medium": 8192, "high": 24576}


def to_gemini(chat: dict[str, Any]) -> dict[str, Any]:
    names: dict[str, str] = {}  # tool call id → the function it called
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for i, message in chat_messages(chat):
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(content_text(message.get("content")))
        elif role == "user":
            append_turn(contents, "user", "parts", _user_parts(message.get("content")))
        elif role == "assistant":
            append_turn(contents, "model", "parts", _model_parts(message, names))
        elif role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            name = names.get(call_id) or str(message.get("name") or "")
            response = {"name": name, "response": _result(message.get("content"))}
            append_turn(contents, "user", "parts", [{"functionResponse": response}])
        else:
            raise InvalidRequest(f"messages[{i}].role: unknown role {role!r}", param="messages")
    body: dict[str, Any] = {"contents": contents}
    if text := "\n\n".join(part for part in system if part):
        body["systemInstruction"] = {"parts": [{"text": text}]}
    _tools(chat, body)
    if config := _generation(chat):
        body["generationConfig"] = config
    return body


def _user_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
                mime, _, data = url[5:].partition(";base64,")
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            elif isinstance(url, str):
                parts.append({"fileData": {"fileUri": url}})
    return parts


def _model_parts(message: dict[str, Any], names: dict[str, str]) -> list[dict[str, Any]]:
    text = content_text(message.get("content"))
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = object_of(call.get("function"))
        name = str(function.get("name") or "")
        call_id = str(call.get("id") or "")
        names[call_id] = name
        arguments = function.get("arguments")
        parsed = json_document(arguments.encode()) if isinstance(arguments, str) else arguments
        part: dict[str, Any] = {"functionCall": {"name": name, "args": object_of(parsed)}}
        _, mark, signature = call_id.partition(SIGNATURE_MARK)
        if mark and signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def _result(content: Any) -> dict[str, Any]:
    """A tool's result as the object Gemini takes: a JSON object as it is, anything else
    under `result`."""
    text = content_text(content)
    parsed = json_document(text.encode()) if text.startswith("{") else None
    return parsed if isinstance(parsed, dict) else {"result": text}


def _tools(chat: dict[str, Any], body: dict[str, Any]) -> None:
    declarations = []
    for tool in chat.get("tools") or ():
        function = object_of(tool).get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        declaration: dict[str, Any] = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            declaration["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            # JSON Schema as it is (Gemini's `parameters` takes only an OpenAPI subset).
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    if not declarations:
        return
    body["tools"] = [{"functionDeclarations": declarations}]
    choice = chat.get("tool_choice")
    config: dict[str, Any] | None = None
    if choice == "auto":
        config = {"mode": "AUTO"}
    elif choice == "none":
        config = {"mode": "NONE"}
    elif choice == "required":
        config = {"mode": "ANY"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        config = {"mode": "ANY", "allowedFunctionNames": [str(choice["function"].get("name"))]}
    if config is not None:
        body["toolConfig"] = {"functionCallingConfig": config}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _generation(chat: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP")):
        if _number(chat.get(ours)):
            config[theirs] = chat[ours]
    if top_k := _positive_int(chat.get("top_k")):
        config["topK"] = top_k
    most = _positive_int(chat.get("max_completion_tokens")) or _positive_int(chat.get("max_tokens"))
    if most:
        config["maxOutputTokens"] = most
    stop = chat.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if stops := [s for s in stops if isinstance(s, str) and s]:
        config["stopSequences"] = stops
    response_format = object_of(chat.get("response_format"))
    if response_format.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif response_format.get("type") == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = object_of(response_format.get("json_schema")).get("schema")
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    effort = chat.get("reasoning_effort")
    if isinstance(effort, str) and effort in _BUDGETS:
        config["thinkingConfig"] = {"thinkingBudget": _BUDGETS[effort], "includeThoughts": True}
    return config

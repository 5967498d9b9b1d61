"""The shape of what an OpenAI-compatible server answers, as far as llproxy reads it.

An upstream is untrusted (discovery takes whatever listens on a scanned port), and every
dialect reads the same members of its answers: a chat completion's `choices`, `message`,
`content`, `tool_calls`, `usage`; a chunk's `delta`. These checks say what is wrong with
one, in words for the client, so a malformed answer is an error and not an empty success
or a crash inside a translator. Members llproxy does not read are not checked.
"""

from __future__ import annotations

from typing import Any

# The routes whose answers llproxy reads, and the member of a choice that carries the
# answer there: a message (chat) or a text (legacy completions).
CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
READ_ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS)

_TEXTS = frozenset(("content", "reasoning_content", "reasoning", "refusal"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(value: Any, kind: type | tuple[type, ...]) -> bool:
    return value is None or isinstance(value, kind)


def usage_problem(usage: Any) -> str | None:
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return "usage is not an object"
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if value is not None and not (_is_int(value) and value >= 0):
            return f"usage.{name} is not a count"
    details = usage.get("prompt_tokens_details")
    if details is not None:
        if not isinstance(details, dict):
            return "usage.prompt_tokens_details is not an object"
        cached = details.get("cached_tokens")
        if cached is not None and not (_is_int(cached) and cached >= 0):
            return "usage.prompt_tokens_details.cached_tokens is not a count"
    return None


def _tool_calls_problem(calls: Any, where: str, streamed: bool) -> str | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        return f"{where}.tool_calls is not a list"
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict):
            return f"{at} is not an object"
        if not _optional(call.get("id"), str):
            return f"{at}.id is not a string"
        if streamed and not _optional(call.get("index"), int):
            return f"{at}.index is not an integer"
        function = call.get("function")
        if function is None and streamed:
            continue  # a fragment may carry only its id
        if not isinstance(function, dict):
            return f"{at}.function is not an object"
        if not _optional(function.get("name"), str):
            return f"{at}.function.name is not a string"
        # Some servers (Ollama's own API style) give arguments as an object.
        if not _optional(function.get("arguments"), (str, dict)):
            return f"{at}.function.arguments is not a string or an object"
    return None


def _message_problem(message: Any, where: str, streamed: bool) -> str | None:
    if not isinstance(message, dict):
        return f"{where} is not an object"
    # The members present, not every one read: a chunk's delta has one or two.
    for name, value in message.items():
        if name in _TEXTS:
            if value is not None and type(value) is not str:
                return f"{where}.{name} is not a string"
        elif name == "tool_calls" and (problem := _tool_calls_problem(value, where, streamed)):
            return problem
    return None


def _choice_problem(choice: Any, where: str, route: str, streamed: bool) -> str | None:
    if not isinstance(choice, dict):
        return f"{where} is not an object"
    if not _optional(choice.get("index"), int) or isinstance(choice.get("index"), bool):
        return f"{where}.index is not an integer"
    if not _optional(choice.get("finish_reason"), str):
        return f"{where}.finish_reason is not a string"
    if streamed:
        # One check for chat and completions chunks: a chunk says which it is.
        if "text" in choice:
            return None if _optional(choice["text"], str) else f"{where}.text is not a string"
        if choice.get("delta") is None:
            return None  # a chunk that only finishes
        return _message_problem(choice["delta"], f"{where}.delta", streamed)
    if route == COMPLETIONS:
        return None if isinstance(choice.get("text"), str) else f"{where}.text is not a string"
    return _message_problem(choice.get("message"), f"{where}.message", streamed)


def answer_problem(document: Any, route: str) -> str | None:
    """What is wrong with a whole answer to `route` (one of READ_ROUTES); None if nothing."""
    if not isinstance(document, dict):
        return "the answer is not a JSON object"
    if route == EMBEDDINGS:
        data = document.get("data")
        if not isinstance(data, list):
            return "data is not a list"
        for i, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("embedding"), list | str):
                return f"data[{i}].embedding is missing"
        return usage_problem(document.get("usage"))
    choices = document.get("choices")
    if not isinstance(choices, list) or not choices:
        return "choices is not a non-empty list"
    for i, choice in enumerate(choices):
        if problem := _choice_problem(choice, f"choices[{i}]", route, streamed=False):
            return problem
    return usage_problem(document.get("usage"))


def chunk_problem(document: dict[str, Any]) -> str | None:
    """What is wrong with one decoded chunk of a chat or completions stream."""
    choices = document.get("choices")
    if choices is not None:
        if type(choices) is not list:
            return "choices is not a list"
        for i, choice in enumerate(choices):
            if (
                type(choice) is dict
                and type(delta := choice.get("delta")) is dict
                and len(delta) == 1
                and type(delta.get("content")) is str
                and choice.get("finish_reason") is None
                and type(choice.get("index", 0)) is int
            ):
                continue  # most chunks of an answer only add text: checked at once
            if problem := _choice_problem(choice, f"choices[{i}]", CHAT, streamed=True):
                return problem
    usage = document.get("usage")
    return None if usage is None else usage_problem(usage)

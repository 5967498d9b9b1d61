"""Checks on a client's request body before anything is sent upstream.

Only what an upstream would reject anyway, or what would make llproxy misroute, is
checked; every other field passes through untouched.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidRequest


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_common(body: dict[str, Any]) -> None:
    if "model" in body and not (isinstance(body["model"], str) and body["model"]):
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        raise InvalidRequest("'temperature' must be a number between 0 and 2", param="temperature")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and not _is_positive_int(value):
            raise InvalidRequest(f"'{name}' must be a positive integer", param=name)


def validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(
                f"'messages[{i}].role' must be a non-empty string", param=f"messages[{i}].role"
            )


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in value
    )


def validate_completion(body: dict[str, Any]) -> None:
    if "prompt" not in body or body["prompt"] is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    # A string, a list of strings, a list of token ids, or a list of such lists.
    if not (
        isinstance(prompt, str)
        or _is_token_list(prompt)
        or (
            isinstance(prompt, list)
            and all(isinstance(item, str) or _is_token_list(item) for item in prompt)
        )
    ):
        raise InvalidRequest(
            "'prompt' must be a string, a list of strings, or a list of token ids (or of "
            "such lists)",
            param="prompt",
        )


PATH_VALIDATORS = {
    "chat/completions": validate_chat,
    "completions": validate_completion,
}


def validate(path: str, body: dict[str, Any]) -> None:
    """Raise InvalidRequest (with param) for a body that must not go upstream."""
    validate_common(body)
    specific = PATH_VALIDATORS.get(path)
    if specific is not None:
        specific(body)

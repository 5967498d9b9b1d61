"""What a client asked to forward, and how each replica gets it: a JSON body, or a form
upload (audio, images). Only `model` changes on the way; the rest is kept as sent."""

from __future__ import annotations

from typing import Any

import orjson

from ..backends.openai_http.transport import JSON
from ..dialects.openai import validate
from .errors import InvalidRequest
from .multipart import FormBody


class JsonPayload:
    content_type = JSON

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    @classmethod
    def parse(cls, raw: bytes, path: str) -> JsonPayload:
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        validate(path, body)
        return cls(body)

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    def encode(self, upstream_id: str) -> bytes:
        return orjson.dumps({**self.body, "model": upstream_id})


class FormPayload:
    stream = False  # a form's answer is relayed as it comes, stream or not

    def __init__(self, form: FormBody, content_type: str, model: str | None) -> None:
        self.form = form
        self.content_type = content_type.encode("latin-1")
        self.model = model

    @classmethod
    def parse(cls, raw: bytes, content_type: str) -> FormPayload:
        form = FormBody(raw, content_type)
        model = form.field("model")
        if model is not None and not model:
            raise InvalidRequest("'model' must be a non-empty string", param="model")
        return cls(form, content_type, model)

    def encode(self, upstream_id: str) -> bytes:
        return self.form.with_field("model", upstream_id)


Payload = JsonPayload | FormPayload

"""multipart/form-data request bodies (audio and image uploads): read and replace the one
text field llproxy routes by, `model`, and leave every other part byte for byte."""

from __future__ import annotations

import re

from .errors import InvalidRequest

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_FIELD_NAME = re.compile(
    rb'content-disposition:[ \t]*form-data;[^\r\n]*?\bname="([^"\r\n]*)"', re.IGNORECASE
)


class FormBody:
    """A form split at its boundary: the parts between the first and the closing one."""

    def __init__(self, raw: bytes, content_type: str) -> None:
        match = _BOUNDARY.search(content_type)
        if match is None:
            raise InvalidRequest("multipart body without a valid boundary in Content-Type")
        self.delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
        pieces = raw.split(self.delimiter)
        if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
            raise InvalidRequest("malformed multipart body: no closing boundary")
        self.preamble, self.parts, self.epilogue = pieces[0], pieces[1:-1], pieces[-1]
        for part in self.parts:
            if not part.startswith(b"\r\n") or not part.endswith(b"\r\n"):
                raise InvalidRequest("malformed multipart body: a part is not framed by CRLF")

    def _index(self, name: str) -> int | None:
        wanted = name.encode()
        for i, part in enumerate(self.parts):
            head, sep, _ = part.partition(b"\r\n\r\n")
            found = _FIELD_NAME.search(head)
            if sep and found is not None and found.group(1) == wanted:
                return i
        return None

    def field(self, name: str) -> str | None:
        """A text field's value; None when the form has no such field."""
        index = self._index(name)
        if index is None:
            return None
        value = self.parts[index].partition(b"\r\n\r\n")[2][:-2]
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"form field '{name}' is not UTF-8 text", param=name) from None

    def with_field(self, name: str, value: str) -> bytes:
        """The whole body with the field set to `value` (added when missing)."""
        part = (
            f'\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
        parts = list(self.parts)
        index = self._index(name)
        if index is None:
            parts.append(part)
        else:
            parts[index] = part
        return self.delimiter.join([self.preamble, *parts, self.epilogue])

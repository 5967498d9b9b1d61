"""The log layer masks credentials in every line it writes, exceptions included."""

from __future__ import annotations

import io
import logging

import pytest

from llproxy.ui.logs import setup_logging

SECRETS = {
    "Authorization: Bearer llp-abcdefghijklmnop": "llp-abcdefghijklmnop",
    "b'Bearer sk-xyz\\x01'": "sk-xyz",
    "x-api-key: sk-123456": "sk-123456",
    "{'apikey': 'abc123'}": "abc123",
    'api_key="zzz-9"': "zzz-9",
    "redis://:up-secret-1@h:6379": "up-secret-1",
    "a bare llp-AAAAAAAAAAAAAAAA key": "llp-AAAAAAAAAAAAAAAA",
    "configured upstream key up-secret-1 in a message": "up-secret-1",
}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_credentials_are_masked_in_messages_and_tracebacks(log_format: str) -> None:
    out = io.StringIO()
    setup_logging(2, log_format, stream=out, secrets=("up-secret-1",))
    log = logging.getLogger("llproxy.test")
    for text in SECRETS:
        log.warning("seen: %s", text)
        try:
            raise ValueError(f"parser choked on {text}")
        except ValueError:
            log.exception("failed")
    written = out.getvalue()
    assert written.count("***") >= 2 * len(SECRETS)
    for secret in SECRETS.values():
        assert secret not in written
    # What is not a secret stays readable.
    assert "parser choked on" in written and "redis://" in written

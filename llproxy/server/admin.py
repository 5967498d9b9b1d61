"""The admin REST API under /admin/: keys and usage, only when `admin_key` is configured.

The admin key is compared in constant time. Key changes go to the same store as the
`llproxy keys` command (this host's SQLite, or with database_url the fleet's PostgreSQL),
so every worker sees them within seconds (this one at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from ..config import Config, ConfigError, rate_limit_value
from ..core.errors import InvalidRequest, ProxyError, ServiceUnavailable
from ..core.keys import KeyFieldError, key_hash, key_rows
from ..gateway.credentials import matches, presented_secret
from ..stores import create_key, database_errors, list_keys, revoke_key, usage_totals
from ..stores.sqlite import GROUPINGS
from .body import read_json_object


class AdminUnauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_admin_key"


class KeyNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "key_not_found"


def _unreachable(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"the key and usage database cannot be reached: {exc}")


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, content_type="application/json")


class AdminApi:
    def __init__(self, config: Config, keys_changed: Callable[[], None]) -> None:
        assert config.admin_key is not None
        self.config = config
        self._admin_hash = key_hash(config.admin_key)
        self._unreachable = database_errors(config)
        # This process applies its own change at once; the others at their next reload.
        self._keys_changed = keys_changed

    def _authorize(self, request: web.Request) -> None:
        if not matches(presented_secret(request.headers, x_api_key=False), self._admin_hash):
            raise AdminUnauthorized(
                "a valid admin key is required: 'Authorization: Bearer <admin_key>'"
            )

    async def list_keys(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            return _json({"object": "list", "data": key_rows(await list_keys(self.config))})
        except self._unreachable as exc:
            raise _unreachable(exc) from None

    async def create_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await read_json_object(request, self.config)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("'name' must be a non-empty string", param="name")
        models = body.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise InvalidRequest("'models' must be a list of model globs", param="models")
        expires = body.get("expires")
        if expires is not None and (
            not isinstance(expires, int | float)
            or isinstance(expires, bool)
            or not math.isfinite(expires)
        ):
            raise InvalidRequest("'expires' must be a Unix time in seconds", param="expires")
        try:
            rate_limit = rate_limit_value("rate_limit", body.get("rate_limit"))
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="rate_limit") from None
        operator = body.get("operator", False)
        if not isinstance(operator, bool):
            raise InvalidRequest("'operator' must be true or false", param="operator")
        try:
            secret = await create_key(self.config, name, models, expires, rate_limit, operator)
        except self._unreachable as exc:
            raise _unreachable(exc) from None
        except KeyFieldError as exc:
            raise InvalidRequest(str(exc), param=exc.field) from None
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="name", code="key_exists") from None
        self._keys_changed()
        return _json({"name": name, "key": secret}, status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = request.match_info["name"]
        try:
            revoked = await revoke_key(self.config, name)
        except self._unreachable as exc:
            raise _unreachable(exc) from None
        if not revoked:
            raise KeyNotFound(f"no active key named '{name}'")
        self._keys_changed()
        return _json({"name": name, "revoked": True})

    async def usage(self, request: web.Request) -> web.Response:
        self._authorize(request)
        by = request.query.get("by", "key")
        if by not in GROUPINGS:
            raise InvalidRequest(f"'by' must be one of {', '.join(GROUPINGS)}", param="by")
        try:
            since = float(request.query["since"]) if "since" in request.query else None
        except ValueError:
            raise InvalidRequest("'since' must be a Unix time in seconds", param="since") from None
        try:
            rows = await usage_totals(self.config, since, by)
        except self._unreachable as exc:
            raise _unreachable(exc) from None
        return _json({"object": "list", "data": rows})

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Any]]]:
        return [
            ("GET", "/admin/keys", self.list_keys),
            ("POST", "/admin/keys", self.create_key),
            ("DELETE", "/admin/keys/{name}", self.revoke_key),
            ("GET", "/admin/usage", self.usage),
        ]

"""The admin REST API under /admin/: keys and usage, only when `admin_key` is configured.

The admin key is compared in constant time (digests of equal length, so not even the
length of the configured key leaks). Key changes go to the same SQLite database as the
`llproxy keys` command, so every worker sees them within seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from ..config import Config, ConfigError, rate_limit_value
from ..core.errors import InvalidRequest, ProxyError, json_response
from ..core.keys import KeyFieldError, KeyStore, key_hash, share_revocation
from ..core.usage import GROUPINGS, usage_sums
from ..stores.sqlite import state_dir
from ..ui.keys_view import key_rows


class AdminUnauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_admin_key"


class KeyNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "key_not_found"


def _json(document: Any, status: int = 200) -> web.Response:
    return json_response(orjson.dumps(document), status)


class AdminApi:
    def __init__(self, config: Config, keys_changed: Callable[[], None]) -> None:
        assert config.admin_key is not None
        self._admin_hash = key_hash(config.admin_key)
        self.directory = state_dir(config.state_dir)
        # This process applies its own change at once; the others at their next reload.
        self._keys_changed = keys_changed
        self.redis_url = config.redis_url

    def _authorize(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(key_hash(given), self._admin_hash):
            raise AdminUnauthorized(
                "a valid admin key is required: 'Authorization: Bearer <admin_key>'"
            )

    async def list_keys(self, request: web.Request) -> web.Response:
        self._authorize(request)
        with KeyStore(self.directory) as store:
            return _json({"object": "list", "data": key_rows(store.all())})

    async def create_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
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
        rate_limit = body.get("rate_limit")
        try:
            rate_limit = rate_limit_value("rate_limit", rate_limit)
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="rate_limit") from None
        with KeyStore(self.directory) as store:
            try:
                secret = store.create(name, models, expires, rate_limit)
            except KeyFieldError as exc:
                raise InvalidRequest(str(exc), param=exc.field) from None
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="name", code="key_exists") from None
        self._keys_changed()
        return _json({"name": name, "key": secret}, status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = request.match_info["name"]
        with KeyStore(self.directory) as store:
            revoked = store.revoke(name)
        if revoked is None:
            raise KeyNotFound(f"no active key named '{name}'")
        if self.redis_url is not None:
            await share_revocation(self.redis_url, revoked)
        self._keys_changed()
        return _json({"name": name, "revoked": True})

    async def usage(self, request: web.Request) -> web.Response:
        self._authorize(request)
        by = request.query.get("by", "key")
        if by not in GROUPINGS:
            raise InvalidRequest("'by' must be key, model or day", param="by")
        try:
            since = float(request.query["since"]) if "since" in request.query else None
        except ValueError:
            raise InvalidRequest("'since' must be a Unix time in seconds", param="since") from None
        rows = await asyncio.to_thread(usage_sums, self.directory, since, by)
        return _json({"object": "list", "data": rows})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/keys", self.list_keys)
        app.router.add_post("/admin/keys", self.create_key)
        app.router.add_delete("/admin/keys/{name}", self.revoke_key)
        app.router.add_get("/admin/usage", self.usage)

"""The gateway: the checks a request passes before any handler sees it (Host, origin, API
key, rate limit), the headers every answer carries, and the accounting of what happened.
The server calls it once per request; it knows routes only by whether they need a key.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from ..config import Config, parse_networks
from ..core.call import INSTANCE_HEADER, via_name
from ..core.errors import InvalidApiKey, LoopDetected, OperatorKeyRefused
from ..core.keys import ApiKey, KeyRing
from ..core.record import RequestRecord
from ..stores import RateCounter
from .credentials import presented_secret
from .hardening import accepted_hosts, check_host, check_origin, response_headers
from .limits import applicable_limit, check_limit, client_address
from .signin import SignInGuard


class Gateway:
    def __init__(self, config: Config, keys: KeyRing, counter: RateCounter) -> None:
        self.config = config
        self.keys = keys
        self.counter = counter
        self.accepted_hosts = accepted_hosts(config)
        self.trusted_proxies = parse_networks(config.trusted_proxies)
        self.instance_header = {INSTANCE_HEADER: config.instance} if config.instance else {}
        self.via_name = via_name(config.instance) if config.instance else ""
        self.sign_ins = SignInGuard(counter)

    def headers(self, request: web.Request) -> Mapping[str, str]:
        """What every answer to this request carries: security and CORS headers, and the
        instance's name (so discovery never takes this llproxy for an upstream)."""
        headers = response_headers(self.config, request)
        return {**headers, **self.instance_header} if self.instance_header else headers

    async def admit(
        self,
        request: web.Request,
        record: RequestRecord,
        needs_key: bool,
        key_param: str | None = None,
    ) -> Mapping[str, str]:
        """Raise the ProxyError a request must get instead of an answer; else the headers
        its rate limit adds (none for routes that need no key)."""
        check_host(request, self.accepted_hosts)
        check_origin(self.config, request)
        if self.via_name and self.via_name in request.headers.get("Via", ""):
            raise LoopDetected(
                "this request already passed through this llproxy: the upstreams loop back"
            )
        if not needs_key:
            return {}
        if self.keys.enabled:
            record.key = self.authenticate(request, key_param)
        # Who the client is, for its rate limit and its usage records.
        record.client = (
            record.key.name
            if record.key is not None
            else client_address(request, self.trusted_proxies)
        )
        limit = applicable_limit(self.config.rate_limit, record.key)
        if limit is None:
            return {}
        verdict = await check_limit(self.counter, limit, record.client, record.key is not None)
        return verdict.headers()

    def authenticate(self, request: web.Request, key_param: str | None = None) -> ApiKey:
        secret = presented_secret(request.headers)
        if not secret and key_param is not None:
            secret = request.query.get(key_param, "").strip()
        key = self.keys.authenticate(secret) if secret else None
        if key is None:
            raise InvalidApiKey(
                "Incorrect API key provided"
                if secret
                else "An API key is required: send 'Authorization: Bearer <key>' or "
                "'x-api-key: <key>'"
            )
        if key.operator:
            raise OperatorKeyRefused(
                "this is an operator key: it opens the operator interfaces, not the models"
            )
        return key

    def operator(self, secret: str) -> ApiKey | None:
        """The operator key a secret belongs to; None for anything else (a client key, a
        revoked, expired or unknown one), told apart nowhere."""
        key = self.keys.authenticate(secret) if secret else None
        return key if key is not None and key.operator else None

    def address(self, request: web.Request) -> str:
        """The client's address, as its rate limit counts it."""
        return client_address(request, self.trusted_proxies)

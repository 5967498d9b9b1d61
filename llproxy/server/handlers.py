"""The handlers: a dialect's routes (a model's answer, the model listing), health,
metrics and CORS preflights. Each reads the request, asks the layer below, and returns
the answer for the boundary (or the streaming responder) to send."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from ..core.answer import as_asked
from ..core.call import MODEL_HEADER, Call, JsonPayload, Reply, within_context
from ..core.errors import InvalidRequest
from ..core.keys import ApiKey
from ..core.mend import mend, plan_for
from ..core.record import RequestRecord
from ..core.registry import Model
from ..core.turn import CHAT, local_reply
from ..dialects import Answer, Incoming, Translation
from ..gateway.hardening import preflight_headers
from ..telemetry.metrics import CONTENT_TYPE
from .body import read_body
from .respond import Delivery, answer_or_stream, answer_response, stream_early
from .state import DELIVERY, RECORD, SPEC, STATE, ProxyState, RouteSpec

access_log = logging.getLogger("llproxy.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def route_handler(request: web.Request) -> web.StreamResponse:
    """A dialect's route: the kind of answer its spec (chosen by the boundary) asks for."""
    spec = request[SPEC]
    return await _KINDS[spec.route.kind](spec, request)


async def call_model(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    """A model's answer: the request translated, routed to a replica, the reply sent back
    through the dialect (streamed as it comes when it is a stream)."""
    state = request.app[STATE]
    record = request[RECORD]
    raw = await read_body(request, state.config)
    if state.accounting.capture is not None:
        record.request_body = raw
        record.response_chunks = []
    elif access_log.isEnabledFor(logging.DEBUG):
        record.request_body = raw
    translation = spec.dialect.translate(spec.route, incoming(request, raw))
    if isinstance(translation, Answer):
        if translation.about is not None:
            state.router.resolve(translation.about, record.key)
        return answer_response(translation)
    # The conversation's commands and tool calls, read from its history (core/turn.py).
    turn = await state.turns.read(translation.target, translation.payload, record)
    name = turn.model or translation.model or state.config.default_model
    delivery = request[DELIVERY]
    if turn.answer is not None:  # llproxy answers itself: nothing goes upstream
        record.model = name
        reply = local_reply(turn.answer, name or "llproxy", translation.stream)
        limit = state.config.max_response_bytes
        sending = answered(_ready(reply), CHAT, translation.stream, record, limit)
        return await deliver(request, sending, translation, record, delivery)
    if name is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    record.model = name
    chain = state.router.chain(name, record.key)
    model = chain[0]
    # Which model answers (an alias's chain may fall to the next): a header of the answer.
    served = {**delivery.headers}
    request[DELIVERY] = delivery = Delivery(served, delivery.close, delivery.keepalive)

    def resolved(name: str) -> None:
        state.accounting.resolved(record, name)
        served[MODEL_HEADER] = name

    resolved(model.name)
    payload = within_context(turn.payload, model.context_length)
    # Encoded before a replica is chosen (once, for the id replicas most likely share):
    # a body that cannot be written is the client's 400, not a replica's failure.
    payload.prepare(model.replicas[0].upstream_id if model.replicas else model.name)
    if record.response_chunks is not None and isinstance(payload, JsonPayload):
        # The wire capture's upstream side: the body as encoded above (no work added).
        record.upstream_request = payload.encode(
            model.replicas[0].upstream_id if model.replicas else model.name
        )
        record.upstream_chunks = []
    call = Call(
        translation.target,
        model.name,
        payload,
        translation.stream,
        request.headers.get("Via", ""),
        settings=turn.settings,
    )
    sending = answered(
        state.router.send(call, chain, record, resolved),
        call.route,
        translation.stream,
        record,
        state.config.max_response_bytes,
    )
    sending = mended(sending, state, call, translation.thinking, record)
    return await deliver(request, sending, translation, record, delivery)


async def deliver(
    request: web.Request,
    sending: Awaitable[Reply],
    translation: Translation,
    record: RequestRecord,
    delivery: Delivery,
) -> web.StreamResponse:
    """The reply sent back through the client's dialect: whole, or streamed as it comes."""
    if translation.stream and translation.early:
        return await stream_early(request, sending, translation, record, delivery)
    reply = await sending
    if (
        reply.status < 400
        and reply.stream is None
        and (not translation.stream or translation.relays_as_is)
    ):
        try:
            answer = translation.answer(reply, record)
        finally:
            reply.close()
        if record.request_body is not None:
            record.response_body = answer.body
        return answer_response(answer)
    return await answer_or_stream(request, reply, translation, record, delivery)


async def _ready(reply: Reply) -> Reply:
    return reply


async def answered(
    sending: Awaitable[Reply], route: str, stream: bool, record: RequestRecord, limit: int
) -> Reply:
    """The reply in the form the client asked for, its shape checked once for every
    dialect (core/answer.py); a malformed one is closed and raised as a 502."""
    reply = await sending
    try:
        await as_asked(reply, route, stream, record, limit)
    except BaseException:
        reply.close()
        raise
    if record.upstream_chunks is not None:
        record.upstream_chunks.append(reply.body)
    return reply


async def mended(
    sending: Awaitable[Reply],
    state: ProxyState,
    call: Call,
    thinking: bool,
    record: RequestRecord,
) -> Reply:
    """The reply through the mending stages its model and conversation have on
    (core/mend); untouched when none is."""
    reply = await sending
    switches = state.mending.switches(
        reply.replica, record.served or call.model, call.settings, record.model or ""
    )
    plan = plan_for(call, switches, thinking, state.config.mending.loops)
    if plan is not None:
        try:
            await mend(reply, plan, record)
        except BaseException:
            reply.close()
            raise
    return reply


async def answer_locally(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    """What a dialect answers itself (versions, listings in its shape, token counts)."""
    state = request.app[STATE]
    raw = await read_body(request, state.config) if request.can_read_body else b""
    answer = await spec.dialect.local(
        spec.route, incoming(request, raw), Catalog(state, request[RECORD].key)
    )
    return answer_response(answer)


def incoming(request: web.Request, body: bytes) -> Incoming:
    return Incoming(request.headers, body, request.match_info, request.query_string)


class Catalog:
    """The models as a dialect answering locally sees them: for the client's key."""

    def __init__(self, state: ProxyState, key: ApiKey | None) -> None:
        self.state = state
        self.key = key

    def listing(self) -> list[Mapping[str, Any]]:
        return self.state.router.listing(self.key)

    def resolve(self, name: str) -> Model:
        return self.state.router.resolve(name, self.key)

    def seen(self, chat: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.state.turns.seen(chat, self.key)

    async def count_tokens(self, model: Model, chat: Mapping[str, Any]) -> int | None:
        counter = self.state.counters.get(model.replicas[0].backend)
        return await counter.count_tokens(model, chat) if counter is not None else None


async def list_models(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    entries = request.app[STATE].router.listing(request[RECORD].key, request.headers.get("Via", ""))
    return answer_response(spec.dialect.models(entries))


async def get_model(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    model = request.app[STATE].router.resolve(name, request[RECORD].key)
    return answer_response(spec.dialect.model({**model.entry, "id": name}))


_KINDS: dict[str, Callable[[RouteSpec, web.Request], Awaitable[web.StreamResponse]]] = {
    "call": call_model,
    "models": list_models,
    "model": get_model,
    "local": answer_locally,
}


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {
        "status": "ok",
        "models": len(state.registry.models),
        "workers": state.workers,
        "worker": state.worker_id,
        "pid": os.getpid(),
        "stores": state.services.health(),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[STATE].metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=preflight_headers(request.app[STATE].config, request))

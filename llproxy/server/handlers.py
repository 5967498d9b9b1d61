"""The handlers: a dialect's routes (a model's answer, the model listing), health,
metrics and CORS preflights. Each reads the request, asks the layer below, and returns
the answer for the boundary (or the streaming responder) to send."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ..core.call import Call
from ..core.errors import InvalidRequest, ModelNotFound
from ..core.router import check_model_allowed
from ..dialects import Incoming
from ..gateway.hardening import preflight_headers
from ..telemetry.metrics import CONTENT_TYPE
from .body import read_body
from .respond import answer_response, stream
from .state import DELIVERY, RECORD, STATE, RouteSpec

access_log = logging.getLogger("llproxy.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_handler(spec: RouteSpec) -> Handler:
    kinds = {"call": call_model, "models": list_models, "model": get_model}
    answer = kinds[spec.route.kind]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await answer(spec, request)

    return handler


async def call_model(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    """A model's answer: the request translated, routed to a replica, the reply sent back
    through the dialect (streamed as it comes when it is a stream)."""
    state = request.app[STATE]
    record = request[RECORD]
    raw = await read_body(request, state.config)
    if access_log.isEnabledFor(logging.DEBUG):
        record.request_body = raw
    incoming = Incoming(
        request.match_info, request.query, request.headers, request.content_type, raw
    )
    translation = spec.dialect.translate(spec.route, incoming)
    name = translation.model or state.config.default_model
    if name is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    record.model = name
    model = state.router.resolve(name, record.key)
    state.accounting.resolved(record, model.name)
    call = Call(translation.target, model.name, translation.payload, translation.stream)
    reply = await state.router.send(call, model, record)
    try:
        if reply.status >= 400:
            return answer_response(translation.upstream_error(reply))
        if reply.stream is None:
            answer = translation.answer(reply, record)
            if record.request_body is not None:
                record.response_body = answer.body
            return answer_response(answer)
        transform = translation.stream_transform(reply, record)
        return await stream(request, reply, transform, request[DELIVERY])
    finally:
        reply.close()


async def list_models(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    registry = request.app[STATE].registry
    key = request[RECORD].key
    entries = [
        model.entry for name, model in registry.models.items() if key is None or key.allows(name)
    ]
    return answer_response(spec.dialect.models(entries))


async def get_model(spec: RouteSpec, request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    check_model_allowed(request[RECORD].key, name)
    model = request.app[STATE].registry.get(name)
    if model is None:
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")
    return answer_response(spec.dialect.model(model.entry))


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {
        "status": "ok",
        "models": len(state.registry.models),
        "workers": state.workers,
        "worker": state.worker_id,
        "pid": os.getpid(),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[STATE].metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=preflight_headers(request.app[STATE].config, request))

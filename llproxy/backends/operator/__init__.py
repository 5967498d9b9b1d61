"""The backend whose replicas are people: a request becomes a ticket on the operator desk,
and what the operator does comes back as an OpenAI chat answer. A stream opens at once
and carries the operator's text as it is typed; a client that asked for no stream gets
the whole answer at the finish. A handoff, or a timeout with a fallback, has a model
answer instead (or continue the operator's text), through the router like any call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from ...config import Endpoint
from ...core.call import Call, JsonPayload, Reply, encode_client
from ...core.desk import DeskPort, Event, Ticket, new_ticket_id, tool_problems
from ...core.errors import (
    InvalidRequest,
    OperatorInterrupted,
    OperatorRejected,
    OperatorTimeout,
    ProxyError,
    UpstreamFailed,
)
from ...core.record import RequestRecord
from ...core.registry import FoundModel, Replica, Upstream, final_names
from ...core.sse import ModelRename, completion_as_chunk, json_document, model_rename

BACKEND = "operator"
OWNED_BY = "llproxy-operator"

# What hands a call to a model (the router): the call names the model to answer it.
Handoff = Callable[[Call, RequestRecord], Awaitable[Reply]]
# The event a retiring process gives its own waiting answers (never from the desk).
INTERRUPTED = "interrupted"


def operator_models(endpoints: Iterable[Endpoint]) -> list[FoundModel]:
    """The models the config's operator endpoints stand for (`human:support`, `human`)."""
    found = []
    created = int(time.time())
    for endpoint in endpoints:
        if endpoint.operator is None or not endpoint.enable:
            continue
        for name in final_names(endpoint.operator, endpoint.tags):
            upstream = Upstream(f"operator:{name}", "operator", 0, endpoint.tags)
            entry = {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}
            found.append(FoundModel(name, upstream, name, entry, backend=BACKEND))
    return found


class OperatorBackend:
    def __init__(
        self,
        endpoints: Iterable[Endpoint],
        desk: DeskPort,
        keepalive: float = 10.0,
        worker_id: int = 0,
    ) -> None:
        self.settings = {
            name: endpoint
            for endpoint in endpoints
            if endpoint.operator is not None
            for name in final_names(endpoint.operator, endpoint.tags)
        }
        self.desk = desk
        self.keepalive = keepalive
        self.worker_id = worker_id
        self.handoff: Handoff | None = None  # set once the router exists
        self.waiting: set[OperatorAnswer] = set()  # the answers still on the desk

    def interrupt(self) -> int:
        """This process retires and its graceful timeout ran out: every request still
        waiting for an operator ends now (the client gets an error, the operator is told)
        rather than outliving it. How many there were."""
        waiting, self.waiting = self.waiting, set()
        for answer in waiting:
            answer.inbox.put_nowait({"type": INTERRUPTED})
        return len(waiting)

    async def send(self, call: Call, replica: Replica, record: RequestRecord) -> Reply:
        endpoint = self.settings.get(replica.upstream_id)
        if endpoint is None:
            raise InvalidRequest(f"{replica.upstream_id} is no longer an operator")
        if call.route != "chat/completions" or not isinstance(call.payload, JsonPayload):
            raise InvalidRequest(
                f"{replica.upstream_id} is a person: they answer chat requests only"
            )
        # The desk's events carry a ticket's messages and tools two levels deeper than
        # the body did (`{"requests": [ticket]}`): a body too deep to be written there is
        # refused here, not met by the operator's socket (one encode, beside a person).
        encode_client([[call.payload.body]])
        body = call.payload.body
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        ticket = Ticket(
            id=new_ticket_id(),
            model=replica.upstream_id,
            asked=record.model or replica.upstream_id,
            client=record.client,
            dialect=record.dialect,
            stream=call.stream,
            messages=list(body.get("messages") or ()),
            tools=list(body.get("tools") or ()),
            tool_choice=body.get("tool_choice"),
            max_tokens=limit if isinstance(limit, int) else None,
            queue_timeout=endpoint.queue_timeout,
            idle_timeout=endpoint.idle_timeout,
            fallback=endpoint.fallback,
            max_answer_bytes=endpoint.max_answer_bytes,
            worker=self.worker_id,
        )
        # Here in the worker, not in the master that holds the desk for every worker.
        ticket.tool_problems = tool_problems(ticket.tools)
        answer = OperatorAnswer(self, ticket, call, replica, record)
        record.upstream = "operator:-"
        self.waiting.add(answer)
        self.desk.submit(ticket, answer.inbox.put_nowait)
        try:
            if call.stream:
                return Reply(200, "text/event-stream", answer.opening(), answer, awaited=True)
            return await answer.whole()
        except BaseException:
            answer.close()
            raise


class OperatorAnswer:
    """One ticket's answer as the client's worker sees it: the desk's events in, OpenAI
    chunks (or one whole completion) out. As a Stream, closing it before its end takes
    the request off the desk (the operator is told) or stops the model it went to."""

    def __init__(
        self,
        backend: OperatorBackend,
        ticket: Ticket,
        call: Call,
        replica: Replica,
        record: RequestRecord,
    ) -> None:
        self.backend = backend
        self.ticket = ticket
        self.call = call
        self.replica = replica
        self.record = record
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.ended = False
        self.on_desk = True  # until the desk ended the ticket
        self.handed: Reply | None = None  # the model's answer after a handoff
        self.rename: ModelRename | None = None  # its model id → the operator's name
        self.text: list[str] = []
        self.calls: list[Event] = []
        self.base = {
            "id": f"chatcmpl-{ticket.id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": replica.upstream_id,
        }

    # --- a stream ---------------------------------------------------------------------------

    def opening(self) -> bytes:
        """The first event, sent at once: the client knows its request is taken."""
        return self._chunk({"role": "assistant", "content": ""})

    async def next(self) -> bytes:
        if self.ended:
            return b""
        if self.handed is not None:
            return await self._handed_next()
        while True:
            try:
                event = await asyncio.wait_for(self.inbox.get(), self.backend.keepalive)
            except TimeoutError:
                # A comment: every SSE reader skips it, and it keeps proxies from closing.
                return b": waiting for the operator\n\n"
            kind = event["type"]
            if kind == "claimed":
                self.record.upstream = f"operator:{event['by']}"
            elif kind == "delta":
                self.text.append(event["text"])
                return self._chunk({"content": event["text"]})
            elif kind == "tool_call":
                self.calls.append(event)
                index = len(self.calls) - 1
                return self._chunk({"tool_calls": [_tool_call(event, index)]})
            elif kind == "finish":
                self._off_desk()
                self.ended = True
                return self._chunk({}, event["reason"]) + b"data: [DONE]\n\n"
            else:
                first = await self._redirect(event)
                if first is not None:
                    return first

    async def _handed_next(self) -> bytes:
        assert self.handed is not None
        stream = self.handed.stream
        chunk = await stream.next() if stream is not None else b""
        self.ended = stream is None or stream.ended or not chunk
        return self._renamed(chunk)

    def close(self) -> None:
        self._off_desk("client left")
        if self.handed is not None:
            self.handed.close()
        self.ended = True

    # --- a whole answer -----------------------------------------------------------------------

    async def whole(self) -> Reply:
        while True:
            event = await self.inbox.get()
            kind = event["type"]
            if kind == "claimed":
                self.record.upstream = f"operator:{event['by']}"
            elif kind == "delta":
                self.text.append(event["text"])
            elif kind == "tool_call":
                self.calls.append(event)
            elif kind == "finish":
                self._off_desk()
                return Reply(200, "application/json", self._completion(event["reason"]))
            else:
                await self._redirect(event)
                assert self.handed is not None
                reply, self.handed = self.handed, None
                reply.body = self._renamed(reply.body)
                if reply.status < 400 and self.text:
                    reply.body = _after(reply.body, "".join(self.text))
                return reply

    # --- the ends that are not the operator's own -------------------------------------------

    async def _redirect(self, event: Event) -> bytes | None:
        """A reject, a handoff or a timeout: an error, or a model answers from here on
        (its first chunk is returned)."""
        kind = event["type"]
        if kind == INTERRUPTED:
            self._off_desk("the server holding the client's request restarted")
            raise OperatorInterrupted(
                "llproxy restarted before an operator finished this request (its "
                "graceful timeout ran out): send it again"
            )
        self._off_desk()
        if kind == "reject":
            raise OperatorRejected(f"the operator rejected the request: {event['message']}")
        if kind == "timeout" and not event.get("fallback"):
            ticket = self.ticket
            if event["waited"] == "queue_timeout":
                what = f"no operator claimed the request within {ticket.queue_timeout:g} s"
            else:  # someone claimed it, and may have typed: no "nobody came"
                what = (
                    f"the operator who claimed the request sent nothing for "
                    f"{ticket.idle_timeout:g} s and did not finish"
                )
            raise OperatorTimeout(
                f"{what} ({event['waited']}), and {self.replica.upstream_id} has no fallback model"
            )
        model = event["model"] if kind == "handoff" else event["fallback"]
        # The desk hands off with mode replace only while nothing reached the client.
        reply = await self._hand_off(model, event.get("text") or "")
        self.handed = reply
        if not self.call.stream:
            return None
        if reply.status >= 400:
            raise UpstreamFailed(reply.status, reply.body)
        if reply.stream is None:  # the model answered at once: one chunk
            self.ended = True
            return self._renamed(completion_as_chunk(reply.body)) + b"data: [DONE]\n\n"
        self.ended = reply.stream.ended
        return self._renamed(reply.body)

    async def _hand_off(self, model: str, partial: str) -> Reply:
        handoff = self.backend.handoff
        if handoff is None:
            raise ProxyError("no router to hand the request to")
        body = self.call.payload.body if isinstance(self.call.payload, JsonPayload) else {}
        if partial:
            # The model continues the operator's text: servers such as llama.cpp take a
            # last assistant message as the beginning of their answer.
            messages = [*body.get("messages", ()), {"role": "assistant", "content": partial}]
            body = {**body, "messages": messages}
        call = dataclasses.replace(self.call, model=model, payload=JsonPayload(body))
        reply = await handoff(call, self.record)
        self.rename = model_rename(reply.model_id, self.replica.upstream_id)
        return reply

    def _renamed(self, data: bytes) -> bytes:
        return self.rename.apply(data) if self.rename is not None else data

    def _off_desk(self, withdraw: str | None = None) -> None:
        """The ticket left the desk; with a reason, this side takes it off (the operator
        is told the reason)."""
        if self.on_desk and withdraw is not None:
            self.backend.desk.withdraw(self.ticket.id, withdraw)
        self.on_desk = False
        self.backend.waiting.discard(self)

    # --- shapes -------------------------------------------------------------------------------

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**self.base, "choices": [choice]}) + b"\n\n"

    def _completion(self, reason: str) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.calls:
            message["tool_calls"] = [
                {k: v for k, v in _tool_call(call, i).items() if k != "index"}
                for i, call in enumerate(self.calls)
            ]
        if message["content"] is None and not self.calls:
            message["content"] = ""
        choice = {"index": 0, "message": message, "finish_reason": reason}
        document = {**self.base, "object": "chat.completion", "choices": [choice]}
        return orjson.dumps(document)


def _tool_call(event: Event, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "id": event["id"],
        "type": "function",
        "function": {"name": event["name"], "arguments": event["arguments"]},
    }


def _after(completion: bytes, start: str) -> bytes:
    """A model's whole answer that continued the operator's text, with that text before
    it: a client without a stream never saw it."""
    document = json_document(completion)
    choices = document.get("choices") if isinstance(document, dict) else None
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        return completion
    message["content"] = start + (message.get("content") or "")
    return orjson.dumps(document)

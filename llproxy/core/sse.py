"""Server-sent events and usage: cutting a stream into whole events, finding the usage an
answer carries, and the two relays of an OpenAI stream.

Usage is read as late and as little as possible: after the client has its bytes, and from
the usage member or the stream's last reads only, so a long completion costs nothing to
account for. The relays keep a stream moving chunk by chunk.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .shape import chunk_problem

if TYPE_CHECKING:
    from .record import RequestRecord

EVENT_END = re.compile(rb"\r?\n\r?\n")
# Bytes are searched with `data.find(needle) >= 0`, here and in every module a stream's
# reads pass through, not `needle in data`: on CPython 3.11, `in` first tries the needle
# as an integer, raising and clearing a TypeError, which doubles its time (139 against
# 65 ns; the two a chunk were ~4 % of a relayed chunk's instructions, measured).
# What a JSON string's bytes cannot hold as they are: a quote, an escape, a control byte.
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
# The last reads of a stream are kept to find its usage chunk, which may arrive split.
USAGE_TAIL_READS = 4


def json_document(raw: bytes) -> Any:
    """The decoded JSON; None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def event_data(event: bytes) -> bytes:
    """The joined `data:` lines of one event."""
    if event.startswith(b"data:") and event.count(b"\n") == 2:  # one line: the usual event
        return event[5:].strip()
    return b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))


def event_document(event: bytes) -> Any:
    """The JSON of one event's `data:` lines; None when it is not JSON (`[DONE]`, a ping)."""
    return json_document(event_data(event))


def split_events(complete: bytes) -> list[bytes]:
    """Whole events, each with its end, from bytes that end at an event's end."""
    if complete.find(b"\r") < 0:
        # Servers end lines with \n: a byte search, several times faster than the pattern
        # (which must try an optional \r at every position), ~60 µs a 3 KB read measured.
        return [part + b"\n\n" for part in complete.split(b"\n\n")[:-1]]
    events, start = [], 0
    for end in EVENT_END.finditer(complete):
        events.append(complete[start : end.end()])
        start = end.end()
    return events


def usage_numbers(document: Any) -> tuple[int | None, int | None] | None:
    """(prompt, completion) tokens of a document that carries `usage`, else None."""
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def cached_tokens(document: Any) -> int | None:
    """The prompt tokens an upstream's `usage` says came from its prefix cache
    (`prompt_tokens_details.cached_tokens`: OpenAI, vLLM, llama.cpp), else None."""
    usage = document.get("usage") if isinstance(document, dict) else None
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) else None


_USAGE_MEMBER = b'"usage":'


def usage_of_json_answer(raw: bytes) -> Any:
    """A document with a JSON answer's `usage`, parsing as little of the answer as it can.

    Usage is usually the answer's last member: then only it is parsed, not a long
    completion (measured: 18k → 11k instructions per proxied request, more for long
    answers). The slice from the last `"usage":` to the last `}` parses as an object only
    when that member is the top level's last (a nested one leaves closing brackets in the
    slice, one inside a string is escaped); anything else parses the whole answer.
    """
    at = raw.rfind(_USAGE_MEMBER)
    end = raw.rfind(b"}")
    if 0 < at < end and raw[at - 1] != ord("\\"):
        usage = json_document(raw[at + len(_USAGE_MEMBER) : end])
        if isinstance(usage, dict):
            return {"usage": usage}
    return json_document(raw)


def last_usage_event(reads: Iterable[bytes]) -> Any:
    """The usage chunk among a stream's last reads: the last event that carries `usage`;
    None when none does."""
    for event in reversed(EVENT_END.split(b"".join(reads))):
        if event.find(b'"usage"') >= 0 and usage_numbers(document := event_document(event)):
            return document
    return None


def only_usage(document: dict[str, Any]) -> bool:
    """Whether a chunk brings the client nothing but usage: no choice carries content, a
    tool call, a finish reason or anything else. Servers shape this chunk differently
    (`choices: []`, or LiteLLM's one choice with an empty delta)."""
    for choice in document.get("choices") or ():
        if not isinstance(choice, dict):
            return False
        for key, value in choice.items():
            if key == "delta" and isinstance(value, dict):
                if any(v not in (None, "", [], {}) for v in value.values()):
                    return False
            elif key != "index" and value not in (None, "", [], {}):
                return False
    return True


def string_text(raw: bytes) -> str | None:
    """The text of a JSON string's bytes (without its quotes); None when they are not one
    (a bare quote, a line end, an escape left open, bytes that are not UTF-8)."""
    if _NOT_PLAIN.search(raw) is None:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None
    try:
        text = orjson.loads(b'"' + raw + b'"')  # escapes: decoded as the string they are
    except orjson.JSONDecodeError:
        return None
    return text if type(text) is str else None


class ModelRename:
    """Puts the name the client asked for where the upstream wrote its own model id.

    A structural `"model":"<id>"` cannot occur inside a JSON string (its quotes would be
    escaped there), so replacing the bytes renames exactly the member.
    """

    def __init__(self, upstream_id: str, name: str) -> None:
        old, new = orjson.dumps(upstream_id), orjson.dumps(name)
        self.pairs = tuple(
            (b'"model":' + gap + old, b'"model":' + gap + new) for gap in (b"", b" ")
        )

    def apply(self, data: bytes) -> bytes:
        for old, new in self.pairs:
            data = data.replace(old, new)
        return data


@functools.lru_cache(maxsize=256)
def model_rename(upstream_id: str, name: str) -> ModelRename | None:
    """How the client's name replaces the upstream's id in answers; None when they agree."""
    return None if upstream_id == name else ModelRename(upstream_id, name)


class EventSplitter:
    """Cuts a byte stream into whole events as the bytes arrive: each feed returns the
    complete events so far (maybe none), a trailing partial one waits for its end."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []  # a partial event, as it arrived
        self.tail = b""  # the last bytes of pending, where an event end may begin

    def feed(self, chunk: bytes) -> bytes:
        if self.pending:
            seam = self.tail + chunk[:3]
            self.pending.append(chunk)
            if chunk.find(b"\n\n") < 0 and chunk.find(b"\n\r\n") < 0 and not EVENT_END.search(seam):
                self.tail = (self.tail + chunk)[-3:]
                return b""  # still inside one event: joined once it ends
            data = b"".join(self.pending)
        else:
            data = chunk
        cut = _last_end(data)
        if cut == 0:
            self.pending, self.tail = [data], data[-3:]
            return b""
        self.pending = [data[cut:]] if cut < len(data) else []
        self.tail = data[-3:]
        return data[:cut]

    def bodies(self, chunk: bytes) -> list[bytes]:
        """The events `feed` completes, each without its end: what readers of their
        `data:` need, without joining each event to its end again (~7 µs a 20-event read,
        measured)."""
        if not self.pending and chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2:
            # One whole event per read, as servers write them: no search needed.
            return [chunk[:-2]]
        complete = self.feed(chunk)
        if not complete:
            return []
        if complete.find(b"\r") < 0:
            return complete.split(b"\n\n")[:-1]
        return EVENT_END.split(complete)[:-1]

    def rest(self) -> bytes:
        """Whatever is left at the stream's end (an unterminated last event)."""
        rest, self.pending = b"".join(self.pending), []
        return rest


def _last_end(data: bytes) -> int:
    """Where the last complete event of `data` ends; 0 when none does."""
    if data.find(b"\r") < 0:
        return data.rfind(b"\n\n") + 2 if data.find(b"\n\n") >= 0 else 0
    last = 0
    for end in EVENT_END.finditer(data):
        last = end.end()
    return last


_NOT_JSON = object()
CUT = "the stream was cut inside an event"


def _decoded(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _chunk_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return "a chunk is not a JSON object"
    return chunk_problem(document)


def json_events(complete: bytes, shaped: bool) -> tuple[bytes, int, str | None]:
    """The whole events of `complete` a client can read, how many were dropped, and what
    was wrong with the chunk that must end the stream, if one must.

    A chunk that is not JSON (cut, garbled, NaN) is dropped: it would break the client's
    parser. With `shaped` (chat and completions streams), a JSON chunk whose members
    llproxy reads have the wrong types ends the stream; the events before it pass.
    """
    return EventCheck(shaped).check(complete)


def _each_event(complete: bytes, shaped: bool) -> tuple[bytes, int, str | None]:
    """json_events, each event decoded (events whose lines end with \r\n)."""
    kept: list[bytes] = []
    dropped = 0
    for event in split_events(complete):
        data = event_data(event)
        if data and data != b"[DONE]":
            document = _decoded(data)
            if document is _NOT_JSON:
                dropped += 1
                continue
            if shaped and (problem := _chunk_problem(document)):
                return b"".join(kept), dropped, problem
        kept.append(event)
    return (complete if not dropped else b"".join(kept)), dropped, None


def bodies_of(complete: bytes) -> list[bytes]:
    """The events of bytes that end at an event's end and whose lines end with \\n, each
    without its end. One-line events, as servers write them, are cut at every line end
    and every other piece is their end: twice as fast as searching for the blank lines
    (4 → 2 µs a 20-event read, measured)."""
    lines = complete.split(b"\n")
    # Every other piece empty: only one-line events.
    bodies = lines[0::2] if not any(lines[1::2]) else complete.split(b"\n\n")
    bodies.pop()  # what follows the last end: nothing
    return bodies


class EventCheck:
    """`json_events` for one stream, which remembers the template (`TextTemplate`) of the
    last chunk that only added text: the events of a read shaped like it are checked
    together, their texts in one decode, instead of each decoded and its members' types
    checked. A model's server writes every such chunk alike but for its text, so most
    events of an answer pass this way (a 20-chunk read from llama.cpp: 34 → 10 µs,
    measured). An event that is not exactly the template's bytes around one valid JSON
    string is decoded whole, as any other."""

    __slots__ = ("shaped", "template", "templated", "templates")

    def __init__(self, shaped: bool) -> None:
        self.shaped = shaped
        self.template: TextTemplate | None = None
        # Templates made, and events checked by one: a server that writes something else
        # into every chunk (a timestamp) defeats them, and then none is made.
        self.templates = 0
        self.templated = 0

    def check(self, complete: bytes, one: bool = False) -> tuple[bytes, int, str | None]:
        """As json_events: the events a client can read, the count dropped, the problem.
        With `one`, `complete` is known to be one event."""
        template = self.template
        if one and template is not None:
            # The usual event at a model's pace, alike the one before: nothing else to do.
            body = [complete[:-2]]
            if template.run(body, 0) and template.texts(body) is not None:
                self.templated += 1
                return complete, 0, None
        if complete.find(b"\r") >= 0:
            return _each_event(complete, self.shaped)
        kept, dropped, problem = self._bodies([complete[:-2]] if one else bodies_of(complete))
        if not dropped and problem is None:
            return complete, 0, None
        return b"".join([body + b"\n\n" for body in kept]), dropped, problem

    def _bodies(self, bodies: list[bytes]) -> tuple[list[bytes], int, str | None]:
        kept: list[bytes] = []
        dropped = 0
        at, count = 0, len(bodies)
        while at < count:
            template = self.template
            if template is not None and (alike := template.run(bodies, at)):
                run = bodies[at : at + alike]
                if template.texts(run) is not None:
                    kept += run
                    at += alike
                    self.templated += alike
                    continue
                self.template = None  # its events are decoded whole from here on
            body = bodies[at]
            at += 1
            if body.startswith(b"data:") and body.find(b"\n") < 0:  # one line: the usual
                data = body[5:].strip()
            else:
                data = b"".join(
                    line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")
                )
            if data and data != b"[DONE]":
                document = _decoded(data)
                if document is _NOT_JSON:
                    dropped += 1
                    continue
                if self.shaped:
                    if problem := _chunk_problem(document):
                        return kept, dropped, problem
                    self._learn(body, document)
            kept.append(body)
        return kept, dropped, None

    def _learn(self, body: bytes, document: dict[str, Any]) -> None:
        """The template of a checked chunk whose one choice only adds text."""
        choices = document.get("choices")
        if type(choices) is not list or len(choices) != 1:
            return
        added = only_text(choices[0])
        if added is None:
            return
        if self.templates < 2 or self.templated >= 4 * self.templates:
            self.templates += 1
            self.template = TextTemplate.of(body, document, choices[0], *added)
        else:
            self.template = None


class Checked(bytes):
    """Whole events that were checked as `EventCheck` checks them, by a stage the stream
    passed before the relay (the mending stages: core/mend/stream.py): each is a JSON
    chunk of the right shape, the usual end, or a comment. The relay passes them on
    without checking them again. Anything else (an event dropped or ending the stream) is
    never in them: the stage hands it on as plain bytes, which the relay checks. (orjson
    refuses a subclass of bytes: whatever decodes them decodes a slice, as every reader
    of events does.)"""

    __slots__ = ()


class _CheckedRelay:
    """What both relays share: whole events, checked (`json_events`); `problem` says
    what ended the stream."""

    def __init__(self, record: RequestRecord, shaped: bool) -> None:
        self.record = record
        self.shaped = shaped
        self.problem: str | None = None
        self.events = EventSplitter()
        self.check = EventCheck(shaped)
        self.recent: deque[bytes] = deque(maxlen=USAGE_TAIL_READS)

    def _complete(self, chunk: bytes) -> bytes:
        """The whole events a read completes, checked."""
        if type(chunk) is Checked and not self.events.pending:
            return chunk  # checked already, whole events: nothing to split or decode
        if (
            not self.events.pending
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n\n") == len(chunk) - 2
        ):
            # One whole event per read, as servers write them at a model's pace: no split.
            return self._checked(chunk, one=True)
        complete = self.events.feed(chunk)
        return self._checked(complete) if complete else b""

    def _checked(self, complete: bytes, one: bool = False) -> bytes:
        complete, dropped, problem = self.check.check(complete, one)
        if dropped:
            self.record.dropped_chunks += dropped
        if problem is not None:
            self._malformed(problem)
        return complete

    def _malformed(self, problem: str) -> None:
        self.problem = problem
        self.record.upstream_error = "malformed"

    def _rest(self) -> bytes:
        """An unterminated last event, ended, when a client can read it; a cut one
        ends the stream with an error."""
        rest = self.events.rest()
        if not rest.strip():
            return b""
        dropped = self.record.dropped_chunks
        complete = self._checked(rest.rstrip(b"\r\n") + b"\n\n")
        if self.record.dropped_chunks > dropped and self.problem is None:
            self._malformed(CUT)
        return complete


class PassThrough(_CheckedRelay):
    """Relays a stream's events unchanged but for the chunks `json_events` drops, and
    keeps its last reads, where a usage chunk would be. A partial event waits for its
    end, which the client could not use before anyway."""

    def feed(self, chunk: bytes) -> bytes:
        complete = self._complete(chunk)
        if complete:
            self.recent.append(complete)
        return complete

    def finish(self) -> bytes:
        return self._rest()


class EventRelay(_CheckedRelay):
    """Relays events whole: renamed to the client's model name, and minus the usage-only
    chunk (whose numbers go to the record) when the client did not ask for it.

    Complete events go on at once; only a trailing partial event waits for its end, which
    the client could not use before anyway. The transport bounds an event's size.
    """

    def __init__(
        self,
        record: RequestRecord,
        rename: ModelRename | None,
        hide_usage: bool,
        shaped: bool = True,
    ) -> None:
        super().__init__(record, shaped)
        self.rename = rename
        self.hide_usage = hide_usage

    def feed(self, chunk: bytes) -> bytes:
        complete = self._complete(chunk)
        if not complete:
            return b""
        if self.hide_usage and complete.find(b'"usage"') >= 0:
            complete = self._without_usage_chunk(complete)
        else:
            self.recent.append(complete)
        return self.rename.apply(complete) if self.rename is not None else complete

    def _without_usage_chunk(self, complete: bytes) -> bytes:
        kept = []
        for event in split_events(complete):
            if event.find(b'"usage"') >= 0:
                document = event_document(event)
                if self.record.take_usage(document) and only_usage(document):
                    continue
            kept.append(event)
        return b"".join(kept)

    def finish(self) -> bytes:
        rest = self._rest()
        return self.rename.apply(rest) if self.rename is not None else rest


def completion_as_chunk(raw: bytes) -> bytes:
    """A whole chat completion as the one event of a stream (its message as the delta),
    for a dialect that streams what the model answered at once."""
    document = json_document(raw)
    if not isinstance(document, dict):
        document = {}
    choices = [
        {
            "index": choice.get("index", 0),
            "delta": choice.get("message") or {"content": choice.get("text", "")},
            "finish_reason": choice.get("finish_reason"),
        }
        for choice in document.get("choices") or ()
        if isinstance(choice, dict)
    ]
    chunk = {**document, "object": "chat.completion.chunk", "choices": choices}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class ChoiceReader:
    """The first choice of every chunk of a model's chat stream, as the bytes arrive, for
    dialects that translate it: usage goes to the record, an error event ends the read.

    Text that comes in one read is joined into one choice: the client gets the same text
    at the same moment, in one event instead of many (a read of 20 chunks translated in
    ~1/4 of the time, measured)."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.events = EventSplitter()
        self.template: TextTemplate | None = None
        # Templates made, and events read by one: a model's server that writes something
        # else into every chunk (a timestamp) defeats them, and then none is made.
        self.templates = 0
        self.templated = 0
        self.malformed: str | None = None  # what was wrong with the chunk that ended it

    def feed(self, chunk: bytes) -> tuple[list[dict[str, Any]], bytes | None]:
        """The choices of the events completed by `chunk`, and the error event's JSON when
        the model's server sent one (nothing after it counts)."""
        choices: list[dict[str, Any]] = []
        run: _TextRun | None = None  # choices[-1], while the events only add text to it
        events = self.events.bodies(chunk)
        at, count = 0, len(events)
        while at < count:
            template = self.template
            if template is not None and (alike := template.run(events, at)):
                texts = template.texts(events[at : at + alike])
                if texts is not None:
                    if run is None or run.member != template.member:
                        _close(run)
                        run = _TextRun(template.choice(texts[0]), template.member, [])
                        choices.append(run.choice)
                    run.pieces += texts
                    at += alike
                    self.templated += alike
                    continue
                self.template = None  # its events are read whole from here on
            event = events[at]
            at += 1
            if event.startswith(b"data: {") and event.find(b"\n") < 0:
                # One `data:` line of JSON, as servers write each chunk: decoded at once.
                document = json_document(event[6:])
            elif event == b"data: [DONE]":
                continue  # the usual end, not decoded: a failed decode raises, which is slow
            else:
                document = event_document(event)
            if not isinstance(document, dict):
                if document is not None:  # JSON, but not a chunk
                    _close(run)
                    return choices, self._malformed("a chunk is not a JSON object")
                if event_data(event) not in (b"", b"[DONE]"):
                    self.record.dropped_chunks += 1  # cut or garbled: nothing to read
                continue  # a comment, a ping
            if isinstance(document.get("error"), dict):
                _close(run)
                return choices, orjson.dumps(document)
            if (problem := chunk_problem(document)) is not None:
                _close(run)
                return choices, self._malformed(problem)
            if "usage" in document:
                self.record.take_usage(document)
            for choice in document.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                added = only_text(choice)
                if added is None:
                    _close(run)
                    run = None
                    choices.append(choice)
                    continue
                member, text = added
                if self.templates < 2 or self.templated >= 4 * self.templates:
                    self.templates += 1
                    self.template = TextTemplate.of(event, document, choice, member, text)
                else:
                    self.template = None
                if run is None or run.member != member:
                    _close(run)
                    run = _TextRun(choice, member, [])
                    choices.append(choice)
                run.pieces.append(text)
        _close(run)
        return choices, None

    def one_text(self, chunk: bytes) -> bytes | None:
        """The content text of a read that is one event shaped like the template, as the
        JSON string it came as (quotes included), for a translator to put in its own event
        as it is; None for any other read (then `feed` reads it). The bytes between the
        template's are checked to be exactly one JSON string, as `TextTemplate.texts` does."""
        template = self.template
        if template is None or template.member != "content" or self.events.pending:
            return None
        head, tail = template.head, template.tail
        end = len(chunk) - 2 - len(tail)  # where the template's tail begins
        if (
            end <= len(head)  # no text, or bytes that overlap the template's
            or chunk.find(b"\n\n") != end + len(tail)
            or not chunk.startswith(head)
            or chunk[end:-2] != tail
            or string_text(chunk[len(head) : end]) is None
        ):
            return None
        self.templated += 1
        return chunk[len(head) - 1 : end + 1]

    def rest(self) -> tuple[list[dict[str, Any]], bytes | None]:
        """The choices of an unterminated last event, at the stream's end; a cut one (not
        JSON) ends the stream with an error: the answer is not whole."""
        rest = self.events.rest()
        if not rest.strip():
            return [], None
        dropped = self.record.dropped_chunks
        choices, failure = self.feed(rest + b"\n\n")
        if failure is None and self.record.dropped_chunks > dropped:
            failure = self._malformed(CUT)
        return choices, failure

    def _malformed(self, problem: str) -> bytes:
        """The error that ends a stream with a malformed chunk."""
        self.malformed = problem
        self.record.upstream_error = "malformed"
        message = f"the upstream sent a malformed chunk: {problem}"
        return orjson.dumps({"error": {"message": message}})


# Delta members that only add text.
_TEXT_MEMBERS = ("content", "reasoning_content", "reasoning")


def only_text(choice: dict[str, Any]) -> tuple[str, str] | None:
    """(member, text) of a choice whose delta only adds text (some servers name the role
    in every delta: Ollama); None for any other."""
    delta = choice.get("delta")
    if type(delta) is not dict or choice.get("finish_reason") or choice.get("logprobs"):
        return None
    if len(delta) == 1:
        ((member, text),) = delta.items()
    elif len(delta) == 2 and delta.get("role") == "assistant":
        ((member, text),) = ((name, value) for name, value in delta.items() if name != "role")
    else:
        return None
    return (member, text) if member in _TEXT_MEMBERS and type(text) is str else None


@dataclass(slots=True)
class _TextRun:
    """A choice that only adds text, and the texts of the events joined to it."""

    choice: dict[str, Any]
    member: str
    pieces: list[str]


def _close(run: _TextRun | None) -> None:
    if run is not None and len(run.pieces) > 1:
        # A new delta: the event's own dict stays as it came.
        run.choice["delta"] = {**run.choice["delta"], run.member: "".join(run.pieces)}


def text_bounds(event: bytes, member: str, text: str) -> tuple[bytes, bytes] | None:
    """The bytes of a one-line event (without its end) before and after its `member`'s
    `text`, each with one of the text's quotes; None unless the text is written where and
    as orjson writes it and the member occurs once."""
    if not event.startswith(b"data: {") or event.find(b"\n") >= 0:
        return None
    key = b'"' + member.encode() + b'":'
    at = event.find(key)
    if at < 0 or event.find(key, at + 1) >= 0:
        return None  # the member elsewhere too: its place is not certain
    start = at + len(key) + (event[at + len(key) : at + len(key) + 1] == b" ")
    encoded = orjson.dumps(text)
    if event[start : start + len(encoded)] != encoded:
        return None  # escaped otherwise than orjson escapes (e.g. \u003c)
    return event[: start + 1], event[start + len(encoded) - 1 :]


class TextTemplate:
    """The bytes of a chunk that only adds text, around its text. A model's server writes
    every such chunk alike but for the text, so the events of a read with the same bytes
    around their own text are read by cutting the texts out and decoding them together,
    instead of decoding each event and comparing its choice with the one before (a
    20-chunk read from llama.cpp: 53 → 20 µs, measured).

    The texts are decoded as one JSON array of strings: a text that is not exactly one
    JSON string (a bare quote, a line end, an escape left open) breaks the array or its
    count (`texts`), and then every event is decoded whole. The relays check events the
    same way (`EventCheck`).
    """

    __slots__ = ("choice_of", "head", "member", "tail")

    def __init__(self, head: bytes, tail: bytes, member: str, choice: dict[str, Any]) -> None:
        self.head = head
        self.tail = tail
        self.member = member
        self.choice_of = choice  # the choice whose bytes these are

    @classmethod
    def of(
        cls, event: bytes, document: dict[str, Any], choice: dict[str, Any], member: str, text: str
    ) -> TextTemplate | None:
        """The template of a one-line event (without its end) whose one choice only adds
        `text`; None when its bytes do not show the text where orjson would write it."""
        bounds = text_bounds(event, member, text) if len(document["choices"]) == 1 else None
        if bounds is None:
            return None
        own = {**choice, "delta": dict(choice["delta"])}  # the reader may join into it
        return cls(*bounds, member, own)

    def run(self, events: list[bytes], at: int) -> int:
        """How many events from `at` on are shaped like the template's."""
        head, tail = self.head, self.tail
        least = len(head) + len(tail)  # a shorter one would overlap them by its quote
        end = at
        for event in itertools.islice(events, at, None):
            if len(event) < least or not event.startswith(head) or not event.endswith(tail):
                break
            end += 1
        return end - at

    def texts(self, events: list[bytes]) -> list[str] | None:
        """The texts of events shaped like the template's; None when one is not exactly
        one JSON string, so the event is not the template's JSON with another text.

        They are joined by `",` and a line end: a line end cannot be inside a JSON string,
        so each join must close a string and open the next, and the array has at least
        one value per text; exactly as many only when each text is exactly one string.
        """
        start, end = len(self.head), -len(self.tail)
        array = b'["' + b'",\n"'.join([event[start:end] for event in events]) + b'"]'
        texts = json_document(array)
        return texts if type(texts) is list and len(texts) == len(events) else None

    def choice(self, text: str) -> dict[str, Any]:
        """The template's choice with `text` in place of its own."""
        choice = self.choice_of
        return {**choice, "delta": {**choice["delta"], self.member: text}}


@dataclass(slots=True)
class ToolCall:
    """One tool call of a streamed answer, gathered from its fragments."""

    id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        return "".join(self.parts)


class ToolCalls:
    """The tool calls of a streamed answer, whose fragments may come in any order: the
    arguments before the id and name, interleaved with another call's, or all at the end.
    Translators send each whole once the model has finished."""

    def __init__(self) -> None:
        self.by_index: dict[int, ToolCall] = {}

    def __bool__(self) -> bool:
        return bool(self.by_index)

    def add(self, delta: dict[str, Any]) -> None:
        """The fragments a chunk's delta carries."""
        for fragment in delta.get("tool_calls") or ():
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            call = self.by_index.setdefault(index if isinstance(index, int) else 0, ToolCall())
            function = fragment.get("function")
            function = function if isinstance(function, dict) else {}
            call.id = call.id or str(fragment.get("id") or "")
            call.name = call.name or str(function.get("name") or "")
            if isinstance(function.get("arguments"), str):
                call.parts.append(function["arguments"])

    def in_order(self) -> list[ToolCall]:
        return [call for _, call in sorted(self.by_index.items())]

"""A model's OpenAI stream with the mending stages in it: a `Stream` itself, so whatever
reads a reply's stream (each dialect's transform, the relay) reads the mended one.

An event whose text passes unchanged (most of them) goes on as the same bytes; only an
event a stage changes, holds or adds to is encoded anew. The next read never comes back
empty before the end: a chunk held whole waits for the model's next one. A read whose
events were all checked here as the relay would check them goes on `Checked`, so the
relay does not decode them again.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..call import Stream
from ..record import RequestRecord
from ..shape import chunk_problem
from ..sse import Checked, json_document, only_text, string_text, text_bounds
from .loops import LoopDetector
from .pipeline import REASONING, Item, Mender
from .plan import Plan
from .toolcalls import ToolCall

END = b"\n\n"
TEXT_MEMBERS = ("content", *REASONING)
# The client's last words of a stream cut for looping.
LOOP_NOTE = "\n\n[llproxy: this answer was cut here because it kept repeating itself]"
# What every chunk of a stream repeats (taken from its first chunk).
_HEAD = ("id", "object", "created", "model", "system_fingerprint")


class MendedStream:
    """States: streaming; flushed (the stages gave what they held, at the model's finish
    or `[DONE]`); ended (nothing more: the model's end read, or the stream cut)."""

    def __init__(self, source: Stream, plan: Plan, record: RequestRecord) -> None:
        self.source = source
        self.record = record
        self.mender = Mender(plan, record, plan.think_open)
        self.limits = plan.loops
        self.detectors: dict[str, LoopDetector] = {}
        self.partial = b""  # an event not yet ended
        self.head: dict[str, Any] = {}
        self.next_index = 0  # the index a call made from text gets (after the model's own)
        self.calls = 0
        self.flushed = False
        # Read by the relay after every chunk: an attribute, not a property (a call each);
        # only this class sets it.
        self.ended = False
        # The bytes around the text of the last text-only chunk, and its member.
        self.template: tuple[bytes, bytes, str] | None = None
        self.looped = False  # found by `_passes`: the event read whole is cut
        self.fed = False
        self.fed_read = False  # the event's text went to the detector with its run's
        self.clean = True  # every event of this read's output checked (`Checked`)

    async def first(self, chunk: bytes) -> bytes:
        """The mended stream's first chunk (the reply's body): reads on while the stages
        hold everything, so a stream never starts empty."""
        out = self._read(chunk)
        while not out and not self.ended:
            out = self._read(await self.source.next())
        return out

    async def next(self) -> bytes:
        while not self.ended:
            out = self._read(await self.source.next())
            if out:
                return out
        return b""

    def close(self) -> None:
        self.source.close()

    def _read(self, chunk: bytes) -> bytes:
        if (
            self.template is not None
            and not self.partial
            and chunk.find(END) == len(chunk) - 2 > 0
            and chunk.find(b"\r") < 0  # find, not `in` (core/sse.py says why)
            and not self.source.ended
        ):
            # One whole event per read, as a model's server writes them at its pace: told
            # by `_passes` alone, as `_events` would tell it, without the machinery for
            # many (3.1 → 1.4 µs an event, measured).
            self.clean = True
            event = chunk[:-2]
            if self._passes(event):
                return Checked(chunk)
            one: list[bytes] = []
            self._event(event, one)
            return Checked(b"".join(one)) if self.clean else b"".join(one)
        out: list[bytes] = []
        self.clean = True
        if chunk:
            data = self.partial + chunk if self.partial else chunk
            if data.find(b"\r") >= 0:
                data = data.replace(b"\r\n", b"\n")
            cut = data.rfind(END) + 2  # 1 when there is no end: nothing complete
            complete, self.partial = (data[:cut], data[cut:]) if cut > 1 else (b"", data)
            self._events(complete, out)
            if self.ended:
                return Checked(b"".join(out)) if self.clean else b"".join(out)
        if not chunk or self.source.ended:
            self._end(out)
        return Checked(b"".join(out)) if self.clean else b"".join(out)

    def _events(self, complete: bytes, out: list[bytes]) -> None:
        """The whole events of a read: a run of them at once where they are shaped like
        the last text chunk and pass (`_run`), the others one by one; those that pass
        unchanged go on as the bytes they came in."""
        tried = None  # the template the rest of the read was last tried with
        fed = 0  # the events before this offset had their texts fed to the detector
        start = at = 0
        size = len(complete)
        while at < size:
            self.fed_read = at < fed
            if self.template is not None and self.template is not tried and not self.fed_read:
                tried = self.template
                taken, fed = self._run(complete, at)
                if taken:
                    at += taken
                    continue
            end = complete.find(END, at)
            event = complete[at:end]
            if event and not self._passes(event):
                out.append(complete[start:at])
                self._event(event, out)
                start = end + 2
                if self.ended:
                    return
            at = end + 2
        out.append(complete[start:at])

    def _run(self, complete: bytes, at: int) -> tuple[int, int]:
        """How many bytes from `at` on pass as they came, told at once where they are
        events shaped like the last text chunk (up to the last such event of the read:
        a model's server writes many at once, its finish and `[DONE]` after them): their
        texts cut out together, in a few byte operations, whatever their number. Also
        where the texts fed to the loop detector end (they are not fed again)."""
        assert self.template is not None
        head, tail, member = self.template
        end = complete.rfind(tail + END) + len(tail) + 2
        if end - at < len(head) + len(tail) + 2 or not complete.startswith(head, at):
            return 0, at  # none, or one event whose bytes overlap the template's by a quote
        # The texts: what lies between the template's bytes, decoded as one array with a
        # line end between each two (`TextTemplate.texts`). Any other event among them
        # leaves a line end inside a string, and a text that is not exactly one JSON
        # string breaks the array or its count: then the events are read one by one.
        seam = tail + END + head
        raw = complete[at + len(head) : end - len(tail) - 2]
        texts = json_document(b'["' + raw.replace(seam, b'",\n"') + b'"]')
        if type(texts) is not list or len(texts) != raw.count(seam) + 1:
            return 0, at
        text = "".join(texts)
        fed = at
        if self.limits is not None and text:
            fed = end  # read event by event from here: not fed again
            if self._detector(member).feed(text):
                self.looped = True
                return 0, fed
        if not (self.mender.passes(text) if member == "content" else self.mender.show):
            return 0, fed
        return end - at, fed

    def _detector(self, member: str) -> LoopDetector:
        detector = self.detectors.get(member)
        if detector is None:
            assert self.limits is not None
            detector = self.detectors[member] = LoopDetector(self.limits)
        return detector

    def _passes(self, event: bytes) -> bool:
        """Whether an event goes on unchanged, told from its bytes where it is shaped
        like the last text chunk (most are): only its text is cut out, no JSON decoded."""
        template = self.template
        self.fed = False
        if self.looped or template is None:
            return False
        if not (event.startswith(template[0]) and event.endswith(template[1])):
            return False
        if len(event) < len(template[0]) + len(template[1]):
            return False
        text = string_text(event[len(template[0]) : len(event) - len(template[1])])
        if text is None:
            return False  # not one JSON string: decoded whole
        member = template[2]
        if self.limits is not None and text and not self.fed_read:
            # The detector is made once: looked up here, as every chunk does, without a call.
            detector = self.detectors.get(member) or self._detector(member)
            self.fed = True  # its text is in the detector: not fed again if read whole
            if detector.feed(text):
                self.looped = True
                return False  # cut where the event is read whole
        return self.mender.passes(text) if member == "content" else self.mender.show

    def _end(self, out: list[bytes]) -> None:
        """The model's stream ended: a last event without its end is read when it is
        whole, else passed on as it came (the relay tells the client it was cut)."""
        rest, self.partial = self.partial, b""
        cut = b""
        if rest.strip():
            if isinstance(json_document(_data(rest.strip())), dict):
                self._event(rest.strip(), out)
            else:
                cut = rest
                self.clean = False  # the relay tells the client the stream was cut
        if not self.ended:
            self._flush(out)
        out.append(cut)
        self.ended = True

    def _event(self, event: bytes, out: list[bytes]) -> None:
        fed, self.fed = self.fed or self.fed_read, False
        data = _data(event)
        if data == b"[DONE]":
            self._flush(out)
            out.append(event + END)
            return
        document = json_document(data) if data else None
        choices = document.get("choices") if isinstance(document, dict) else None
        if (
            not isinstance(choices, list)
            or len(choices) != 1
            or not isinstance(choice := choices[0], dict)
            or not isinstance(delta := choice.get("delta"), dict)
        ):
            out.append(event + END)  # not a one-choice chunk: as it came
            if data and not (isinstance(document, dict) and chunk_problem(document) is None):
                self.clean = False  # not JSON, or malformed: the relay's to drop or end on
            return
        assert isinstance(document, dict)
        if chunk_problem(document) is not None:
            out.append(event + END)  # malformed: the dialect's reader ends the stream on it
            self.clean = False
            return
        if not self.head:
            self.head = {key: document[key] for key in _HEAD if key in document}
        added = only_text(choice)
        if added is not None and not self.looped:
            # A text chunk, as most are: its bytes are the template of those after it.
            member, text = added
            if self.limits is not None and not fed and self._detector(member).feed(text):
                self._cut(document, out)
                return
            self.template = _template(event, member, text)
            if self.mender.passes(text) if member == "content" else self.mender.show:
                out.append(event + END)
            else:
                self._mended(event, document, choice, delta, out)
            return
        native = delta.get("tool_calls")
        if isinstance(native, list):
            for fragment in native:
                index = fragment.get("index") if isinstance(fragment, dict) else None
                if isinstance(index, int):
                    self.next_index = max(self.next_index, index + 1)
        if self.looped or (self.limits is not None and not fed and self._loops(delta)):
            self._cut(document, out)
            return
        self._mended(event, document, choice, delta, out)

    def _loops(self, delta: dict[str, Any]) -> bool:
        assert self.limits is not None
        for member in TEXT_MEMBERS:
            text = delta.get(member)
            if type(text) is str and text and self._detector(member).feed(text):
                return True
        return False

    def _mended(
        self,
        event: bytes,
        document: dict[str, Any],
        choice: dict[str, Any],
        delta: dict[str, Any],
        out: list[bytes],
    ) -> None:
        items: list[Item] = []
        rest: dict[str, Any] = {}
        for key, value in delta.items():
            if key in REASONING:
                if self.mender.show and value:
                    items.append((key, value))  # a delta's reasoning comes before its text
            elif key != "content":
                rest[key] = value  # the role, the model's own tool calls, …
        content = delta.get("content")
        if isinstance(content, str) and content:
            items += self.mender.content(content)
        finish = choice.get("finish_reason")
        if finish is not None and not self.flushed:
            items += self.mender.finish()
            self.flushed = True
        deltas = self._deltas(items)
        if finish is not None and self.calls and finish != "length":
            finish = "tool_calls"
        texts = any(isinstance(delta.get(key), str) and delta[key] for key in TEXT_MEMBERS)
        if not texts and not deltas and finish == choice.get("finish_reason"):
            out.append(event + END)  # no text, nothing held or made: as it came (its usage)
            return
        if rest:
            if deltas and not set(rest) & set(deltas[0]):
                deltas[0] = {**rest, **deltas[0]}  # one event stays one where it can
            else:
                deltas.insert(0, rest)
        extra = {k: v for k, v in choice.items() if k not in ("index", "delta", "finish_reason")}
        if not deltas:
            if finish is None and not any(extra.values()):
                return  # all held
            deltas = [{}]
        self._emit(document, deltas, finish, extra, out)

    def _deltas(self, items: list[Item]) -> list[dict[str, Any]]:
        """Items as deltas: texts of one member joined, each call a delta of its own."""
        deltas: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, ToolCall):
                call = {**item.as_message_call(), "index": self.next_index}
                self.next_index += 1
                self.calls += 1
                deltas.append({"tool_calls": [call]})
                continue
            member, text = item
            if not text:
                continue
            last = deltas[-1] if deltas else None
            if last is None or "tool_calls" in last:
                deltas.append({member: text})
            elif member in last:
                if list(last)[-1] == member:
                    last[member] += text
                else:
                    deltas.append({member: text})
            elif member == "content" or "content" not in last:
                last[member] = text  # reasoning then content: one delta, as it came
            else:
                deltas.append({member: text})
        return deltas

    def _emit(
        self,
        document: dict[str, Any],
        deltas: list[dict[str, Any]],
        finish: str | None,
        extra: dict[str, Any],
        out: list[bytes],
    ) -> None:
        """One event per delta; the last carries the finish, the choice's other members
        and the chunk's own (usage)."""
        top = {k: v for k, v in document.items() if k != "choices"}
        head = {k: v for k, v in top.items() if k != "usage"}
        last = len(deltas) - 1
        for i, delta in enumerate(deltas):
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            if i == last:
                choice |= extra
            choice["finish_reason"] = finish if i == last else None
            chunk = {**(top if i == last else head), "choices": [choice]}
            out.append(b"data: " + orjson.dumps(chunk) + END)

    def _flush(self, out: list[bytes]) -> None:
        """What the stages still hold, at the end of a stream that gave no finish."""
        if self.flushed:
            return
        self.flushed = True
        if not self.mender.holding():
            return
        deltas = self._deltas(self.mender.finish())
        if deltas:
            self._emit(self.head, deltas, "tool_calls" if self.calls else None, {}, out)

    def _cut(self, document: dict[str, Any], out: list[bytes]) -> None:
        """A loop: the model is stopped at once, and the client's answer ends here, with
        a note saying why and a `length` stop."""
        self.record.cut = "loop"
        self.source.close()
        items = self.mender.finish() if not self.flushed else []
        self.flushed = True
        items.append(("content", LOOP_NOTE))
        self._emit(self.head or document, self._deltas(items), "length", {}, out)
        out.append(b"data: [DONE]" + END)
        self.ended = True


def _template(event: bytes, member: str, text: str) -> tuple[bytes, bytes, str] | None:
    """The bytes of a one-line text chunk before and after its text, where the text is
    written as orjson writes it and its member occurs once."""
    bounds = text_bounds(event, member, text)
    return None if bounds is None else (*bounds, member)


def _data(event: bytes) -> bytes:
    """The joined `data:` lines of one event (without its end)."""
    if event.startswith(b"data: ") and event.find(b"\n") < 0:
        return event[6:]
    lines = event.split(b"\n")
    return b"".join(line[5:].strip() for line in lines if line.startswith(b"data:"))

"""The OpenAI stream's relays check events by template (`EventCheck`): whatever the events
and however they are cut into reads, the client gets exactly what checking each event on
its own gives: every JSON chunk, no chunk that is not JSON, and nothing from the first
chunk of the wrong shape on."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llproxy.core.mend import LoopLimits, Plan
from llproxy.core.mend.stream import MendedStream
from llproxy.core.record import RequestRecord
from llproxy.core.shape import chunk_problem
from llproxy.core.sse import Checked, ChoiceReader, EventRelay, PassThrough, model_rename

from .test_choice_reader import encode, tricky_text


def llama_chunk(text: str, created: int = 1) -> dict[str, Any]:
    """A chunk in the shape llama.cpp's server writes."""
    return {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": text}}],
        "created": created,
        "id": "chatcmpl-x",
        "model": "m",
        "object": "chat.completion.chunk",
    }


HEAD, _, TAIL = encode(llama_chunk("\x00"), "compact").partition(b"\\u0000")


def with_raw_text(raw: bytes) -> bytes:
    """A chunk alike the others but for its text's bytes, which may not be a JSON string."""
    return HEAD + raw + TAIL


# Text bytes that are not one JSON string; in pairs, some would pass a check that joined
# them with `","` into one array (`a\` and `,"c` decode as ['a",', 'c']).
raw_texts = st.sampled_from(
    [b"a\\", b',"c', b'"', b"\\", b"\\u00", b'x","y', b"\xff", b'"}],"x":"', b"\\q", b"\t"]
)
event_bytes = st.one_of(
    st.builds(
        lambda text, style: encode(llama_chunk(text), style),
        tricky_text,
        st.sampled_from(["compact", "compact", "spaced", "go"]),
    ),
    st.builds(lambda text: encode(llama_chunk(text, created=2), "compact"), tricky_text),
    st.builds(with_raw_text, raw_texts),
    st.just(HEAD + TAIL[1:]),  # the template's bytes overlapping by their quote
    st.sampled_from(
        [
            encode(
                {
                    **llama_chunk(""),
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                },
                "compact",
            ),
            encode(
                {**llama_chunk(""), "choices": [{"index": 0, "delta": {"content": 7}}]}, "compact"
            ),
            b'data: {"choices":[{"delta":{"content":"cut',
            b"data: NaN\n\n",
            b": a comment\n\n",
            b"data: [DONE]\n\n",
        ]
    ),
)


def reference(events: list[bytes]) -> tuple[bytes, int, bool]:
    """Each event checked on its own: what passes, how many were dropped, whether a chunk
    of the wrong shape ended the stream."""
    out, dropped = b"", 0
    for event in b"".join(events).split(b"\n\n")[:-1]:
        data = b"".join(
            line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if data and data != b"[DONE]":
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError:
                dropped += 1
                continue
            if not isinstance(document, dict) or chunk_problem(document):
                return out, dropped, True
        out += event + b"\n\n"
    return out, dropped, False


def assert_relays_as_reference(
    relay: PassThrough | EventRelay,
    reads: Iterable[bytes],
    events: list[bytes],
    record: RequestRecord,
) -> None:
    """The relay fed `reads` (until it finds a problem) passes what checking each event
    on its own passes, drops as many, and ends where that ends."""
    out = b""
    for read in reads:
        out += relay.feed(read)
        if relay.problem is not None:
            break
    else:
        out += relay.finish()
    expected, dropped, ended = reference(events)
    assert out == expected
    assert record.dropped_chunks == dropped
    assert (relay.problem is not None) == ended


def whole(events: list[bytes]) -> list[bytes]:
    """Every event ended (a cut one ends where the next begins)."""
    return [event if event.endswith(b"\n\n") else event + b"\n\n" for event in events]


@settings(max_examples=400, deadline=None)
@given(
    events=st.lists(event_bytes, min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=6),
    renamed=st.booleans(),
)
def test_a_relay_passes_exactly_what_checking_each_event_passes(
    events: list[bytes], cuts: list[int], renamed: bool
) -> None:
    events = whole(events)
    stream = b"".join(events)
    record = RequestRecord()
    relay: PassThrough | EventRelay = (
        EventRelay(record, model_rename("m", "m"), hide_usage=False)
        if renamed
        else PassThrough(record, shaped=True)
    )
    bounds = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    reads = (stream[start:end] for start, end in itertools.pairwise(bounds))
    assert_relays_as_reference(relay, reads, events, record)


def test_two_broken_texts_that_would_decode_together_are_dropped() -> None:
    # Alike the chunk before but for their texts, `a\` and `,"c`: joined by `","` into
    # one array they decode as two strings; neither event is JSON.
    good = encode(llama_chunk("hi"), "compact")
    broken = with_raw_text(b"a\\") + with_raw_text(b',"c')
    record = RequestRecord()
    relay = PassThrough(record, shaped=True)
    assert relay.feed(good + broken) + relay.finish() == good
    assert record.dropped_chunks == 2
    # The translated dialects' reader reads no text from them either.
    record = RequestRecord()
    reader = ChoiceReader(record)
    choices, failure = reader.feed(good + broken)
    assert failure is None
    assert [choice["delta"]["content"] for choice in choices] == ["hi"]
    assert record.dropped_chunks == 2


def test_an_event_that_overlaps_the_templates_bytes_is_dropped() -> None:
    # It starts with the bytes before the template's text and ends with those after it,
    # sharing their quote: no text between, and not JSON.
    good = encode(llama_chunk("hi"), "compact")
    record = RequestRecord()
    relay = PassThrough(record, shaped=True)
    assert relay.feed(good) + relay.feed(HEAD + TAIL[1:]) + relay.finish() == good
    assert record.dropped_chunks == 1


class _Read:
    """A model's stream already read, for a mended stream fed by hand."""

    def __init__(self) -> None:
        self.ended = False

    async def next(self) -> bytes:
        return b""

    def close(self) -> None:
        """Nothing to stop."""


# Loop detection on (every text read), no loop these texts could make: text passes as it is.
WATCHING = Plan({}, False, False, True, LoopLimits(min_span=2000, repeats=8, max_span=2000))


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(event_bytes, min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=6),
    renamed=st.booleans(),
)
def test_a_mended_stream_through_a_relay_passes_exactly_what_checking_each_event_passes(
    events: list[bytes], cuts: list[int], renamed: bool
) -> None:
    """The relay passes the reads the mending stage says it checked (`Checked`) without
    checking them again: the stage must drop, count and end on exactly what the relay
    would (two broken texts that decode together, a raw control byte, a cut event)."""
    events = whole(events)
    stream = b"".join(events)
    record, source = RequestRecord(), _Read()
    mended = MendedStream(source, WATCHING, record)
    relay: PassThrough | EventRelay = (
        EventRelay(record, model_rename("m", "m"), hide_usage=False)
        if renamed
        else PassThrough(record, shaped=True)
    )
    bounds = sorted({0, *(min(cut, len(stream)) for cut in cuts), len(stream)})

    def reads() -> Iterator[bytes]:
        for start, end in itertools.pairwise(bounds):
            source.ended = end == len(stream)
            yield mended._read(stream[start:end])

    assert_relays_as_reference(relay, reads(), events, record)


def test_a_read_the_mending_stage_checked_is_not_decoded_again() -> None:
    texts = [encode(llama_chunk(text), "compact") for text in ("Hel", "lo", ", wor", "ld")]
    record, source = RequestRecord(), _Read()
    mended = MendedStream(source, WATCHING, record)
    relay = PassThrough(record, shaped=True)
    first = mended._read(texts[0])
    rest = mended._read(b"".join(texts[1:]))
    assert type(first) is Checked and type(rest) is Checked
    assert relay.feed(first) + relay.feed(rest) == b"".join(texts)
    # The relay learnt no template and checked nothing by one: it decoded none of them.
    assert relay.check.template is None and relay.check.templated == 0
    # A read with a chunk that is not JSON is the relay's to check (and drop).
    broken = with_raw_text(b"a\\")
    out = mended._read(broken + texts[0])
    assert type(out) is not Checked
    assert relay.feed(out) == texts[0] and record.dropped_chunks == 1


@pytest.mark.parametrize(
    "broken",
    [
        [b"\t"],  # a raw control byte: no JSON string holds it
        [b"a\\", b'"b'],  # each broken, yet `a\"b` joined is one JSON string
        [b"a\\", b',"c'],
        [b""],  # with the template's bytes overlapping by their quote (below)
    ],
)
@pytest.mark.parametrize("apart", [False, True], ids=["one-read", "reads-apart"])
def test_broken_texts_after_a_good_chunk_are_dropped_by_the_mending_stage_too(
    broken: list[bytes], apart: bool
) -> None:
    good = encode(llama_chunk("hi"), "compact")
    events = [with_raw_text(raw) for raw in broken]
    if broken == [b""]:
        events = [HEAD + TAIL[1:]]
    record, source = RequestRecord(), _Read()
    mended = MendedStream(source, WATCHING, record)
    relay = PassThrough(record, shaped=True)
    out = relay.feed(mended._read(good))
    reads = [[event] for event in events] if apart else [events]
    for read in reads:
        out += relay.feed(mended._read(b"".join([*read, good])))
    source.ended = True
    out += relay.feed(mended._read(b"")) + relay.finish()
    assert out == good * (1 + len(reads))
    assert record.dropped_chunks == len(events)


def test_text_chunks_before_a_finish_pass_at_once_and_a_loop_among_them_is_cut() -> None:
    finish = encode(
        {**llama_chunk(""), "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        "compact",
    )
    done = b"data: [DONE]\n\n"
    first = encode(llama_chunk("Sure."), "compact")
    texts = b"".join(encode(llama_chunk(f" word{i}"), "compact") for i in range(20))
    record, source = RequestRecord(), _Read()
    mended = MendedStream(source, WATCHING, record)
    mended._read(first)
    source.ended = True
    out = mended._read(texts + finish + done)
    assert out == texts + finish + done and type(out) is Checked
    # The same read, looping: cut where it is found, the model stopped, `length` its stop.
    record, source = RequestRecord(), _Read()
    looping = Plan({}, False, False, True, LoopLimits(min_span=12, repeats=4, max_span=100))
    mended = MendedStream(source, looping, record)
    mended._read(first)
    source.ended = True
    loop = b"".join(encode(llama_chunk(" again and again"), "compact") for _ in range(20))
    out = mended._read(loop + finish + done)
    assert record.cut == "loop" and b'"finish_reason":"length"' in out
    assert out.endswith(done) and len(out) < len(loop)

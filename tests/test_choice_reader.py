"""The chat-stream reader under the translated dialects: whatever the bytes look like and
however they are cut into reads, the choices it gives carry exactly the text, tool calls
and stops the model's server sent, in order."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from llproxy.core.record import RequestRecord
from llproxy.core.sse import ChoiceReader

TEXT_MEMBERS = ("content", "reasoning_content", "reasoning")

# Text that is hard to cut out of JSON: quotes, backslashes, line ends, the array's own
# separator, what looks like the chunk's structure, and text outside ASCII.
tricky_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ['"', "\\", '\\"', "\n", '","', '"},"', '"content":"', "\\u0041", "é", "</a>", "日本", ""]
    ),
)

text_delta = st.builds(
    lambda member, text, role: {"role": "assistant", member: text} if role else {member: text},
    st.sampled_from(TEXT_MEMBERS),
    tricky_text,
    st.booleans(),  # Ollama names the role in every delta
)
other_delta = st.sampled_from(
    [
        {"role": "assistant", "content": ""},
        {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {"content": "both", "reasoning_content": "at once"},
    ]
)
chunk_shape = st.tuples(st.one_of(text_delta, other_delta), st.sampled_from([None, None, "stop"]))


def encode(document: dict[str, Any], style: str) -> bytes:
    """One chunk as servers write them: compact (llama.cpp, vLLM), spaced with ASCII
    escapes (Python's json), or with Go's HTML escapes."""
    if style == "compact":
        data = orjson.dumps(document)
    elif style == "spaced":
        data = json.dumps(document).encode()
    else:
        data = (
            json.dumps(document, separators=(",", ":"), ensure_ascii=False)
            .replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .encode()
        )
    return b"data: " + data + b"\n\n"


def merged(items: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """Adjacent texts of one member as one: what joining may do, and all it may do."""
    out: list[tuple[str, Any, Any]] = []
    for kind, value, finish in items:
        if kind != "other" and out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + value, None)
        else:
            out.append((kind, value, finish))
    return out


def as_items(choices: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """Each choice as (member, text) when it only adds text (a role of `assistant` beside
    the text changes nothing), else as ("other", delta, finish reason)."""
    items = []
    for choice in choices:
        delta, finish = choice["delta"], choice.get("finish_reason")
        text_members = {k: v for k, v in delta.items() if not (k == "role" and v == "assistant")}
        if len(text_members) == 1 and next(iter(text_members)) in TEXT_MEMBERS and not finish:
            ((member, text),) = text_members.items()
            items.append((member, text, None))
        else:
            items.append(("other", delta, finish))
    return items


@settings(max_examples=300, deadline=None)
@given(
    shapes=st.lists(chunk_shape, min_size=1, max_size=25),
    style=st.sampled_from(["compact", "spaced", "go"]),
    created_changes=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
)
def test_every_text_arrives_once_in_order(
    shapes: list[tuple[dict[str, Any], str | None]],
    style: str,
    created_changes: bool,
    cuts: list[int],
) -> None:
    chunks = [
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000 + (i // 3 if created_changes else 0),
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        for i, (delta, finish) in enumerate(shapes)
    ]
    usage = {
        "id": "chatcmpl-1",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 7},
    }
    stream = b"".join(encode(chunk, style) for chunk in [*chunks, usage]) + b"data: [DONE]\n\n"
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    record = RequestRecord()
    reader = ChoiceReader(record)
    choices: list[dict[str, Any]] = []
    for start, end in itertools.pairwise(bounds):
        read, failure = reader.feed(stream[start:end])
        assert failure is None
        choices += read
    rest, failure = reader.rest()
    assert failure is None and rest == []
    expected = as_items([chunk["choices"][0] for chunk in chunks])
    assert merged(as_items(choices)) == merged(expected)
    assert (record.prompt_tokens, record.completion_tokens) == (3, 7)


def test_a_read_of_alike_chunks_is_one_choice_with_their_text() -> None:
    def chunk(text: str) -> bytes:
        document = {
            "id": "x",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
        return b"data: " + orjson.dumps(document) + b"\n\n"

    reader = ChoiceReader(RequestRecord())
    words = ["say ", '"hi"', "\\n is not ", "a line\n", "日本", '","', ""]
    choices, failure = reader.feed(b"".join(chunk(word) for word in words))
    assert failure is None
    assert choices == [{"index": 0, "delta": {"content": "".join(words)}, "finish_reason": None}]
    # The next read of the same stream: alike too, read without decoding each event.
    choices, _ = reader.feed(chunk("a") + chunk("b"))
    assert choices == [{"index": 0, "delta": {"content": "ab"}, "finish_reason": None}]


def test_an_event_alike_but_for_an_extra_member_is_read_whole() -> None:
    """Bytes around the text equal the template's, but what lies between is not one
    string: the event is decoded whole and its extra member is not lost."""
    head = b'data: {"choices":[{"index":0,"delta":{"content":"'
    tail = b'"},"finish_reason":null}]}\n\n'
    sneaky = head + b'a","reasoning_content":"b' + tail
    reader = ChoiceReader(RequestRecord())
    choices, failure = reader.feed(head + b"first" + tail + sneaky + head + b"last" + tail)
    assert failure is None
    assert [choice["delta"] for choice in choices] == [
        {"content": "first"},
        {"content": "a", "reasoning_content": "b"},
        {"content": "last"},
    ]
    # Not JSON, though its texts would make two strings: dropped, as any event that is not.
    broken = head + b'x","y' + tail
    choices, failure = reader.feed(broken + head + b"z" + tail)
    assert failure is None
    assert [choice["delta"] for choice in choices] == [{"content": "z"}]


def test_an_error_event_after_alike_chunks_ends_the_read() -> None:
    head = b'data: {"choices":[{"index":0,"delta":{"content":"'
    tail = b'"},"finish_reason":null}]}\n\n'
    error = b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
    reader = ChoiceReader(RequestRecord())
    choices, failure = reader.feed(
        head + b"a" + tail + head + b"b" + tail + error + head + b"c" + tail
    )
    assert [choice["delta"] for choice in choices] == [{"content": "ab"}]
    assert failure is not None and orjson.loads(failure)["error"]["message"] == "boom"


def test_ollama_chunks_that_name_the_role_each_time_are_joined() -> None:
    def chunk(text: str) -> bytes:
        delta = {"role": "assistant", "content": text}
        document = {
            "id": "chatcmpl-1",
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"

    reader = ChoiceReader(RequestRecord())
    choices, failure = reader.feed(b"".join(chunk(word) for word in ("It ", "is ", "<4>")))
    assert failure is None
    assert [choice["delta"] for choice in choices] == [
        {"role": "assistant", "content": "It is <4>"}
    ]

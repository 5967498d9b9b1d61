"""Wire-level validators for the client dialects llproxy serves.

Written from /work/shared/dialects.md (sections 1.5-1.8, 2.3-2.6, 3.2-3.3) and the SDK
stream helpers, not from translator code, so they can judge the translators. Stream
validators take the raw body bytes, raise AssertionError naming the first violation, and
return the parsed events.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

ANTHROPIC_STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal")
_RANK = {"thinking": 0, "redacted_thinking": 0, "text": 1, "tool_use": 2}
_DELTAS = {  # block type -> allowed delta types -> the delta's string field
    "text": {"text_delta": "text"},
    "thinking": {"thinking_delta": "thinking", "signature_delta": "signature"},
    "tool_use": {"input_json_delta": "partial_json"},
}
_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
_STATS: tuple[str, ...] = ("total_duration", "load_duration", "prompt_eval_count")
_STATS += ("prompt_eval_duration", "eval_count", "eval_duration")
NONEMPTY = object()  # _shape spec: a non-empty string


def _check(cond: object, msg: str) -> None:
    """Raise AssertionError even under `python -O`, unlike a bare assert."""
    if not cond:
        raise AssertionError(msg)


def _is_int(v: object) -> bool:
    """JSON ints only; bool is an int subclass in Python but not on the wire."""
    return isinstance(v, int) and not isinstance(v, bool)


def _obj(v: object, where: str) -> dict[str, Any]:
    _check(isinstance(v, dict), f"{where} missing or not an object: {v!r:.80}")
    return v  # type: ignore[return-value]


def _shape(d: object, where: str, **spec: object) -> dict[str, Any]:
    """Check fields: a type means isinstance (int excludes bool), NONEMPTY a non-empty
    string, anything else equality. One line per object instead of one per field."""
    obj = _obj(d, where)
    for key, want in spec.items():
        v = obj.get(key)
        if want is NONEMPTY:
            ok, what = isinstance(v, str) and v != "", "a non-empty string"
        elif isinstance(want, type):
            ok, what = isinstance(v, want) and (want is not int or _is_int(v)), want.__name__
        else:
            ok, what = v == want, repr(want)
        _check(ok, f"{where}: {key} must be {what}, got {v!r:.80}")
    return obj


def _loads(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise AssertionError(f"{where}: invalid JSON ({e}): {text[:200]!r}") from None


def _sse_frames(raw: bytes) -> list[tuple[str | None, str]]:
    """Split an SSE body into (event, data) frames. ':' lines are keepalive comments,
    which both SDK decoders skip; multi-line data joins with a newline."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    _check(text.endswith("\n\n"), f"SSE body must end with a blank line: {text[-40:]!r}")
    frames: list[tuple[str | None, str]] = []
    for n, block in enumerate(text.split("\n\n")[:-1]):
        event, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            _check(name in ("event", "data", "id", "retry"), f"frame {n}: bad line {line!r}")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        if event is not None or data:
            _check(data, f"frame {n}: event {event!r} without a data line")
            frames.append((event, "\n".join(data)))
    return frames


def _usage(usage: object, where: str, *keys: str) -> dict[str, Any]:
    return _shape(usage, f"{where}: usage", **dict.fromkeys(keys, int))


# --------------------------------------------------------------------- Anthropic


def _check_stop(d: dict[str, Any], where: str) -> None:
    reason, seq = d.get("stop_reason"), d.get("stop_sequence")
    _check(reason in ANTHROPIC_STOP_REASONS, f"{where}: stop_reason {reason!r} not allowed")
    if reason == "stop_sequence":
        _check(isinstance(seq, str) and seq, f"{where}: stop_sequence must name the matched stop")
    else:
        _check(seq is None, f"{where}: stop_sequence must be null, got {seq!r}")


def validate_anthropic_stream(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Check a /v1/messages SSE body: the event order the anthropic SDK helper and
    Claude Code rely on (one open block, contiguous indexes, usage present)."""
    events: list[tuple[str, dict[str, Any]]] = []
    for n, (name, data) in enumerate(_sse_frames(raw)):
        _check(data.strip() != "[DONE]", f"frame {n}: Anthropic streams have no [DONE]")
        _check(name, f"frame {n}: missing 'event:' line (the SDK skips unnamed events)")
        obj = _obj(_loads(data, f"frame {n} ({name})"), f"frame {n} data")
        _check(obj.get("type") == name, f"frame {n}: event {name!r} but type {obj.get('type')!r}")
        events.append((str(name), obj))
    _check(events, "empty stream")
    _check(events[0][0] == "message_start", f"first event must be message_start: {events[0][0]!r}")
    blocks: list[str] = []  # block type per index, in start order
    open_idx: int | None = None
    json_buf, signed, phase = "", False, "blocks"  # phase: blocks -> delta -> end
    for n, (name, ev) in enumerate(events):
        where = f"event {n} ({name})"
        _check(phase != "end", f"{where}: nothing may follow message_stop or error")
        if name == "message_start":
            _check(n == 0, f"{where}: duplicate message_start")
            msg = _shape(ev.get("message"), f"{where}: message", type="message", model=str)
            _shape(msg, f"{where}: message", role="assistant", content=[], stop_reason=None)
            _check(str(msg.get("id")).startswith("msg_"), f"{where}: id must start with 'msg_'")
            _usage(msg.get("usage"), where, "input_tokens", "output_tokens")
        elif name == "ping":
            _check(phase == "blocks", f"{where}: only message_stop may follow message_delta")
        elif name == "error":
            _shape(ev.get("error"), f"{where}: error", type=NONEMPTY, message=str)
            phase = "end"
        elif name == "content_block_start":
            _check(phase == "blocks", f"{where}: content block after message_delta")
            idx, block = ev.get("index"), _obj(ev.get("content_block"), f"{where}: content_block")
            _check(open_idx is None, f"{where}: block {idx} starts while {open_idx} is still open")
            _check(idx == len(blocks), f"{where}: index {idx!r}, expected {len(blocks)}")
            kind = str(block.get("type"))
            _check(kind in _DELTAS, f"{where}: unsupported block type {kind!r}")
            if kind == "tool_use":
                _shape(block, f"{where}: tool_use", id=NONEMPTY, name=NONEMPTY)
                _check(block.get("input") == {}, f"{where}: tool_use start must carry input {{}}")
            else:
                _shape(block, f"{where}: {kind} block", **{kind: str})
            blocks.append(kind)
            open_idx, signed, json_buf = len(blocks) - 1, False, ""
        elif name in ("content_block_delta", "content_block_stop"):
            idx, verb = ev.get("index"), name[14:]
            ok = _is_int(idx) and 0 <= idx < len(blocks)  # type: ignore[operator]
            _check(ok, f"{where}: {verb} for block {idx!r} which was never started")
            _check(idx == open_idx, f"{where}: {verb} for block {idx}, but {open_idx} is open")
            kind = blocks[open_idx]  # type: ignore[index]
            if verb == "stop":
                if kind == "tool_use" and json_buf:
                    args = _loads(json_buf, f"{where}: concatenated input_json_delta")
                    _check(isinstance(args, dict), f"{where}: tool input not a JSON object")
                open_idx = None
                continue
            delta = _obj(ev.get("delta"), f"{where}: delta")
            dtype, allowed = delta.get("type"), _DELTAS[kind]
            _check(dtype in allowed, f"{where}: {dtype!r} inside a {kind} block")
            text = _shape(delta, where, **{allowed[str(dtype)]: str})[allowed[str(dtype)]]
            _check(dtype != "thinking_delta" or not signed, f"{where}: thinking after signature")
            signed = signed or dtype == "signature_delta"
            json_buf += text if dtype == "input_json_delta" else ""
        elif name == "message_delta":
            _check(phase == "blocks", f"{where}: duplicate message_delta")
            _check(open_idx is None, f"{where}: block {open_idx} was never stopped")
            delta = _obj(ev.get("delta"), f"{where}: delta")
            _check_stop(delta, where)
            ok = delta["stop_reason"] != "tool_use" or "tool_use" in blocks
            _check(ok, f"{where}: stop_reason tool_use without a tool_use block")
            _usage(ev.get("usage"), where, "output_tokens")
            phase = "delta"
        elif name == "message_stop":
            _check(phase == "delta", f"{where}: message_stop before message_delta")
            phase = "end"
        else:
            raise AssertionError(f"{where}: unknown event type")
    _check(phase == "end", "stream ended without message_stop (or an error event)")
    return events


def validate_anthropic_message(doc: dict[str, Any]) -> dict[str, Any]:
    """Check a non-streamed Messages answer; Claude Code falls back to it (#13373)."""
    _shape(doc, "message", type="message", role="assistant", model=str, content=list)
    _check(str(doc.get("id")).startswith("msg_"), f"id must start with 'msg_': {doc.get('id')!r}")
    _check(doc["content"], "content must be a non-empty list")
    rank = -1
    for i, block in enumerate(doc["content"]):
        kind = str(_obj(block, f"content[{i}]").get("type"))
        _check(kind in _RANK, f"content[{i}]: unsupported block type {kind!r}")
        _check(_RANK[kind] >= rank, f"content[{i}]: {kind} breaks order thinking, text, tool_use")
        rank = _RANK[kind]
        if kind == "tool_use":
            _shape(block, f"content[{i}]", id=NONEMPTY, name=NONEMPTY)
            _check(isinstance(block.get("input"), dict), f"content[{i}]: input must be an object")
        elif kind != "redacted_thinking":
            _shape(block, f"content[{i}]", **{kind: str})
    _check_stop(doc, "message")
    _check(doc["stop_reason"] != "tool_use" or rank == 2, "stop_reason tool_use without tool_use")
    _usage(doc.get("usage"), "message", "input_tokens", "output_tokens")
    return doc


# --------------------------------------------------------------------- Responses

# Terminal event -> the statuses its response may have. An answer cut at
# max_output_tokens is `incomplete`; llproxy ends it with response.completed all the same,
# because the openai SDK's get_final_response() reads only that event (3.3 of the
# reference), so response.completed may carry either status.
_TERMINAL = {
    "response.completed": ("completed", "incomplete"),
    "response.incomplete": ("incomplete",),
    "response.failed": ("failed",),
}
_FAMILIES = {  # event family -> (item type it needs, verbs)
    "content_part": ("message", "added done"),
    "output_text": ("message", "delta done"),
    "function_call_arguments": ("function_call", "delta done"),
    "reasoning_text": ("reasoning", "delta done"),
    "reasoning_summary_part": ("reasoning", "added done"),
    "reasoning_summary_text": ("reasoning", "delta done"),
}
_ITEM_EVENTS = {f"response.{f}.{v}" for f, (_, vs) in _FAMILIES.items() for v in vs.split()}
_ITEM_EVENTS.add("response.output_item.done")


def _is_error_frame(obj: dict[str, Any]) -> bool:
    """A top-level {"error": {...}} frame; the openai SDK raises APIError on it."""
    return isinstance(obj.get("error"), dict) and "response" not in obj


def _check_item(item: object, where: str, added: bool = False) -> dict[str, Any]:
    """One output item; `added` is the in-progress shape of output_item.added."""
    it = _shape(item, f"{where}: item", id=NONEMPTY)
    kind = it.get("type")
    if kind == "message":
        _shape(it, f"{where}: message", role="assistant", content=[] if added else list)
        for j, part in enumerate(it["content"]):
            ptype = _obj(part, f"{where}: content[{j}]").get("type")
            _check(ptype in ("output_text", "refusal"), f"{where}: content[{j}] type {ptype!r}")
            _check(ptype != "output_text" or isinstance(part.get("text"), str), f"{where}: text")
    elif kind == "function_call":
        _shape(it, f"{where}: function_call", call_id=NONEMPTY, name=NONEMPTY, arguments=str)
        args = it["arguments"]
        _check(not added or args == "", f"{where}: added function_call must have arguments ''")
        parsed = _loads(args, f"{where}: arguments") if args else {}
        _check(isinstance(parsed, dict), f"{where}: arguments must encode a JSON object")
    else:
        _check(kind == "reasoning", f"{where}: item type {kind!r} unsupported")
        _shape(it, f"{where}: reasoning", summary=list)
    return it


def validate_responses_object(doc: dict[str, Any]) -> dict[str, Any]:
    """Check a finished response object (non-streamed answer or terminal event)."""
    _shape(doc, "response", object="response", id=NONEMPTY, model=str, created_at=int, output=list)
    _check(doc.get("status") in ("completed", "incomplete", "failed"), "status is not final")
    for i, item in enumerate(doc["output"]):
        _check_item(item, f"output[{i}]")
    if doc["status"] == "incomplete":
        _shape(doc.get("incomplete_details"), "incomplete_details", reason=NONEMPTY)
    if doc["status"] != "failed":
        u = _usage(doc.get("usage"), "response", "input_tokens", "output_tokens", "total_tokens")
        total = u["input_tokens"] + u["output_tokens"]
        _check(u["total_tokens"] == total, f"usage.total_tokens {u['total_tokens']} != {total}")
    return doc


def _content_event(st: dict[str, Any], t: str, ev: dict[str, Any], where: str) -> None:
    """content_part.* and output_text.* on a message item, by content_index."""
    ci, parts = ev.get("content_index"), st["parts"]
    if t == "response.content_part.added":
        _check(ci == len(parts), f"{where}: content_index {ci!r}, expected {len(parts)}")
        ptype = _obj(ev.get("part"), f"{where}: part").get("type")
        _check(ptype in ("output_text", "refusal"), f"{where}: part type {ptype!r}")
        parts.append({"type": ptype, "text": "", "text_done": False, "done": False})
        return
    ok = _is_int(ci) and 0 <= ci < len(parts)  # type: ignore[operator]
    _check(ok, f"{where}: content_index {ci!r} before content_part.added")
    p = parts[ci]
    _check(not p["done"], f"{where}: content part {ci} already done")
    if t == "response.output_text.delta":
        _check(not p["text_done"], f"{where}: delta after output_text.done")
        p["text"] += _shape(ev, where, delta=str)["delta"]
    elif t == "response.output_text.done":
        _check(ev.get("text") == p["text"], f"{where}: text {ev.get('text')!r} != deltas")
        p["text_done"] = True
    else:
        text_part = p["type"] == "output_text"
        _check(p["text_done"] or not text_part, f"{where}: part done before output_text.done")
        got = _obj(ev.get("part"), f"{where}: part").get("text")
        _check(got == p["text"] or not text_part, f"{where}: part.text {got!r} != deltas")
        p["done"] = True


def _item_event(st: dict[str, Any], t: str, ev: dict[str, Any], where: str) -> None:
    """Apply one event that references an added output item by output_index."""
    kind, iid = st["item"]["type"], st["item"]["id"]
    _check(st["done"] is None, f"{where}: item {ev['output_index']} is already done")
    family = t.split(".")[1]
    _check(_FAMILIES.get(family, (kind,))[0] == kind, f"{where}: {t} on a {kind} item")
    if t != "response.output_item.done":
        _check(ev.get("item_id") == iid, f"{where}: item_id {ev.get('item_id')!r} != {iid!r}")
    if family in ("content_part", "output_text"):
        _content_event(st, t, ev, where)
    elif t == "response.function_call_arguments.delta":
        _check(not st["args_done"], f"{where}: delta after function_call_arguments.done")
        st["args"] += _shape(ev, where, delta=str)["delta"]
    elif t == "response.function_call_arguments.done":
        got = ev.get("arguments")
        _check(got == st["args"], f"{where}: arguments {got!r} != concatenated deltas")
        args = _loads(str(got), f"{where}: arguments")
        _check(isinstance(args, dict), f"{where}: arguments not a JSON object")
        st["args_done"] = True
    elif t.endswith(".delta"):
        _shape(ev, where, delta=str)
    elif t == "response.output_item.done":
        done = _check_item(ev.get("item"), where)
        _check((done["id"], done["type"]) == (iid, kind), f"{where}: id/type differ from added")
        if kind == "message":
            _check(all(p["done"] for p in st["parts"]), f"{where}: content parts still open")
            texts = [p["text"] for p in st["parts"]]
            got = [c.get("text", "") for c in done["content"]]
            _check(got == texts, f"{where}: content {got!r} != streamed {texts!r}")
        elif kind == "function_call":
            _check(st["args_done"], f"{where}: no function_call_arguments.done")
            _check(done["arguments"] == st["args"], f"{where}: arguments differ from deltas")
            same = all(done[k] == st["item"][k] for k in ("call_id", "name"))
            _check(same, f"{where}: call_id/name differ from output_item.added")
        st["done"] = done


def _terminal(ev: dict[str, Any], t: str, items: list[dict[str, Any]], where: str) -> None:
    r = _shape(ev.get("response"), f"{where}: response", output=list)
    _check(r.get("status") in _TERMINAL[t], f"{where}: status {r.get('status')!r} after {t}")
    if t == "response.failed":
        return
    validate_responses_object(r)
    open_ = [i for i, x in enumerate(items) if x["done"] is None]
    _check(not open_, f"{where}: items {open_} were never done")
    got = [(o.get("type"), o.get("id")) for o in r["output"]]
    want = [(x["done"]["type"], x["done"]["id"]) for x in items]
    _check(got == want, f"{where}: output {got} != streamed items {want}")
    for i, x in enumerate(items):
        _check(r["output"][i] == x["done"], f"{where}: output[{i}] != its output_item.done")


def validate_responses_stream(
    raw: bytes, *, allow_interleaved_items: bool = False
) -> list[dict[str, Any]]:
    """Check a /v1/responses SSE body against what openai's ResponseStreamState indexes.
    Items must open one at a time unless allow_interleaved_items (the SDK allows it)."""
    frames = _sse_frames(raw)
    if frames and frames[-1][1].strip() == "[DONE]":
        frames = frames[:-1]  # optional; the openai SDK stops on it
    events: list[dict[str, Any]] = []
    for n, (name, data) in enumerate(frames):
        _check(data.strip() != "[DONE]", f"frame {n}: [DONE] may only be the very last frame")
        obj = _obj(_loads(data, f"frame {n} ({name})"), f"frame {n} data")
        ok = _is_error_frame(obj) or name == obj.get("type")
        _check(ok, f"frame {n}: event {name!r} but data.type {obj.get('type')!r}")
        events.append(obj)
    _check(events, "empty stream")
    items: list[dict[str, Any]] = []  # per output_index: added item, parts, args, done item
    resp_id, last_seq, ended = None, -1, False
    for n, ev in enumerate(events):
        t, seq = str(ev.get("type")), ev.get("sequence_number")
        where = f"event {n} ({t})"
        _check(not ended, f"{where}: nothing may follow the terminal event")
        if _is_error_frame(ev):
            _check(n > 0, "first event must be response.created, got an error frame")
            _shape(ev["error"], f"{where}: error", message=str)
            ok = seq is None or (_is_int(seq) and seq > last_seq)
            _check(ok, f"{where}: sequence_number not increasing")
            ended = True
            continue
        _check(_is_int(seq), f"{where}: sequence_number missing or not an int")
        _check(seq > last_seq, f"{where}: sequence_number {seq} not greater than {last_seq}")  # type: ignore[operator]
        last_seq = seq  # type: ignore[assignment]
        _check(n != 0 or t == "response.created", f"first event must be response.created: {t!r}")
        _check(n != 1 or t == "response.in_progress", "second event must be response.in_progress")
        if t in ("response.created", "response.in_progress"):
            _check(n < 2, f"{where}: duplicate lifecycle event")
            r = _shape(ev.get("response"), f"{where}: response", status="in_progress", output=[])
            _check(resp_id in (None, r.get("id")), f"{where}: response id changed")
            resp_id = _shape(r, f"{where}: response", id=NONEMPTY)["id"]
        elif t == "response.output_item.added":
            idx = ev.get("output_index")
            _check(idx == len(items), f"{where}: output_index {idx!r}, expected {len(items)}")
            item = _check_item(ev.get("item"), where, added=True)
            ok = allow_interleaved_items or all(x["done"] for x in items)
            _check(ok, f"{where}: item added while a previous item is still open")
            items.append({"item": item, "parts": [], "args": "", "args_done": False, "done": None})
        elif t in _ITEM_EVENTS:
            idx = ev.get("output_index")
            _check(_is_int(idx), f"{where}: output_index missing")
            ok = 0 <= idx < len(items)  # type: ignore[operator]
            _check(ok, f"{where}: output_index {idx} before response.output_item.added")
            _item_event(items[idx], t, ev, where)  # type: ignore[index]
        elif t in _TERMINAL:
            _check(_obj(ev.get("response"), where).get("id") == resp_id, f"{where}: id changed")
            _terminal(ev, t, items, where)
            ended = True
        else:
            raise AssertionError(f"{where}: unknown event type")
    _check(ended, "stream ended without response.completed/incomplete/failed or error frame")
    return events


# --------------------------------------------------------------------- Ollama


def _check_ollama(obj: object, where: str, kind: str, final: bool) -> dict[str, Any]:
    """One NDJSON line or a whole non-streamed answer (which is shaped like a final line)."""
    d = _shape(obj, where, model=NONEMPTY, created_at=str)
    _check(_RFC3339.match(d["created_at"]), f"{where}: created_at {d['created_at']!r} not RFC3339")
    if kind == "chat":
        msg = _shape(d.get("message"), f"{where}: message", role="assistant", content=str)
        _check(isinstance(msg.get("thinking", ""), str), f"{where}: message.thinking not a string")
        calls = msg.get("tool_calls", [])
        _check(isinstance(calls, list), f"{where}: tool_calls must be a list")
        for i, call in enumerate(calls):
            fn = _obj(_obj(call, where).get("function"), f"{where}: tool_calls[{i}].function")
            _shape(fn, f"{where}: tool_calls[{i}].function", name=NONEMPTY, arguments=dict)
    else:
        _shape(d, where, response=str)
        _check(isinstance(d.get("thinking", ""), str), f"{where}: thinking not a string")
    _check(d.get("done") is final, f"{where}: done must be {final}, got {d.get('done')!r}")
    if final:
        _shape(d, where, done_reason=NONEMPTY, **dict.fromkeys(_STATS, int))
        _check(all(d[k] >= 0 for k in _STATS), f"{where}: negative duration or count")
    return d


def validate_ollama_stream(raw: bytes, kind: Literal["chat", "generate"]) -> list[dict[str, Any]]:
    """Check an /api/chat or /api/generate NDJSON body the way ollama-python reads it."""
    _check(kind in ("chat", "generate"), f"kind must be chat or generate, got {kind!r}")
    _check(raw.endswith(b"\n"), f"NDJSON body must end with a newline: {raw[-40:]!r}")
    lines = raw.split(b"\n")[:-1]
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines):
        _check(line.strip(), f"line {n}: empty line (ollama-python's json.loads('') fails)")
        obj = _loads(line, f"line {n}")
        if isinstance(obj, dict) and "error" in obj:
            _shape(obj, f"line {n}", error=NONEMPTY)
            _check(n == len(lines) - 1, f"line {n}: nothing may follow an error line")
        else:
            _check_ollama(obj, f"line {n}", kind, final=n == len(lines) - 1)
        out.append(obj)
    return out


def validate_ollama_chat(doc: dict[str, Any]) -> dict[str, Any]:
    """Check a non-streamed /api/chat answer (ChatResponse requires message)."""
    return _check_ollama(doc, "chat", "chat", final=True)


def validate_ollama_generate(doc: dict[str, Any]) -> dict[str, Any]:
    """Check a non-streamed /api/generate answer."""
    return _check_ollama(doc, "generate", "generate", final=True)


def validate_error(dialect: str, raw: bytes) -> str:
    """An error answer's body in its dialect's shape (Anthropic's typed error, Ollama's
    one string, OpenAI's four fields, which the Responses API shares); its message."""
    doc = _obj(_loads(raw, f"{dialect} error"), f"{dialect} error")
    if dialect == "anthropic":
        _shape(doc, "anthropic error", type="error")
        error = _shape(doc.get("error"), "anthropic error.error", type=NONEMPTY, message=str)
        _check(set(error) == {"type", "message"}, f"anthropic error fields: {sorted(error)}")
    elif dialect == "ollama":
        error = _shape(doc, "ollama error", error=str)
        _check(set(error) == {"error"}, f"ollama error fields: {sorted(error)}")
    elif dialect == "gemini":  # Google's error: a code, a message and a status name
        error = _shape(doc.get("error"), "gemini error.error", code=int, message=str, status=str)
        _check(error["status"].isupper(), f"gemini error status: {error['status']!r}")
    else:
        error = _shape(doc.get("error"), f"{dialect} error.error", type=NONEMPTY, message=str)
        _check(
            set(error) == {"message", "type", "param", "code"},
            f"{dialect} error fields: {sorted(error)}",
        )
    message = error.get("message", error.get("error"))
    _check(isinstance(message, str) and message, f"{dialect} error: an empty message")
    return str(message)

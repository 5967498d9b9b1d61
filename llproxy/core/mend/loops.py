"""A stream that repeats itself, found as it grows: the last `min_span` characters are
looked for further back in a bounded window (a C-speed search), and each place they occur
is a candidate period, verified with one slice comparison. A check runs once per
`CHECK_EVERY` new characters, so the cost per token is a fraction of a search, and no
text is ever scanned twice over a window's length (no quadratic rescans)."""

from __future__ import annotations

from dataclasses import dataclass

# New characters between two checks: a loop is found at most this much after it qualifies.
CHECK_EVERY = 32
# Earlier places of the last span tried per check (the nearest may be a shorter repeat
# inside the span, e.g. a run of dashes).
TRIES = 4


@dataclass(frozen=True, slots=True)
class LoopLimits:
    """When a stream counts as looping: a span of at least `min_span` characters (at
    most `max_span`) repeated `repeats` times in a row at its end."""

    min_span: int = 50
    repeats: int = 8
    max_span: int = 2000


class LoopDetector:
    """One text member's loop check (content or reasoning), fed as the text arrives."""

    __slots__ = ("checked", "limits", "pieces", "text", "window_max")

    def __init__(self, limits: LoopLimits) -> None:
        self.limits = limits
        self.pieces: list[str] = []  # text added since the last check
        # The text checked so far: its last `window_max` characters are the window. Kept
        # up to twice that before it is cut, so a check extends it in place instead of
        # copying the whole window every CHECK_EVERY characters (~0.3 µs a chunk, measured).
        self.text = ""
        self.checked = 0  # characters added since the last check
        # The longest stretch a loop at max_span needs, plus the span searched for.
        self.window_max = limits.max_span * limits.repeats + limits.min_span

    def feed(self, text: str) -> bool:
        """Add text; True when the stream now ends in a loop."""
        self.pieces.append(text)
        self.checked += len(text)
        if self.checked < CHECK_EVERY:
            return False
        self.checked = 0
        window, self.text = self.text, ""  # the only reference: `+=` extends it in place
        window += "".join(self.pieces)
        self.pieces.clear()
        if len(window) > 2 * self.window_max:
            window = window[-self.window_max :]
        self.text = window
        return self._looping(window)

    def _looping(self, window: str) -> bool:
        limits = self.limits
        span = limits.min_span
        size = len(window)
        if min(size, self.window_max) < span * limits.repeats:
            return False
        needle = window[-span:]
        # Where the span may occur again: at most max_span before its place (the period
        # is longer otherwise), so the search never looks further back than that (~8x
        # less to search than the whole window by default, measured ~2 µs a check).
        first = max(size - span - limits.max_span, 0)
        end = size - 1
        for _ in range(TRIES):
            at = window.rfind(needle, first, end)
            if at < 0:
                return False
            period = size - span - at
            # The block that repeats: the period, or its first multiple as long as a span.
            block = period * -(-span // period)
            length = block * limits.repeats
            if length <= min(size, self.window_max):
                tail = window[-length:]
                if tail[period:] == tail[:-period]:
                    return True
            end = at + span - 1
        return False

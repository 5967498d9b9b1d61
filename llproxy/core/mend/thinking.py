"""A model's inline reasoning (`<think>…</think>` in its text) split from its answer as the
text streams: reasoning goes out as reasoning, the answer as content, and a tag cut
across chunks is held back only as long as it could still be one.

A block opens only before any other text (models write it first); `opened` says the
block was opened by the chat template in the prompt, so the answer starts inside it and
holds only the closing tag."""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"

# White space an answer may start with before its `<think>`: past it, the block can no
# longer open (a model writing only line ends would have them all held, joined again on
# each read).
MAX_LEAD = 256

Piece = tuple[str, str]  # (member, text): "content" or "reasoning_content"


def held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (cut across
    chunks): they wait for the next piece. Searched from the tag's first character, so
    text without it costs one search."""
    low = max(0, len(text) - len(tag) + 1)
    at = text.find(tag[0], low)
    while at >= 0:  # the leftmost start is the longest suffix
        if tag.startswith(text[at:]):
            return len(text) - at
        at = text.find(tag[0], at + 1)
    return 0


class ThinkSplitter:
    """States: before (nothing but white space so far: a block may open), inside (the
    reasoning), after (the answer: passed through as it comes)."""

    __slots__ = ("held", "state", "trim")

    def __init__(self, opened: bool = False) -> None:
        self.state = "inside" if opened else "before"
        self.held = ""
        self.trim = False  # the white space after a closing tag is not the answer's

    def feed(self, text: str) -> list[Piece]:
        if self.state == "after":
            if self.trim:
                text = text.lstrip()
                self.trim = not text
            return [("content", text)] if text else []
        text = self.held + text
        self.held = ""
        if self.state == "before":
            stripped = text.lstrip()
            if stripped.startswith(OPEN):
                self.state = "inside"
                text = stripped[len(OPEN) :].lstrip("\n")
            elif OPEN.startswith(stripped) and len(text) <= MAX_LEAD:
                self.held = text  # nothing but the tag's start (or white space) yet
                return []
            else:
                self.state = "after"
                return [("content", text)]
        at = text.find(CLOSE)
        if at >= 0:
            self.state = "after"
            out = [("reasoning_content", text[:at])] if at else []
            rest = text[at + len(CLOSE) :].lstrip()
            self.trim = not rest
            return out + ([("content", rest)] if rest else [])
        keep = held_prefix(text, CLOSE)
        if keep:
            self.held, text = text[-keep:], text[:-keep]
        return [("reasoning_content", text)] if text else []

    def finish(self) -> list[Piece]:
        """What is held at the answer's end: a tag's start that never completed."""
        held, self.held = self.held, ""
        if not held:
            return []
        return [("reasoning_content" if self.state == "inside" else "content", held)]

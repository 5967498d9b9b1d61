"""The stages an answer's text goes through, in order: thinking split from the text,
then tool calls made from what is left; the same for a stream and a whole answer."""

from __future__ import annotations

from ..record import RequestRecord
from .plan import Plan
from .thinking import ThinkSplitter
from .toolcalls import ToolCall, ToolCallMender

Item = tuple[str, str] | ToolCall  # (member, text), or a call made from text
REASONING = ("reasoning_content", "reasoning")


class Mender:
    __slots__ = ("show", "think", "tools")

    def __init__(self, plan: Plan, record: RequestRecord, opened: bool) -> None:
        self.think = ThinkSplitter(opened) if plan.thinking else None
        self.tools = ToolCallMender(plan.tools, record) if plan.tools else None
        # Reasoning reaches the client unless the thinking stage is on and the client
        # said it wants none.
        self.show = plan.show_thinking or not plan.thinking

    def passes(self, text: str) -> bool:
        """Whether content text would come out as it went in: no stage holds anything,
        and the text has nothing that could open a tag or a call."""
        think = self.think
        if think is not None:
            if think.state == "before" and not think.held:
                first = text.lstrip()[:1]
                if not first or first == "<":
                    return False
                think.state = "after"  # no block opens after other text: as feeding it would
            if think.state != "after" or think.trim:
                return False
        tools = self.tools
        if tools is None:
            return True
        return (
            tools.state == "text"
            and not tools.held
            and not tools.space
            and "<" not in text
            and "[" not in text
            and "`" not in text
        )

    def holding(self) -> bool:
        """Whether a stage holds text back (so `finish` has something to give)."""
        think, tools = self.think, self.tools
        return (think is not None and bool(think.held)) or (
            tools is not None and (tools.state != "text" or bool(tools.held))
        )

    def content(self, text: str) -> list[Item]:
        pieces = self.think.feed(text) if self.think is not None else [("content", text)]
        return self._calls(pieces)

    def finish(self) -> list[Item]:
        """What the stages held at the answer's end."""
        out = self._calls(self.think.finish()) if self.think is not None else []
        if self.tools is not None:
            out += [("content", o) if isinstance(o, str) else o for o in self.tools.finish()]
        return out

    def _calls(self, pieces: list[tuple[str, str]]) -> list[Item]:
        out: list[Item] = []
        tools = self.tools
        for member, text in pieces:
            if member == "content" and tools is not None:
                out += [("content", o) if isinstance(o, str) else o for o in tools.feed(text)]
            elif member == "content" or self.show:
                out.append((member, text))
        return out

"""What one answer goes through, decided once per request from the switches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..call import Call, JsonPayload
from ..shape import CHAT
from ..values import request_value
from .loops import LoopLimits
from .policy import Repair
from .toolcalls import offered_tools


@request_value
class Plan:
    tools: Mapping[str, Any]  # offered tools by name → schema; empty: no repair
    thinking: bool  # inline thinking split into reasoning
    think_open: bool  # the answer starts inside a thinking block
    show_thinking: bool  # the client may see reasoning (else it is dropped)
    loops: LoopLimits | None  # None: a stream is not watched for loops


def plan_for(call: Call, switches: Repair, show_thinking: bool, limits: LoopLimits) -> Plan | None:
    """The stages on for a chat answer; None when none is (nothing to do)."""
    if call.route != CHAT or not isinstance(call.payload, JsonPayload):
        return None
    tools = offered_tools(call.payload.body) if switches.tool_calls else {}
    loops = limits if switches.loops and call.stream else None
    thinking = bool(switches.thinking)
    if not tools and not thinking and loops is None:
        return None
    return Plan(tools, thinking, bool(switches.think_open), show_thinking, loops)

"""The per-request values (`core/values.py`): frozen to the type checker, and at run time
equal, hashable, slotted and picklable as the frozen dataclasses they replaced."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from llproxy.core.call import Call, JsonPayload
from llproxy.core.ratelimit import Verdict
from llproxy.server.respond import Delivery

ROOT = Path(__file__).resolve().parent.parent


def test_equal_and_hashable_like_a_frozen_dataclass() -> None:
    verdict = Verdict(True, 60, 59, 1.5)
    assert verdict == Verdict(True, 60, 59, 1.5)
    assert verdict != Verdict(True, 60, 58, 1.5)
    assert hash(verdict) == hash(Verdict(True, 60, 59, 1.5))
    assert len({verdict, Verdict(True, 60, 59, 1.5)}) == 1
    # A value holding a dict is unhashable, as a frozen dataclass holding one is.
    with pytest.raises(TypeError):
        hash(Delivery({"X-Test": "1"}))


def test_slotted_replaceable_and_picklable() -> None:
    call = Call("chat/completions", "m:1", JsonPayload({"model": "m:1"}), stream=True)
    assert not hasattr(call, "__dict__")
    moved = dataclasses.replace(call, model="m:2")
    assert (moved.model, moved.stream, call.model) == ("m:2", True, "m:1")
    # A verdict crosses the workers' channel pickled (the overflow counter's answer).
    verdict = Verdict(False, 10, 0, 3.25)
    assert pickle.loads(pickle.dumps(verdict, protocol=pickle.HIGHEST_PROTOCOL)) == verdict


def test_the_type_checker_holds_them_frozen(tmp_path: Path) -> None:
    """What stands in for frozen's run-time guard: mypy refuses an assignment to a field
    (and `make lint` runs mypy on every module)."""
    source = tmp_path / "assigns.py"
    source.write_text(
        "from llproxy.core.values import request_value\n"
        "\n"
        "@request_value\n"
        "class Point:\n"
        "    x: int\n"
        "    y: int = 0\n"
        "\n"
        "point = Point(1)\n"
        "point.x = 2\n"
    )
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            str(source),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert 'assigns.py:9: error: Property "x" defined in "Point" is read-only' in checked.stdout

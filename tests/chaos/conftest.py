"""The chaos suite: slow attack runs against a real daemon, bounded in count and time.

Every test here is marked `chaos` (run by `make chaos`, not `make test`) and reports its
figures through `report`: printed, and kept in tests/artifacts/chaos-report.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPORT = Path(__file__).resolve().parent.parent / "artifacts" / "chaos-report.md"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "chaos" in item.path.parts:
            item.add_marker(pytest.mark.chaos)


@pytest.fixture(scope="session")
def report() -> Iterator[Any]:
    REPORT.parent.mkdir(exist_ok=True)
    lines = [f"# make chaos, {time.strftime('%Y-%m-%d %H:%M')}", ""]

    def say(name: str, **figures: Any) -> None:
        line = f"- **{name}**: " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in figures.items()
        )
        print("\nCHAOS " + line[2:])
        lines.append(line)

    yield say
    REPORT.write_text("\n".join(lines) + "\n")


def worker_pids(master: int) -> list[int]:
    """The master's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sorted(
        int(pid)
        for pid in children
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise AssertionError(f"no {field} for {pid}")

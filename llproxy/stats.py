"""Per-process request counters by model, for the console's `stats` command.

Prometheus holds the daemon-wide totals; these are the plain numbers one worker reports
about itself when the supervisor asks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class ModelStats:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0


class WorkerStats:
    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: asdict(stats) for name, stats in self.models.items()}

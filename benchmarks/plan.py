"""Which runs a benchmark makes, in which order.

Runs are interleaved: for each repeat, for each (data set, N) cell, every configuration runs
once, and the order of configurations rotates from cell to cell, so slow drift of a shared
machine (other jobs, thermal, caches) hits every configuration alike instead of whichever
happens to run last.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

CONFIGS = ("inprocess", "spawn", "forkserver", "deployment")
# Asked for by name only (--configs, --admission): forkserver workers with FL_WORKER_SLOTS=unlimited,
# to compare with the default admission (auto).
EXTRA_CONFIGS = ("forkserver-unlimited",)


def start_and_slots(config: str) -> tuple[str, str]:
    """A Bouquet configuration -> (FL_WORKER_START, FL_WORKER_SLOTS)."""
    start, _, slots = config.partition("-")
    return start, slots or "auto"
DATASETS = ("synthetic", "digits")


@dataclass(frozen=True)
class Run:
    repeat: int
    dataset: str
    clients: int
    config: str

    @property
    def name(self) -> str:
        return f"r{self.repeat}-{self.dataset}-n{self.clients}-{self.config}"


def interleaved(configs: list[str], datasets: list[str], clients: list[int], repeats: int) -> list[Run]:
    runs, cell = [], 0
    for repeat in range(repeats):
        for dataset in datasets:
            for count in clients:
                shift = cell % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    runs.append(Run(repeat, dataset, count, config))
                cell += 1
    return runs


def measure_into(entry: dict[str, Any], measure: Callable[[], tuple[list, dict[str, Any]]], describe: Callable[[dict[str, Any]], str], program: str) -> str | None:
    """Run one configuration into ``entry`` (its rounds and summary, or the error and its
    traceback, so one failed configuration never loses the others); its status line, or None
    when interrupted (the caller writes what was measured so far)."""
    try:
        rounds, summary = measure()
        entry.update(rounds=rounds, summary=summary)
        return describe(summary)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; writing what was measured so far", file=sys.stderr)
        return None
    except Exception as problem:
        entry.update(rounds=[], summary={"error": f"{type(problem).__name__}: {problem}"}, traceback=traceback.format_exc())
        return f"FAILED: {str(problem).splitlines()[0]}"

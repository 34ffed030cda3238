"""Round times from the server's metrics.jsonl, to say which round each sample belongs to.

The server appends a round's line (with its started_at and ended_at) only when the round
ends, so while a round runs its samples cannot be labelled yet; the monitor labels what it
can live and relabels memory.csv once the run is over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from services.files import epoch, read_json_lines

SETUP, ROUND, BETWEEN, AFTER = "setup", "round", "between", "after"


@dataclass(frozen=True)
class Round:
    number: int
    started: float  # seconds since the epoch
    ended: float
    record: dict[str, Any]  # the whole metrics.jsonl line (accuracy, loss, clients, ...)


class RoundLog:
    """Follows metrics.jsonl as it grows; reads only complete lines."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rounds: list[Round] = []
        self._offset = 0

    def refresh(self) -> list[Round]:
        records, self._offset = read_json_lines(self.path, self._offset)
        for record in records:
            self.rounds.append(Round(int(record["round"]), epoch(record["started_at"]), epoch(record["ended_at"]), record))
        return self.rounds


def label(rounds: list[Round], when: float, final: bool) -> tuple[int | None, str]:
    """(round, phase) of a moment. Phases: setup (before round 1 started: round 0), round,
    between (after round N ended, before N+1 started: round N), after (after the last round:
    round N). While the run goes on (final=False) a moment after the last recorded round is
    unknown: (None, "")."""
    if not rounds:
        return (0, SETUP) if final else (None, "")
    if when < rounds[0].started:
        return 0, SETUP
    for index, current in enumerate(rounds):
        if current.started <= when <= current.ended:
            return current.number, ROUND
        following = rounds[index + 1] if index + 1 < len(rounds) else None
        if when > current.ended and (following is None or when < following.started):
            if following is not None:
                return current.number, BETWEEN
            return (current.number, AFTER) if final else (None, "")
    return None, ""


def clients_of(rounds: list[Round]) -> Iterator[dict[str, Any]]:
    """Every client's record of every round (its device and its worker's start and end times:
    what services.admission.records.workers_alive reads)."""
    return (client for current in rounds for client in current.record.get("clients", []))


def settled_slots(rounds: list[Round]) -> dict[str, Any]:
    """The slots per device in force in the last round that recorded them."""
    for current in reversed(rounds):
        if current.record.get("slots_per_device"):
            return dict(current.record["slots_per_device"])
    return {}

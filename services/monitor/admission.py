"""Workers alive per device over time and the slots in force, from the workers' own start and
end times in metrics.jsonl (services.admission records them for every client in every round)."""

from __future__ import annotations

from typing import Any

from services.admission import records
from services.monitor.rounds import Round


def workers_alive(rounds: list[Round]) -> dict[str, list[tuple[float, int]]]:
    """Per device, a step series [(epoch seconds, workers alive from then on), ...] over the run."""
    return records.workers_alive(client for current in rounds for client in current.record.get("clients", []))


def settled_slots(rounds: list[Round]) -> dict[str, Any]:
    """The slots per device in force in the last round that recorded them."""
    for current in reversed(rounds):
        if current.record.get("slots_per_device"):
            return dict(current.record["slots_per_device"])
    return {}

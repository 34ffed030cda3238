"""Workers alive per device over time and the slots in force, from the workers' own start and
end times in metrics.jsonl (services.admission records them for every client in every round)."""

from __future__ import annotations

from typing import Any

from services.monitor.rounds import Round


def workers_alive(rounds: list[Round]) -> dict[str, list[tuple[float, int]]]:
    """Per device, a step series [(epoch seconds, workers alive from then on), ...]."""
    changes: dict[str, list[tuple[float, int]]] = {}
    for current in rounds:
        for client in current.record.get("clients", []):
            device, start, end = client.get("device"), client.get("worker_started_at"), client.get("worker_ended_at")
            if device is None or start is None or end is None:
                continue
            changes.setdefault(device, []).extend([(float(start), 1), (float(end), -1)])
    series = {}
    for device, events in changes.items():
        alive, steps = 0, []
        for when, change in sorted(events, key=lambda e: (e[0], e[1])):
            alive += change
            steps.append((when, alive))
        series[device] = steps
    return series


def settled_slots(rounds: list[Round]) -> dict[str, Any]:
    """The slots per device in force in the last round that recorded them."""
    for current in reversed(rounds):
        if current.record.get("slots_per_device"):
            return dict(current.record["slots_per_device"])
    return {}

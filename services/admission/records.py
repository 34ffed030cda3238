"""Workers alive per device over time, from the start and end times the workers recorded
(metrics.jsonl, per client): what the server's per-round peak and the report's figure read."""

from __future__ import annotations

from typing import Any, Iterable


def workers_alive(clients: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, int]]]:
    """Per device, a step series [(epoch seconds, workers alive from then on), ...]."""
    events: dict[str, list[tuple[float, int]]] = {}
    for client in clients:
        device, start, end = client.get("device"), client.get("worker_started_at"), client.get("worker_ended_at")
        if device is None or start is None or end is None:
            continue
        events.setdefault(device, []).extend([(float(start), 1), (float(end), -1)])
    series = {}
    for device, changes in events.items():
        alive, steps = 0, []
        for when, change in sorted(changes, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
            alive += change
            steps.append((when, alive))
        series[device] = steps
    return series

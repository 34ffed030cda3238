"""Turn one run's round records and memory samples into the numbers the tables report.

Round 1 includes one-off costs (clients joining, partition caches, the forkserver's start),
so round times, worker starts and aggregation times are medians over rounds >= 2 (all
rounds when a run has only one). Memory is per client: *peak* is the highest sampled RSS
(or PSS) of the client's process tree; *idle* is the median over its idle samples taken
after round 1 ended, i.e. once every client has trained: what it holds between rounds.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from benchmarks.trees import Sample

MIB = 2**20


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def steady_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    later = [r for r in rounds if r.get("round", 1) >= 2]
    return later or rounds


def round_end(record: dict[str, Any]) -> float | None:
    if "ended_at_unix" in record:
        return float(record["ended_at_unix"])
    if "ended_at" in record:
        from datetime import datetime

        return datetime.fromisoformat(record["ended_at"]).timestamp()
    return None


def summarize(config: str, rounds: list[dict[str, Any]], samples: list[Sample], gpu: bool) -> dict[str, Any]:
    steady = steady_rounds(rounds)
    clients = [c for r in steady for c in r.get("clients", [])]
    starts = [c.get("worker_start_seconds") for c in clients] if config != "inprocess" else []
    by_member: dict[str, list[Sample]] = {}
    for sample in samples:
        by_member.setdefault(sample.member, []).append(sample)
    client_series = [series for member, series in by_member.items() if member != "server"]
    server_series = by_member.get("server", [])
    after = round_end(rounds[0]) if rounds else None
    summary: dict[str, Any] = {
        "rounds": len(rounds),
        "round_seconds": median(r.get("round_seconds") for r in steady),
        "round_seconds_all": [r.get("round_seconds") for r in rounds],
        "first_round_seconds": rounds[0].get("round_seconds") if rounds else None,
        "worker_start_seconds": median(starts),
        "train_seconds": median(c.get("train_seconds") for c in clients),
        "aggregate_seconds": median(r.get("aggregate_seconds") for r in steady),
        "final_accuracy": rounds[-1].get("accuracy") if rounds else None,
        "clients_failed": sum(int(r.get("clients_failed", 0) or 0) for r in rounds),
        "idle_rss_mib": median(_idle(series, "rss_bytes", after) for series in client_series),
        "idle_pss_mib": median(_idle(series, "pss_bytes", after) for series in client_series),
        "peak_rss_mib": median(_peak(series, "rss_bytes") for series in client_series),
        "peak_pss_mib": median(_peak(series, "pss_bytes") for series in client_series),
        "peak_rss_mib_max": max((_peak(s, "rss_bytes") or 0 for s in client_series), default=None),
        "server_peak_rss_mib": _peak(server_series, "rss_bytes"),
        "server_peak_pss_mib": _peak(server_series, "pss_bytes"),
        "peak_total_rss_mib": _peak_total(samples, "rss_bytes"),  # the whole federation (server + clients) at once
        "peak_total_pss_mib": _peak_total(samples, "pss_bytes"),
        "most_workers_alive": max(_totals(samples, "workers").values(), default=None),
        "samples": len(samples),
    }
    if gpu:
        summary["peak_gpu_mib"] = median(_peak(series, "gpu_bytes") for series in client_series)
        summary["residual_gpu_mib_per_round"] = _residual_per_round(rounds, client_series)
        residual = [v for v in summary["residual_gpu_mib_per_round"] if v is not None]
        summary["residual_gpu_mib"] = max(residual) if residual else None
    return summary


def _totals(samples: list[Sample], field: str) -> dict[float, float]:
    """Per sampling pass (one time stamp), the field summed over members; passes where a member lacks it are left out."""
    totals: dict[float, float] = {}
    missing: set[float] = set()
    for sample in samples:
        value = getattr(sample, field)
        if value is None:
            missing.add(sample.time)
        else:
            totals[sample.time] = totals.get(sample.time, 0) + value
    return {when: value for when, value in totals.items() if when not in missing}


def _peak_total(samples: list[Sample], field: str) -> float | None:
    totals = _totals(samples, field)
    return max(totals.values()) / MIB if totals else None


def _peak(series: list[Sample], field: str) -> float | None:
    values = [getattr(s, field) for s in series if getattr(s, field) is not None]
    return max(values) / MIB if values else None


def _idle(series: list[Sample], field: str, after: float | None) -> float | None:
    if after is None:
        return None
    values = [getattr(s, field) for s in series if s.time >= after and not s.busy and getattr(s, field) is not None]
    return statistics.median(values) / MIB if values else None


def _residual_per_round(rounds: list[dict[str, Any]], client_series: list[list[Sample]]) -> list[float | None]:
    """Device memory the clients still hold while idle after each round (summed over clients)."""
    ends = [round_end(r) for r in rounds]
    residual: list[float | None] = []
    for index, end in enumerate(ends):
        if end is None:
            residual.append(None)
            continue
        until = ends[index + 1] if index + 1 < len(ends) and ends[index + 1] is not None else float("inf")
        held = []
        for series in client_series:
            idle = [s.gpu_bytes for s in series if end <= s.time < until and not s.busy and s.gpu_bytes is not None]
            if idle:
                held.append(statistics.median(idle))
        residual.append(sum(held) / MIB if held else None)
    return residual


def pool(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one cell: the median of each number over the repeats."""
    if len(summaries) == 1:
        return dict(summaries[0])
    pooled: dict[str, Any] = {}
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        if all(isinstance(v, (int, float)) or v is None for v in values):
            pooled[key] = median(values)
        else:
            pooled[key] = values
    return pooled

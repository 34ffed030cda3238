"""memory_summary.json from the recorded samples and the server's round times.

Definitions (docs/monitor.md explains them for users):
- overall memory of a sample: the device rows' used memory (on a GPU what the card has
  allocated; on the host the PSS of the run's processes); per replica: its processes' memory.
- baseline: the last sample before round 1 started (before the first client worker, while no
  round is known yet), leaving out the workers alive in it (the server's evaluation of the
  initial model may just be ending): what the run holds when nothing computes.
- helpers (multiprocessing's resource tracker and forkserver, other subprocesses of a client)
  are left out of baseline and residuals: they start with the first worker, stay for the
  client's life and never touch the GPU (NVML never lists them); memory.csv keeps them, and
  ``helpers`` says what they hold (on the host an idle forkserver that imported torch is a few
  hundred MiB per replica: `docker stats` counts it, so the report shows it as its own figure).
- residual after round N: memory at the first sample at or after the round ended, counting only
  processes that already existed when it ended (a worker of round N+1 that started a few
  milliseconds later is not memory round N left behind), minus the baseline.
- a run the server resumed has one baseline per stretch: after a restart the processes are new
  (a new server; after `down` / `up` new replicas too), so the rounds from the restart on are
  measured against the last sample before the first of them started. A replica whose own
  process is not the one in its stretch's baseline (it joined, or Docker restarted it) is
  measured against the last sample before the first round that started after its process did.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from itertools import groupby
from typing import Any, Iterable

from services.monitor.processes import WORKER_ROLES as WORKERS  # the roles processes.is_worker gives
from services.files import iso
from services.monitor.rounds import Round, label


class Sample:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.t = rows[0]["t"]
        self.devices = [r for r in rows if r["kind"] == "device"]
        self.processes = [r for r in rows if r["kind"] == "process"]

    def _left_out(self, row: dict[str, Any], cutoff: float | None, held: bool, without_workers: bool) -> bool:
        return (
            (cutoff is not None and _newer(row, cutoff))
            or (held and row["role"] == "helper")
            or (without_workers and row["role"] in WORKERS)
        )

    def overall(self, cutoff: float | None = None, held: bool = False, without_workers: bool = False) -> float:
        """Device memory; ``held`` leaves helpers out, ``cutoff`` processes started after it."""
        used = sum(r["memory_mib"] or 0.0 for r in self.devices)
        return used - sum(r["memory_mib"] or 0.0 for r in self.processes if self._left_out(r, cutoff, held, without_workers))

    def by_replica(self, cutoff: float | None = None, held: bool = False, without_workers: bool = False) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for r in self.processes:
            if not self._left_out(r, cutoff, held, without_workers):
                out[r["replica"]] += r["memory_mib"] or 0.0
        return dict(out)

    def workers(self, role: str | None = None, cutoff: float | None = None) -> list[dict[str, Any]]:
        roles = WORKERS if role is None else (role,)
        return [r for r in self.processes if r["role"] in roles and (cutoff is None or not _newer(r, cutoff))]


# Start times come from /proc in clock ticks (10 ms) against a boot time read from /proc/uptime,
# so a worker of the next round started a few milliseconds after a round ended can look older
# than the end. A worker of the round itself started long before its end: it trained, then the
# server aggregated and evaluated. So "started after the end" allows this much slack.
START_TIME_SLACK_S = 0.05


def _newer(row: dict[str, Any], cutoff: float) -> bool:
    return row["started_t"] is not None and row["started_t"] > cutoff - START_TIME_SLACK_S


def samples_of(rows: Iterable[dict[str, Any]]) -> list[Sample]:
    return [Sample(list(group)) for _, group in groupby(rows, key=lambda r: r["sample"])]


def _mib(value: float) -> float:
    return round(value, 1)


def baseline_sample(samples: list[Sample], rounds: list[Round]) -> Sample | None:
    if not samples:
        return None
    start = rounds[0].started if rounds else next((s.t for s in samples if s.workers("worker")), None)
    before = [s for s in samples if start is not None and s.t < start]
    return before[-1] if before else samples[0]


def summarize(rows: list[dict[str, Any]], rounds: list[Round], tolerance_mib: float, restarted_at: Iterable[int] = ()) -> dict[str, Any]:
    """``restarted_at``: the rounds a resumed run continued from (state.json's restarts)."""
    samples = samples_of(rows)
    if not samples:
        return {"samples": 0, "rounds": [], "verdict": {"ok": None, "text": "no samples were recorded: nothing to judge", "tolerance_mib": tolerance_mib}}
    base = baseline_sample(samples, rounds)
    base_overall, base_replicas = base.overall(held=True, without_workers=True), base.by_replica(held=True, without_workers=True)
    baselines = Baselines(samples, rounds, restarted_at)
    peak = max(samples, key=lambda s: s.overall())
    crowded = max(samples, key=lambda s: len(s.workers()))
    held_peak = max(samples, key=lambda s: s.overall(held=True))
    summary: dict[str, Any] = {
        "samples": len(samples),
        "first_sample_at": iso(samples[0].t),
        "last_sample_at": iso(samples[-1].t),
        "baseline": {"at": iso(base.t), "overall_mib": _mib(base_overall), "per_replica_mib": {k: _mib(v) for k, v in sorted(base_replicas.items())}},
        "peak": {
            "at": iso(peak.t), "round": label(rounds, peak.t, final=True)[0], "overall_mib": _mib(peak.overall()),
            "above_baseline_mib": _mib(peak.overall() - base_overall), "without_helpers_mib": _mib(held_peak.overall(held=True)),
        },
        "max_workers_alive": {
            "count": len(crowded.workers()), "client_workers": len(crowded.workers("worker")), "server_workers": len(crowded.workers("server-worker")),
            "at": iso(crowded.t), "round": label(rounds, crowded.t, final=True)[0],
        },
        "helpers": _helpers(samples, base),
        "replicas": _replicas(samples, base.t),
        "rounds": [_round(samples, current, baselines) for current in rounds],
    }
    if len(baselines.stretches) > 1:
        summary["stretches"] = [
            {"from_round": number, "baseline_at": iso(sample.t), "overall_mib": _mib(sample.overall(held=True, without_workers=True))}
            for number, sample in baselines.stretches
        ]
    summary["verdict"] = verdict(summary["rounds"], tolerance_mib)
    return summary


def _helper_mib(sample: Sample) -> float:
    return sum(r["memory_mib"] or 0.0 for r in sample.processes if r["role"] == "helper")


def _helpers(samples: list[Sample], base: Sample) -> dict[str, Any]:
    """What the helpers (idle forkservers, resource trackers) held: at the baseline, at most, at
    the last sample, and how many there were then. Left out everywhere else in the summary."""
    last = samples[-1]
    return {
        "at_baseline_mib": _mib(_helper_mib(base)),
        "max_mib": _mib(max(_helper_mib(s) for s in samples)),
        "last_mib": _mib(_helper_mib(last)),
        "last_processes": sum(1 for r in last.processes if r["role"] == "helper"),
        "last_at": iso(last.t),
        "last_overall_mib": _mib(last.overall()),
    }


def _replicas(samples: list[Sample], since: float) -> dict[str, Any]:
    """Per replica: the range of its long-lived process (flat is good), its peak (its processes
    and workers, helpers left out as in the chart), its helpers' most, and its workers."""
    out: dict[str, Any] = {}
    for sample in samples:
        totals = sample.by_replica(held=True)
        helpers: dict[str, float] = defaultdict(float)
        for row in sample.processes:
            if row["role"] == "helper":
                helpers[row["replica"]] += row["memory_mib"] or 0.0
        for row in sample.processes:
            entry = out.setdefault(
                row["replica"], {"roles": set(), "process_min_mib": None, "process_max_mib": None, "peak_mib": 0.0, "helpers_max_mib": 0.0, "worker_pids": set()}
            )
            entry["roles"].add(row["role"])
            entry["peak_mib"] = max(entry["peak_mib"], totals.get(row["replica"], 0.0))
            entry["helpers_max_mib"] = max(entry["helpers_max_mib"], helpers.get(row["replica"], 0.0))
            if row["role"] in WORKERS:
                entry["worker_pids"].add(row["pid"])
            elif row["role"] in ("client", "server", "pool") and sample.t >= since and row["memory_mib"] is not None:
                low, high = entry["process_min_mib"], entry["process_max_mib"]
                entry["process_min_mib"] = row["memory_mib"] if low is None else min(low, row["memory_mib"])
                entry["process_max_mib"] = row["memory_mib"] if high is None else max(high, row["memory_mib"])
    return {
        name: {
            "roles": sorted(entry["roles"]),
            "process_min_mib": None if entry["process_min_mib"] is None else _mib(entry["process_min_mib"]),
            "process_max_mib": None if entry["process_max_mib"] is None else _mib(entry["process_max_mib"]),
            "peak_mib": _mib(entry["peak_mib"]),
            "helpers_max_mib": _mib(entry["helpers_max_mib"]),
            "workers_seen": len(entry["worker_pids"]),
        }
        for name, entry in sorted(out.items())
    }


OWNERS = ("client", "server")


class Baselines:
    """What each round's residuals are measured against (the module's docstring says how)."""

    def __init__(self, samples: list[Sample], rounds: list[Round], restarted_at: Iterable[int]) -> None:
        self.samples = samples
        self.times = [sample.t for sample in samples]  # in order: samples are taken one after another
        self.starts = sorted(current.started for current in rounds)
        begins = ({rounds[0].number} if rounds else set()) | set(restarted_at)
        self.stretches = [
            (current.number, before) for current in rounds if current.number in begins and (before := self._before(current.started)) is not None
        ]
        if not self.stretches or self.stretches[0][0] != (rounds[0].number if rounds else 0):
            # no sample before the first round (the monitor started late): the first one stands in
            self.stretches.insert(0, (rounds[0].number if rounds else 0, baseline_sample(samples, rounds)))

    def _before(self, when: float) -> Sample | None:
        index = bisect.bisect_left(self.times, when)
        return self.samples[index - 1] if index else None

    def stretch(self, current: Round) -> Sample:
        """The baseline sample of the stretch ``current`` belongs to."""
        return next(sample for number, sample in reversed(self.stretches) if number <= current.number or number == self.stretches[0][0])

    def overall(self, current: Round) -> float:
        return self.stretch(current).overall(held=True, without_workers=True)

    def replicas(self, current: Round, after: Sample) -> tuple[dict[str, float], set[str]]:
        """Per replica: its held memory before its stretch began, or, for a replica whose own
        process started later, before the first round that started after it did. A replica
        whose process started during this round has nothing to compare with: (baselines, those)."""
        base_sample = self.stretch(current)
        out, unjudged = base_sample.by_replica(held=True, without_workers=True), set()
        for replica in after.by_replica():
            started = _owner_started(after, replica)
            if started is None or started < base_sample.t:
                continue
            start = next((start for start in self.starts if start >= started), None)
            base = self._before(start) if start is not None and start <= current.started else None
            if base is None:
                out.pop(replica, None)
                unjudged.add(replica)
            else:
                out[replica] = base.by_replica(held=True, without_workers=True).get(replica, 0.0)
        return out, unjudged


def _owner_started(sample: Sample, replica: str) -> float | None:
    """When the replica's own process (client or server) started, if the sample shows it."""
    return next((row["started_t"] for row in sample.processes if row["replica"] == replica and row["role"] in OWNERS and row["started_t"]), None)


# A round's own workers may still be exiting when it ends: in app mode Flower moves on as soon as
# a message's reply is in, a moment before that worker's process has exited. What the round held
# is read once they are gone (within this grace; a worker alive past it is a worker left).
WORKER_EXIT_GRACE_S = 5.0


def _round(samples: list[Sample], current: Round, baselines: Baselines) -> dict[str, Any]:
    inside = [s for s in samples if current.started <= s.t <= current.ended]
    following = [s for s in samples if s.t >= current.ended]
    after = next(
        (s for s in following if s.t <= current.ended + WORKER_EXIT_GRACE_S and not s.workers(cutoff=current.ended)),
        following[0] if following else None,
    )
    record: dict[str, Any] = {
        "round": current.number,
        "started_at": iso(current.started),
        "ended_at": iso(current.ended),
        "samples": len(inside),
        "peak_mib": _mib(max((s.overall(held=True) for s in inside), default=0.0)),  # helpers left out, as in the chart
        "max_workers_alive": max((len(s.workers()) for s in inside), default=0),
        "worker_pids_seen": sorted({r["pid"] for s in inside for r in s.workers("worker")}),
    }
    if after is None:  # the monitor stopped before this round ended
        record.update(measured_at=None, residual_mib=None, residual_per_replica_mib={}, workers_left=None)
        return record
    held = after.by_replica(cutoff=current.ended, held=True)
    base_replicas, unjudged = baselines.replicas(current, after)
    record.update(
        measured_at=iso(after.t),
        residual_mib=_mib(after.overall(cutoff=current.ended, held=True) - baselines.overall(current)),
        residual_per_replica_mib={name: _mib(held.get(name, 0.0) - base_replicas.get(name, 0.0)) for name in sorted((set(held) | set(base_replicas)) - unjudged)},
        workers_left=len(after.workers(cutoff=current.ended)),
    )
    return record


def verdict(rounds: list[dict[str, Any]], tolerance_mib: float) -> dict[str, Any]:
    """One line a person can act on: all rounds returned, or the first round and replica that did not."""
    measured = [r for r in rounds if r["residual_mib"] is not None]
    if not measured:
        return {"ok": None, "tolerance_mib": tolerance_mib, "text": "no round finished while the monitor was recording: nothing to judge"}
    for record in measured:
        if round_failed(record, tolerance_mib):
            culprits = {name: value for name, value in record["residual_per_replica_mib"].items() if value > tolerance_mib}
            if culprits:
                name, value = max(culprits.items(), key=lambda item: item[1])
                what = f"{name} held {value:.0f} MiB above its baseline"
            elif record["workers_left"]:
                what = f"{record['workers_left']} worker(s) of the round were still alive"
            else:
                what = f"the device held {record['residual_mib']:.0f} MiB above baseline ({replicas_in(record)} replica(s))"
            others = [r["round"] for r in measured if r is not record and round_failed(r, tolerance_mib)]
            tail = f"; also rounds {', '.join(map(str, others))}" if others else ""
            return {
                "ok": False,
                "tolerance_mib": tolerance_mib,
                "first_failed_round": record["round"],
                "text": f"memory did not return to baseline after round {record['round']}: {what} (tolerance {tolerance_mib:g} MiB){tail}",
            }
    worst = max([0.0] + [max([0.0, *r["residual_per_replica_mib"].values()]) for r in measured])
    overall = max(r["residual_mib"] for r in measured)
    return {
        "ok": True,
        "tolerance_mib": tolerance_mib,
        "max_residual_mib": _mib(worst),
        "max_overall_residual_mib": _mib(overall),
        "text": (
            f"memory returned to baseline after every round ({len(measured)} rounds): at most {worst:.0f} MiB left per replica, "
            f"{overall:.0f} MiB in all (tolerance {tolerance_mib:g} MiB per replica)"
        ),
    }


def replicas_in(record: dict[str, Any]) -> int:
    return max(1, len(record["residual_per_replica_mib"]))


def overall_tolerance_mib(record: dict[str, Any], tolerance_mib: float) -> float:
    """The tolerance is per replica: each replica's processes may keep that much (a client's own
    heap settles after its first round), so the device as a whole may keep it once per replica."""
    return tolerance_mib * replicas_in(record)


def round_failed(record: dict[str, Any], tolerance_mib: float) -> bool:
    """Whether the round kept memory: the verdict's rule, and the report's highlights."""
    return bool(
        record["residual_mib"] > overall_tolerance_mib(record, tolerance_mib)
        or record["workers_left"]
        or any(value > tolerance_mib for value in record["residual_per_replica_mib"].values())
    )

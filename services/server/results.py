"""A run's folder: metrics.jsonl (one line per finished round), checkpoints/, summary.json.

Every write lands whole or not at all (append + fsync for the metrics log, write-then-rename
for checkpoints and the summary), so a crash or Ctrl-C keeps everything written so far.
A run never reuses another run's folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from services import misses
from services.admission.records import workers_alive
from services.files import METRICS, atomic_write, iso, json_safe, write_json_atomically
from services.locks import HeldLock, is_held


def utc_now() -> str:
    return iso(time.time())


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


SERVER_LOCK = ".server.lock"  # held by the server writing the run, for its whole life


class RunInUse(RuntimeError):
    """Another live server is writing this run folder."""


def in_use(path: Path) -> bool:
    return is_held(Path(path) / SERVER_LOCK)


class RunFolder:
    """Owns ``<results-dir>/<run-id>/`` for one run: one server at a time writes it (a lock
    file it holds while it lives), so two servers never resume, or write, the same run."""

    def __init__(self, results_dir: str | Path, run_id: str | None) -> None:
        self.run_id = run_id or new_run_id()
        self.path = Path(results_dir) / self.run_id
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir()
        except FileExistsError:
            raise FileExistsError(
                f"--run-id / FL_RUN_ID = {self.run_id!r}: {self.path} already exists and is never reused; "
                "choose another run id or leave it unset"
            ) from None
        self._hold()
        (self.path / "checkpoints").mkdir()
        self.metrics_path = self.path / METRICS
        self.metrics_path.touch()

    def release(self) -> None:
        """Let another server take the run (the end of this process does it too)."""
        self._lock.release()

    def _hold(self) -> None:
        self._lock = HeldLock(self.path / SERVER_LOCK)
        if not self._lock.acquire():
            raise RunInUse(f"run {self.run_id} ({self.path}) is being written by another running server; nothing was changed")

    @classmethod
    def reopen(cls, path: Path) -> "RunFolder":
        """An unfinished run's folder, to continue it: a metrics line cut by a crash is dropped
        (it was never a recorded round), so the next round's line starts on a line of its own."""
        folder = cls.__new__(cls)
        folder.path, folder.run_id = Path(path), Path(path).name
        folder._hold()  # before any change to the folder
        folder.metrics_path = folder.path / METRICS
        (folder.path / "checkpoints").mkdir(exist_ok=True)
        # The last attempt's summary (e.g. "interrupted") is not this run's: the restart entry in
        # state.json keeps its status, and a new summary is written when this attempt ends.
        (folder.path / "summary.json").unlink(missing_ok=True)
        text = folder.metrics_path.read_bytes() if folder.metrics_path.exists() else b""
        complete = text[: text.rfind(b"\n") + 1]
        if complete != text:
            with open(folder.metrics_path, "r+b") as out:
                out.truncate(len(complete))
                out.flush()
                os.fsync(out.fileno())
        return folder

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomically(self.path / "state.json", state)

    def append_round(self, record: dict[str, Any]) -> None:
        line = json.dumps(json_safe(record), sort_keys=True)
        with open(self.metrics_path, "a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())

    def save_checkpoint(self, server_round: int, weights: Iterable[np.ndarray]) -> Path:
        target = self.path / "checkpoints" / f"round-{server_round:04d}.npz"
        with atomic_write(target, "wb") as out:
            np.savez(out, *list(weights))
        return target

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomically(self.path / "summary.json", summary)


def load_checkpoint(path: str | Path) -> list[np.ndarray]:
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


class RunState:
    """state.json: what a restarted server needs to continue the run (services.server.resume),
    rewritten whole on every change."""

    def __init__(self, folder: RunFolder, data: dict[str, Any]) -> None:
        self.folder = folder
        self.data = data
        folder.write_state(data)

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.folder.write_state(self.data)


class RoundRecorder:
    """Collects what happens in a round and appends it to metrics.jsonl when the round ends.
    A resumed run starts with the rounds (and initial evaluation) already recorded."""

    def __init__(self, folder: RunFolder, rounds: list[dict[str, Any]] | None = None, initial: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        self.initial: dict[str, Any] = dict(initial or {})
        self._current: dict[str, Any] | None = None
        self._started = 0.0
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.joins_refused = 0  # connections refused for a missing or wrong join secret (this server's life)

    def on_commit(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(record)`` after each round's line is on disk (the trackers)."""
        self._listeners.append(listener)

    def join_refused(self) -> None:
        self.joins_refused += 1

    def initial_evaluation(self, loss: float, metrics: dict[str, Any]) -> None:
        self.initial = {"loss": loss, "accuracy": metrics["accuracy"], "metrics": metrics}

    def round_started(self, server_round: int, lost_attempts: int = 0) -> None:
        """Opens the round's record (again, after an attempt in which every client's connection
        was lost: ``lost_attempts`` counts those, and the record says so)."""
        self._started = time.monotonic()
        self._current = {
            "round": server_round,
            **({"lost_attempts": lost_attempts} if lost_attempts else {}),
            "started_at": utc_now(),
            "clients": [],
            "failures": [],
            "accuracy": None,
            "loss": None,
            "accuracy_source": "server",
            "missing": [],
        }

    def partitions_missing(self, missing: list[dict[str, Any]]) -> None:
        """Partitions whose holder was not connected when the round was sampled."""
        assert self._current is not None
        self._current["missing"] = missing

    def fit_finished(
        self, clients: list[dict[str, Any]], failures: list[dict[str, Any]], num_partitions: int, rejected: list[dict[str, Any]] | None = None
    ) -> None:
        """The round's training: who trained, who failed, and whose update was rejected
        (``rejected``: id, partition, reason; counted in neither clients_ok nor clients_failed)."""
        assert self._current is not None
        rejected = rejected or []
        self._current.update(
            clients=sorted(clients, key=lambda c: (c.get("partition") is None, c.get("partition"))),
            failures=failures,
            rejected=sorted(rejected, key=lambda r: (r.get("partition") is None, r.get("partition"))),
            clients_ok=len(clients),
            clients_failed=len(failures),
            clients_rejected=len(rejected),
            num_partitions=num_partitions,
            slots_per_device=slots_per_device(clients),
            concurrent_workers_peak=concurrent_workers_peak(clients),
        )

    def aggregate_refused(self, reason: str) -> None:
        """The strategy's result did not become the global model: the round is not trained."""
        assert self._current is not None
        self._current["aggregate_refused"] = reason

    def aggregated(self, seconds: float) -> None:
        assert self._current is not None
        self._current["aggregate_seconds"] = round(seconds, 6)

    def central_evaluated(self, loss: float, metrics: dict[str, Any]) -> None:
        """The server-side evaluation of the round's global model: every metric the task returned."""
        assert self._current is not None
        self._current.update(loss=loss, accuracy=metrics["accuracy"], metrics=metrics)

    def central_failed(self, server_round: int, cause: str, kind: str) -> None:
        """Server-side evaluation failed (``kind``: services.failures.Kind's value): the round is still recorded, without accuracy."""
        if server_round == 0:
            self.initial = {"loss": None, "accuracy": None, "error": cause, "error_kind": kind}
        else:
            assert self._current is not None
            self._current.update(evaluation_error=cause, evaluation_error_kind=kind)

    def federated_evaluated(
        self, loss: float | None, accuracy: float | None, clients: int, failed: int, as_round_accuracy: bool, rejected: list[dict[str, Any]] | None = None
    ) -> None:
        """Client-side evaluation (weighted by examples; results that fail the checks are left
        out, ``rejected``); the round's accuracy when the task has no held-out data for the
        server (``accuracy_source`` says which)."""
        assert self._current is not None
        self._current["client_eval"] = {"loss": loss, "accuracy": accuracy, "clients": clients, "failed": failed, "rejected": rejected or []}
        if as_round_accuracy:
            self._current.update(loss=loss, accuracy=accuracy, accuracy_source="clients")

    def round_ended(self) -> dict[str, Any]:
        """The round's finished record; ``commit`` it once its checkpoint is on disk."""
        assert self._current is not None
        record = self._current
        record["ended_at"] = utc_now()
        record["round_seconds"] = round(time.monotonic() - self._started, 3)
        record.setdefault("clients_ok", 0)
        record.setdefault("clients_failed", 0)
        record.setdefault("clients_rejected", 0)
        record.setdefault("rejected", [])
        record["trained"] = record["clients_ok"] > 0 and "aggregate_refused" not in record
        return record

    def commit(self, record: dict[str, Any]) -> None:
        """Append the round to metrics.jsonl: from now on it is a recorded round (resume skips it)."""
        self.folder.append_round(record)
        self.rounds.append(record)
        self._current = None
        for listener in self._listeners:
            listener(record)

    @property
    def trained_rounds(self) -> list[int]:
        return [record["round"] for record in self.rounds if record["trained"]]

    @property
    def updates_rejected(self) -> int:
        return sum(record.get("clients_rejected", 0) for record in self.rounds)

    @property
    def updates_clipped(self) -> int:
        return sum(1 for record in self.rounds for client in record["clients"] if "clipped_from_norm" in client)

    def rounds_missed_by_partition(self) -> dict[str, dict[str, int]]:
        """The partitions that missed rounds, and why (services.misses: not connected, failed,
        update rejected, aggregate refused); FL_FRACTION_FIT below 1 leaves some unsampled, which missed nothing."""
        return misses.by_partition(self.rounds)

    def partitions_by_host(self) -> dict[str, dict[str, list[int]]]:
        """Per round, the partitions each host trained (the clients' FL_HOST_NAME): where a
        federation spread over several machines actually ran. Rounds whose clients name no
        host are left out, so a run on one machine has an empty dict."""
        out: dict[str, dict[str, list[int]]] = {}
        for record in self.rounds:
            hosts: dict[str, list[int]] = {}
            for client in record["clients"]:
                if client.get("host") is not None and client.get("partition") is not None:
                    hosts.setdefault(str(client["host"]), []).append(int(client["partition"]))
            if hosts:
                out[str(record["round"])] = {host: sorted(partitions) for host, partitions in sorted(hosts.items())}
        return out

    def rounds_trained_by_partition(self, num_partitions: int | None) -> dict[str, int]:
        """How many rounds each partition's training became part of the model in (0 for one
        that never did; a round whose aggregate was refused counts for nobody)."""
        counts = {str(partition): 0 for partition in range(num_partitions or 0)}
        for record in self.rounds:
            for partition in misses.trained(record):
                counts[str(partition)] = counts.get(str(partition), 0) + 1
        return counts


def slots_per_device(clients: list[dict[str, Any]]) -> dict[str, Any]:
    """The slots in force on each device this round, as the clients' workers were admitted
    (the largest seen: a device's count can settle upwards once a worker measured its need)."""
    slots: dict[str, Any] = {}
    for client in clients:
        device, count = client.get("device"), client.get("slots")
        if device is None or count is None:
            continue
        earlier = slots.get(device)
        slots[device] = count if earlier is None or (isinstance(count, int) and isinstance(earlier, int) and count > earlier) else earlier
    return slots


def concurrent_workers_peak(clients: list[dict[str, Any]]) -> dict[str, int]:
    """Per device, the most training workers that held a slot at the same time (from the
    workers' own start and end times)."""
    return {device: max(alive for _, alive in steps) for device, steps in workers_alive(clients).items()}

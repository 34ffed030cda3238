"""Which run a starting server continues, and where that run stands (FL_RESUME).

A run folder holds ``state.json`` from its first moment: the run's fingerprint (the task
settings, the task file's hash, the strategy), and, once known, the settled federation size, the
identity -> partition map, the initial evaluation and the restarts. With FL_RESUME=auto a
starting server continues the run named by FL_RUN_ID if it is unfinished, else the newest
unfinished run whose fingerprint equals its own; a completed run is never touched. Where a run
stands is read from its files: the last round in metrics.jsonl, the newest checkpoint at or
before it (a checkpoint is written before its round's metrics line, and a round in which nobody
trained has none: the model did not change).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.files import read_rounds
from services.server.results import in_use

log = logging.getLogger("bouquet.server")

STATE = "state.json"
FINISHED = "completed"


@dataclass
class Progress:
    """Where an unfinished run stands."""

    path: Path
    state: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # the global model to continue from (None: the seeded initial one)

    @property
    def last_round(self) -> int:
        return self.rounds[-1]["round"] if self.rounds else 0


def status_of(run_path: Path) -> str | None:
    try:
        return json.loads((run_path / "summary.json").read_text()).get("status")
    except FileNotFoundError:
        return None


def read_state(run_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_path / STATE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def progress(run_path: Path) -> Progress:
    state = read_state(run_path) or {}
    rounds = read_rounds(run_path)
    last = rounds[-1]["round"] if rounds else 0
    checkpoints = sorted(
        (int(path.stem.split("-")[1]), path) for path in (run_path / "checkpoints").glob("round-*.npz") if int(path.stem.split("-")[1]) <= last
    )
    return Progress(run_path, state, rounds, checkpoints[-1][1] if checkpoints else None)


class NotResumable(ValueError):
    """FL_RUN_ID names a run that must not be continued; the message says why."""


def choose(results_dir: Path, run_id: str | None, fingerprint: dict[str, Any], rounds: int) -> Progress | None:
    """The unfinished run to continue, or None for a new run (the log says why). A run that
    already recorded all ``rounds`` (FL_ROUNDS) has nothing left to do: raise FL_ROUNDS to go on."""
    if run_id is not None:
        path = results_dir / run_id
        if not path.is_dir():
            return None
        if status_of(path) == FINISHED:
            raise NotResumable(f"--run-id / FL_RUN_ID = {run_id!r}: {path} is a completed run and is never touched; choose another run id")
        if in_use(path):
            raise NotResumable(f"--run-id / FL_RUN_ID = {run_id!r}: {path} is being written by another running server; choose another run id")

        state = read_state(path)
        if state is None or state.get("fingerprint") != fingerprint:
            raise NotResumable(
                f"--run-id / FL_RUN_ID = {run_id!r}: {path} is unfinished but was started with other task settings "
                f"({_difference(state, fingerprint)}); it is left alone: choose another run id, or the same settings"
            )
        found = progress(path)
        if found.last_round >= rounds:
            raise NotResumable(f"--run-id / FL_RUN_ID = {run_id!r}: {path} already recorded {rounds} rounds (--rounds / FL_ROUNDS); raise it to train further")
        return found
    candidates = []
    for path in results_dir.iterdir() if results_dir.is_dir() else []:
        if not path.is_dir() or path.name.startswith(".") or status_of(path) == FINISHED:
            continue
        state = read_state(path)
        if state is None:
            continue
        if in_use(path):
            log.info("not resuming run %s: another running server is writing it", path.name)
            continue
        if state.get("fingerprint") != fingerprint:
            log.info("not resuming unfinished run %s: other task settings (%s)", path.name, _difference(state, fingerprint))
            continue
        found = progress(path)
        if found.last_round >= rounds:
            log.info("not resuming run %s: it already recorded %d rounds (FL_ROUNDS = %d)", path.name, found.last_round, rounds)
            continue
        candidates.append((state.get("created_at", ""), found))
    if not candidates:
        return None
    return max(candidates, key=lambda candidate: candidate[0])[1]


def _difference(state: dict[str, Any] | None, fingerprint: dict[str, Any]) -> str:
    if state is None:
        return "no state.json"
    theirs = state.get("fingerprint", {})
    changed = sorted(key for key in set(theirs) | set(fingerprint) if theirs.get(key) != fingerprint.get(key))
    return ", ".join(f"{key}: {theirs.get(key)!r} there, {fingerprint.get(key)!r} now" for key in changed[:3]) or "unknown"

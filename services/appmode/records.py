"""Per-message records: one JSON line per ClientApp launch, written by the node, collected per run.

Each node agent appends to its own file ``<data dir>/appmode-messages/<identity>.jsonl`` (one
writer per file); ``submit`` copies the lines of its run (Flower's run id, or no run id and a
time inside the run: a launch Flower never handed a message) into ``<run folder>/messages.jsonl``.
Fields: node, partition, num_partitions, launch, flwr_run_id, task_id, message_type, pid,
device, slots, slot_wait_seconds, worker_started_at / worker_ended_at (epoch s, while the slot
was held), asked_at / ended_at, outcome (ok, app_error, failed, lost), cause, exit_code,
retried_after_oom. Never the token.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterable

from services.files import read_json_lines

FOLDER = "appmode-messages"


def node_file(data_dir: str | Path, identity: str) -> Path:
    return Path(data_dir) / FOLDER / f"{identity}.jsonl"


class MessageLog:
    """The node's record file; one line per launch, appended whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as out:
            out.write(line)


def all_records(data_dir: str | Path) -> Iterable[dict[str, Any]]:
    folder = Path(data_dir) / FOLDER
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            yield from read_json_lines(path)[0]
        except (OSError, ValueError):
            continue


def of_run(data_dir: str | Path, flwr_run_id: int | None, started_at: float, ended_at: float) -> list[dict[str, Any]]:
    """The launches of one run, in time order: those Flower tied to the run, and those without a
    run id (Flower never handed them a message) asked for while the run was on."""
    chosen = []
    for record in all_records(data_dir):
        run = record.get("flwr_run_id")
        if (run is not None and run == flwr_run_id) or (run is None and started_at <= record.get("asked_at", 0) <= ended_at):
            chosen.append(record)
    return sorted(chosen, key=lambda record: record.get("asked_at", 0))

"""Per-message records: one JSON line per ClientApp launch, written by the node, collected per run.

Each node agent appends to its own file ``<data dir>/appmode-messages/<identity>.jsonl`` (one
writer per file); ``submit`` copies the lines of its run (Flower's run id, or no run id and a
time inside the run: a launch Flower never handed a message) into ``<run folder>/messages.jsonl``,
with what the ServerApp's reply checks said of each reply (``with_reply_checks``).
Fields: node, partition, num_partitions, launch, flwr_run_id, task_id, message_type, message_id, flwr_node_id
(Flower's id of the node's SuperNode), pid,
device, slots, slot_wait_seconds, worker_started_at / worker_ended_at (epoch s, while the slot
was held), asked_at / ended_at, outcome (ok, app_error, failed, lost), cause, exit_code,
retried_after_oom; from the reply checks: reason (outcome "refused"), update_norm,
clipped_from_norm. Never the token.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterable

from services.files import read_json_lines

FOLDER = "appmode-messages"
REFUSED = "refused"  # a message's outcome when the ServerApp's checks refused its reply


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


def with_reply_checks(messages: list[dict[str, Any]], checks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's messages with what the ServerApp's process (reply-checks.jsonl,
    services.appmode.serverapp) said of their replies, matched by the message's id: a refused
    reply makes its message "refused" with the reason; a measured one adds its distance
    (``update_norm``, ``clipped_from_norm``); a reply that never came (``no_reply``: given up on,
    services.appmode.absences) or came as an error the node did not record (``error_reply``:
    Flower's own, e.g. a node that stopped) makes it "failed" with the cause. A message no node
    recorded (its node stopped, or a SuperNode Bouquet did not start) gets a line of its own,
    named by the replica that Flower node was (from the node's other records), else by Flower's
    node id, without a partition. A node's record that names no message (it lost track of its
    worker) takes the id of the error reply Flower made for that replica's message."""
    out = [dict(record) for record in messages]
    by_id = {record["message_id"]: record for record in out if record.get("message_id")}
    replicas = {record["flwr_node_id"]: record for record in out if record.get("flwr_node_id") is not None}
    for check in checks:
        record = by_id.get(check["message_id"]) or _unnamed_of_the_same_replica(out, replicas.get(check["flwr_node_id"]), check)
        if record is None:
            holder = replicas.get(check["flwr_node_id"], {})
            record = by_id[check["message_id"]] = {
                "node": holder.get("node", f"flower-node-{check['flwr_node_id']}"), "partition": holder.get("partition"), "num_partitions": holder.get("num_partitions"),
                "flwr_node_id": check["flwr_node_id"], "flwr_run_id": check.get("flwr_run_id"), "message_id": check["message_id"], "message_type": check.get("message_type"),
                "asked_at": check["checked_at"], "ended_at": check["checked_at"],  # checked_at: within the round that waited for it
                "outcome": "ok", "cause": None, "recorded_by": "serverapp",
            }
            out.append(record)
        if "refused" in check:
            record.update(outcome=REFUSED, reason=check["refused"], cause=f"reply refused: {check['refused']}")
        elif "no_reply" in check:
            record.update(outcome="failed", cause=check["no_reply"])
        elif "error_reply" in check and record.get("outcome") == "ok":  # the node's own failures keep the node's words
            record.update(outcome="failed", cause=f"Flower's error reply: {check['error_reply']}")
        record.update({key: check[key] for key in ("update_norm", "clipped_from_norm") if key in check})
    return sorted(out, key=lambda record: record.get("asked_at", 0))


def _unnamed_of_the_same_replica(out: list[dict[str, Any]], holder: dict[str, Any] | None, check: dict[str, Any]) -> dict[str, Any] | None:
    """The replica's earliest failed record without a message id asked for before Flower's error
    reply came: the same message, seen from both sides (it gets the id)."""
    if holder is None or "error_reply" not in check:
        return None
    for record in out:
        if record["node"] == holder["node"] and not record.get("message_id") and record.get("outcome") not in ("ok", REFUSED) and record.get("asked_at", 0) <= check["checked_at"]:
            record.update(message_id=check["message_id"], message_type=record.get("message_type") or check.get("message_type"), flower_error=check["error_reply"])
            return record
    return None

"""Which messages the ServerApp sent will never be answered, so a round does not wait for them.

Flower's SuperLink fails a message to a node that stopped only once the node missed two
heartbeats (60 s) or its half-pushed reply's session expired (minutes); a node that hangs is
waited for as long as the ServerApp's own timeout (an hour for Flower's strategies). Task mode
bounds a round by the job's time budget (``services.budget``); so does this, in the ServerApp's
process (``services.appmode.serverapp``), for any ServerApp unchanged. A message is given up:
- when its node's replica stopped: the replica's roster entry (``services.roster``) is no longer
  held, or the replica started again with a new SuperNode. Which replica a Flower node id is
  comes from the nodes' message records (``flwr_node_id``), so a replica known from an earlier
  message is given up at once, one that dies during its first message at the budget;
- when the job's time budget passed since it was sent (the node waits for its worker slot as
  long: one budget, both sides).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from services import roster
from services.appmode import records
from services.budget import JobBudget
from services.files import read_json_lines

CHECK_S = 2.0  # how often the replicas' records and roster are read again, while replies are awaited


@dataclass(frozen=True)
class Waiting:
    node_id: int
    sent_at: float


class Replicas:
    """Which replica each Flower node is, and whether that node can still answer: read from the
    nodes' record files (only their new lines) and the roster."""

    def __init__(self, data_dir: str | Path, live: Callable[[], set[str]] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.live = live or (lambda: roster.live(self.data_dir))
        self.identity_of: dict[int, str] = {}  # Flower node id -> replica identity
        self.latest: dict[str, int] = {}  # replica identity -> the Flower node id of its newest record
        self._read_to: dict[Path, int] = {}

    def refresh(self) -> None:
        folder = self.data_dir / records.FOLDER
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            try:
                lines, self._read_to[path] = read_json_lines(path, self._read_to.get(path, 0))
            except (OSError, ValueError):  # unreadable now: the next look reads it again
                continue
            for record in lines:
                if isinstance(record.get("flwr_node_id"), int) and record.get("node"):
                    self.identity_of[record["flwr_node_id"]] = record["node"]
                    self.latest[record["node"]] = record["flwr_node_id"]

    def gone(self, node_ids: Iterable[int]) -> dict[int, str]:
        """Of ``node_ids``, those whose replica is known and can no longer answer, and why."""
        known = {node_id: self.identity_of[node_id] for node_id in node_ids if node_id in self.identity_of}
        if not known:
            return {}
        alive = self.live()
        why = {}
        for node_id, identity in known.items():
            if identity not in alive:
                why[node_id] = f"replica {identity} stopped (Flower node {node_id}): its reply will never come"
            elif self.latest.get(identity, node_id) != node_id:
                why[node_id] = f"replica {identity} started again as Flower node {self.latest[identity]}: Flower node {node_id} will never reply"
        return why



class Absences:
    """The messages sent and not yet answered; ``overdue`` says which to stop waiting for."""

    def __init__(self, budget: JobBudget, replicas: Replicas, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.replicas = replicas
        self.clock = clock
        self.waiting: dict[str, Waiting] = {}
        self._checked_at = float("-inf")

    def sent(self, message_id: str, node_id: int) -> None:
        self.waiting[message_id] = Waiting(node_id, self.clock())

    def answered(self, message_id: str) -> None:
        self.waiting.pop(message_id, None)

    def overdue(self, message_ids: Iterable[str]) -> dict[str, str]:
        """Of ``message_ids`` (those the ServerApp still waits for), the ones that will not be
        answered, each with its cause; they are forgotten here."""
        now = self.clock()
        asked = [message_id for message_id in message_ids if message_id in self.waiting]
        out = {message_id: f"no reply within {self.budget.deadline_s:g} s, the job's time budget ({self.budget.describe()})"
               for message_id in asked if now - self.waiting[message_id].sent_at > self.budget.deadline_s}
        if asked and now - self._checked_at >= CHECK_S:
            self._checked_at = now
            self.replicas.refresh()
            gone = self.replicas.gone({self.waiting[message_id].node_id for message_id in asked})
            out.update({message_id: gone[self.waiting[message_id].node_id] for message_id in asked if self.waiting[message_id].node_id in gone and message_id not in out})
        for message_id in out:
            self.answered(message_id)
        return out

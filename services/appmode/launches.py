"""What a node does with one ClientApp launch: an admitted worker, or a visible failure.

For every launch SuperExec makes (through Bouquet's ``flwr-clientapp``), the node runs
``services.appmode.clientapp:run`` in a fresh worker forked from a warm process (the host's
worker pool, from its warm child for the run's App once the node has seen that App; or the
node's own forkserver with FL_WORKER_POOL=replica), after the worker took a slot (``services.admission.retry``: the same admission, placement, memory cap and
out-of-memory handling as task mode), keeping the task's token alive while the worker waits.
If no worker could serve it (no slot in time, the fork failed, the warm process died) and Flower
never got the message, ``services.appmode.refusal`` fails the message through Flower, so the
ServerApp gets an error reply naming the cause instead of a silent relaunch loop. Every launch
is logged and recorded (``records``), without its token.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import lifetime
from services.admission import retry
from services.admission.config import worker_admission
from services.admission.sizing import NeedBook
from services.appmode import launch_args
from services.appmode.keepalive import KeepAlive
from services.appmode.records import MessageLog
from services.appmode.refusal import CAUSE_VARIABLE
from services.budget import JobBudget
from services.settings import NodeSettings
from services.worker import POOL_EXITED, Warm, WorkerFailed, forkserver_pid

log = logging.getLogger("bouquet.node")

JOB = "services.appmode.clientapp:run"
WARM_APP = "services.appmode.clientapp:warm_app"  # what the pool's warm child for a run's App runs once
NEED_KEY = "appmode-clientapp"  # the remembered GPU need of this node's ClientApp workers
REFUSAL_TIMEOUT_S = 120.0
# A process closes its files before it becomes a zombie, so a worker's sentinel can report a dying
# warm process (forkserver) a moment before it has ended: that moment, to see it end.
WARM_EXIT_PATIENCE_S = 2.0


@dataclass(frozen=True)
class NodePlace:
    identity: str
    partition: int
    num_partitions: int


class Launches:
    def __init__(self, settings: NodeSettings, place: NodePlace, records: MessageLog, flwr_env: dict[str, str]) -> None:
        self.settings = settings
        self.place = place
        self.records = records
        self.flwr_env = flwr_env
        self.scratch = Path(tempfile.mkdtemp(prefix="bouquet-node-"))  # 0700: token files live here
        self.counter = itertools.count(1)
        self.said_imported: set[str] = set()  # packages the node already suggested to preload
        self.app_seen: str | None = None  # the FAB hash of the last App a message ran: the next ones likely run it too
        # the ServerApp waits as long for a reply (services.appmode.absences): one budget, both sides
        self.budget = JobBudget.for_round(settings.worker_timeout, place.num_partitions)
        self.admission = dataclasses.replace(worker_admission(settings), need_key=NEED_KEY)

    def serve(self, argv: list[str]) -> int:
        """Run one launch to its end; the exit code Bouquet's flwr-clientapp exits with."""
        number = next(self.counter)
        asked_at = time.time()
        log.info("launch %d: ClientApp %s", number, " ".join(launch_args.redact(argv)))
        base = {"node": self.place.identity, "partition": self.place.partition, "num_partitions": self.place.num_partitions, "launch": number, "asked_at": round(asked_at, 4)}
        warm = base["forkserver_pid"] = forkserver_pid()  # the warm process the worker should fork from
        try:
            with KeepAlive(launch_args.endpoint(argv)):
                result, retried = retry.run(
                    JOB,
                    {"argv": argv, "torch_threads": self.settings.torch_threads},
                    timeout=self.budget.job_s,
                    wait_timeout=self.budget.slot_wait_s,
                    start_method=self.settings.worker_start,
                    admission=self.admission,
                    warm=Warm(WARM_APP, self.app_seen) if self.app_seen else None,
                )
        except WorkerFailed as failure:
            if warm is not None and lifetime.ended(warm, patience=WARM_EXIT_PATIENCE_S):
                # The worker's exit is reported through its forkserver: with that gone, the node
                # cannot tell how the worker ended (it may still be running and reply).
                lost = WorkerFailed(f"the node's warm process (pid {warm}) died while this message ran, so its worker (pid {failure.pid}) "
                                    "could not be followed; Flower has the message's real outcome", failure.pid, admitted=failure.admitted)
                return self._failed(number, argv, base, lost, failure.started, outcome="lost")
            if failure.started and failure.cause.startswith(POOL_EXITED):
                return self._failed(number, argv, base, failure, True, outcome="lost")
            return self._failed(number, argv, base, failure, failure.started)
        value: dict[str, Any] = result.value
        if value["out_of_memory"] and not self.settings.worker_memory_mib:
            # Flower consumed the message, so it cannot run again (task mode's retry); later
            # messages are admitted fewer at once instead.
            need = NeedBook(self.admission.slots_dir).raise_after_oom(NEED_KEY, (result.admitted or {}).get("share_mib"))
            log.warning("launch %d: the ClientApp ran out of GPU memory; the remembered need is now ~%.0f MiB", number, need)
        self.app_seen = value["fab_hash"] or self.app_seen
        outcome = "ok" if value["exit_code"] == 0 and not value["app_error"] else "app_error"
        cause = value["app_error"] or (None if value["exit_code"] == 0 else f"flwr-clientapp exited with code {value['exit_code']}")
        record = {**base, **(result.admitted or {}), "pid": result.pid, "parent_pid": value["parent_pid"], "forkserver_pid": forkserver_pid(), "flwr_run_id": value["flwr_run_id"], "task_id": value["task_id"],
                  "message_type": value["message_type"], "message_id": value["message_id"], "flwr_node_id": value["flwr_node_id"], "outcome": outcome, "cause": cause, "exit_code": value["exit_code"], "retried_after_oom": retried,
                  "worker_start_seconds": round(result.start_seconds, 4), "app_load_seconds": value["app_load_seconds"], "app_was_warm": value["app_was_warm"],
                  "imported_after_fork": value["imported_after_fork"], "app_imports_after_fork": value["app_imports_after_fork"], "ended_at": round(time.time(), 4)}
        self.records.append(record)
        self._suggest_preload(value)
        (log.info if outcome == "ok" else log.error)("launch %d: %s message of run %s in worker %d on %s: %s%s", number, value["message_type"], value["flwr_run_id"], result.pid,
                                                     record.get("device", "?"), outcome, f" ({cause})" if cause else "")
        return value["exit_code"]

    def _suggest_preload(self, value: dict[str, Any]) -> None:
        """Say once per package what every message imports again (FL_WORKER_PRELOAD imports it once)."""
        named = value["app_imports_after_fork"]
        if set(named) - self.said_imported:
            self.said_imported.update(named)
            load = value["app_load_seconds"]
            preload = list(dict.fromkeys([*(self.settings.worker_preload or []), *named]))  # what is preloaded already, and these
            log.info("the ClientApp imports %s, which the warm process has not (with what they import: %d packages; loading the app took %s s), "
                     "and every message pays for that again: FL_WORKER_PRELOAD=%s has the warm process import them once",
                     ", ".join(named), len(value["imported_after_fork"]), "?" if load is None else f"{load:.2f}", ",".join(preload))

    def _failed(self, number: int, argv: list[str], base: dict[str, Any], failure: WorkerFailed, flower_had_it: bool, outcome: str = "failed") -> int:
        cause = f"Bouquet's node {self.place.identity} could not serve this message: {failure.cause}"
        record = {**base, **(failure.admitted or {}), "pid": failure.pid, "outcome": outcome, "cause": failure.cause, "exit_code": 1,
                  "flwr_run_id": None, "task_id": None, "message_type": None}
        if flower_had_it:
            # Flower's runtime held the token: when its heartbeats stop, Flower fails the message itself.
            log.error("launch %d: after Flower took the message: %s (if the worker is gone, Flower fails the message when its heartbeats stop)", number, failure.cause)
        else:
            log.error("launch %d: %s; failing the message through Flower", number, cause)
            with KeepAlive(launch_args.endpoint(argv)):  # until the refusal's own runtime beats
                refused = self._refuse(argv, cause)
            record.update({k: refused.get(k) for k in ("flwr_run_id", "task_id", "message_type", "message_id", "flwr_node_id")})
            record["refused"] = refused.get("message_type") is not None
            if not record["refused"]:
                log.error("launch %d: could not fail the message through Flower either: %s", number, refused.get("problem", refused))
        record["ended_at"] = round(time.time(), 4)
        self.records.append(record)
        return 1

    def _refuse(self, argv: list[str], cause: str) -> dict[str, Any]:
        """Fail the message through Flower (services.appmode.refusal), the token passed in a private file."""
        token = launch_args.endpoint(argv).token
        token_file = self.scratch / f"token-{os.getpid()}-{time.monotonic_ns()}"
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(token or "")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "services.appmode.refusal", *launch_args.with_token_file(argv, str(token_file))],
                env={**self.flwr_env, CAUSE_VARIABLE: cause}, stdout=subprocess.PIPE, stderr=None, text=True, timeout=REFUSAL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return {"problem": f"the refusal did not end within {REFUSAL_TIMEOUT_S:g} s"}
        finally:
            token_file.unlink(missing_ok=True)
        for line in reversed(done.stdout.splitlines()):
            if line.startswith('{"refusal"'):
                return json.loads(line)["refusal"]
        return {"problem": f"the refusal exited with code {done.returncode} without an outcome"}

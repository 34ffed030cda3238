"""``python -m services.appmode.submit``: run a Flower App on the SuperLink and report its real outcome.

Flower's ``flwr run`` exits 0 when the ServerApp fails to import (exit code 607) and when every
ClientApp reply is an error, so its exit code says little. This waits for the settled federation
(every partition's SuperNode online), runs ``flwr run <app> --stream`` with the CLI's config in
a FLWR_HOME of its own, keeps the streamed log in the run folder (``flwr-run.log``), then reads
the run's status from the SuperLink (``flwr ls --run-id N --format json``), the nodes'
message records and the ServerApp's reply checks (``reply-checks.jsonl``), and writes
``summary.json``: FAILED, with the cause, when the run did not finish as completed, or when no
ClientApp message succeeded; exit code 0 only for a completed run
(130 for one stopped by SIGTERM or Ctrl-C: the Flower run is stopped and the end still recorded).
One submission at a time per results folder (a lock there): the ServerApp's working folder and
the run's records assume it. A run id whose folder holds a finished run is refused.
Each round's line goes to metrics.jsonl once the round ended (``rounds``: when the ServerApp's
process notes the next round's start, with a moment for the nodes' last records), and from there to the trackers
(MLflow when MLFLOW_TRACKING_URI is set, TensorBoard) and to the server's Prometheus gauges
(``services.appmode.gauges``), as task mode's server sends its rounds; at the end every line is
written again from all the records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from services import joining, lifetime, logs, misses, tls
from services import settings as settings_module
from services.tracking.run import APP_MODE, RunTracking
from services.appmode import assignment, evaluations, flower, records, serverapp_shim
from services.appmode.app_identity import app_fingerprint, app_identity
from services.appmode.rounds import RoundStart, round_lines, round_starts, rounds_completed, write_rounds
from services.files import FLWR_RUN_LOG, JOINS_REFUSED, MESSAGES, REPLY_CHECKS, SERVERAPP_FOLDER, atomic_write, files_under, iso, read_json_lines, write_json_atomically
from services.locks import HeldLock
from services.server.results import concurrent_workers_peak, new_run_id, slots_per_device
from services.settings import SubmitSettings

log = logging.getLogger("bouquet.submit")

STARTED = re.compile(r"Successfully started run (\d+)")
LIVE_WRITE_S = 1.0  # how often the ended rounds are looked for while the run goes
RECORDS_SETTLE_S = 2.0  # after a round's end, the time its nodes' last records need to land
CONNECTION = "bouquet"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # as a shell reports a program stopped by Ctrl-C
ONE_AT_A_TIME = ".appmode-submission.lock"  # in the results folder: held while a submission runs


def validate(values: SubmitSettings) -> SubmitSettings:
    app = Path(values.app)
    if not (app / "pyproject.toml").is_file() or "[tool.flwr.app" not in (app / "pyproject.toml").read_text():
        raise settings_module.SettingError(f"--app / FL_APP = {values.app!r}: not a Flower App folder (needs a pyproject.toml with [tool.flwr.app])")
    if values.tls_dir is not None:
        tls.client_ca(values.tls_dir)
    token_file = getattr(values, "submit_token_file", None)  # run_local checks its settings here too, and makes its own token
    if token_file is not None:
        joining.token_in_file(token_file, "--submit-token-file / FL_SUBMIT_TOKEN_FILE")
    if values.run_id and (Path(values.results_dir) / values.run_id / "summary.json").exists():
        raise settings_module.SettingError(
            f"--run-id / FL_RUN_ID = {values.run_id!r}: {Path(values.results_dir) / values.run_id} holds a finished run (summary.json), "
            "which is never touched: name another run, or leave it unset for a new one"
        )
    return values


class Submission:
    def __init__(self, settings: SubmitSettings) -> None:
        self.settings = settings
        self.run_id = settings.run_id or new_run_id()
        self.folder = Path(settings.results_dir).resolve() / self.run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        # flwr's config and the submit token as its credential: private (0700), never in the run folder
        self.home = Path(tempfile.mkdtemp(prefix="bouquet-flwr-cli-"))
        ca = str((Path(settings.tls_dir) / "ca.crt").resolve()) if settings.tls_dir else None
        token = joining.token_in_file(settings.submit_token_file, "--submit-token-file / FL_SUBMIT_TOKEN_FILE") if settings.submit_token_file else None
        flower.write_cli_config(self.home, settings.server_address, ca, token)
        self.env = flower.environment(self.home)
        self.foreign: int | None = None  # SuperNodes online at submission that Bouquet did not settle
        self.flwr_run_id: int | None = None
        self.started_at = time.time()
        self.rounds_written = 0  # rounds whose line the live writer wrote and the trackers were told of
        self.tracking: RunTracking | None = None
        self.interrupted = False  # SIGTERM or Ctrl-C: the Flower run was stopped

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([flower.program("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def online_nodes(self) -> int | None:
        try:
            listed = self.flwr("supernode", "list", CONNECTION, "--format", "json", timeout=60)
            nodes = json.loads(listed.stdout).get("nodes", [])
        except (subprocess.TimeoutExpired, ValueError, AttributeError):
            return None
        return sum(1 for node in nodes if str(node.get("status", "online")).lower() == "online")

    def wait_for_federation(self, deadline: float) -> str | None:
        """None once every settled partition's SuperNode is online; else why not."""
        wanted: int | None = None
        while time.monotonic() < deadline:
            current = assignment.read(self.settings.data_dir)
            wanted = None if current is None else current.num_partitions
            if wanted is not None:
                online = self.online_nodes()
                if online is not None and online >= wanted:
                    log.info("%d SuperNode(s) online, the federation settled on %d", online, wanted)
                    self.foreign = online - wanted
                    if self.foreign:
                        log.warning("%d SuperNode(s) online that are not among the %d Bouquet settled: the ServerApp will send them messages too "
                                    "(without TLS, SuperNode authentication is off and any SuperNode that reaches the published port may join; docs/security.md: \"Who may join\")", self.foreign, wanted)
                    return None
            time.sleep(1.0)
        return "the federation was not settled" if wanted is None else f"fewer than the {wanted} settled SuperNodes came online"

    def stream(self, deadline: float) -> tuple[int | None, int | None]:
        """``flwr run --stream``, its output kept in flwr-run.log and echoed: (exit code or None on timeout, Flower run id)."""
        command = [flower.program("flwr"), "run", str(Path(self.settings.app).resolve()), CONNECTION, "--stream"]
        if self.settings.app_run_config:
            command += ["--run-config", self.settings.app_run_config]
        with open(self.folder / FLWR_RUN_LOG, "w") as kept:
            process = lifetime.start(command, dies_with_parent=False, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def copy() -> None:
                assert process.stdout is not None
                for line in process.stdout:
                    kept.write(line)
                    kept.flush()
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    if self.flwr_run_id is None and (found := STARTED.search(line)):
                        self.flwr_run_id = int(found.group(1))

            copier = threading.Thread(target=copy, daemon=True)
            copier.start()
            ended = threading.Event()
            writer = threading.Thread(target=self.write_ended_rounds, args=(ended,), name="bouquet-rounds", daemon=True)
            writer.start()
            try:
                code = lifetime.wait(process, max(1.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                code, self.interrupted = None, True
            if code is None:  # out of time, or interrupted: Flower's run stops, then its stream at once
                if self.flwr_run_id is not None:
                    self.flwr("stop", str(self.flwr_run_id), CONNECTION)
                lifetime.stop(process, grace=0, sig=signal.SIGKILL)
            copier.join(timeout=10)
            ended.set()
            writer.join()
        return code, self.flwr_run_id

    def write_ended_rounds(self, ended: threading.Event) -> None:
        """While the run streams: the line of each round that ended, once its nodes' last records
        had a moment to land (the trackers and the Prometheus gauges follow metrics.jsonl)."""
        while not ended.wait(LIVE_WRITE_S):
            starts = round_starts(self.folder)
            if len(starts) - 1 > self.rounds_written and time.time() - starts[-1].at >= RECORDS_SETTLE_S:
                try:
                    self.record_rounds(starts[:-1], starts[-1].at, self.run_messages())
                except (OSError, ValueError) as problem:  # the end writes them all again
                    log.warning("could not write the rounds that ended so far: %s", problem)

    def run_messages(self) -> list[dict[str, Any]]:
        """The run's messages so far: the nodes' records, with the ServerApp's reply checks."""
        if self.flwr_run_id is None:
            return []
        messages = records.of_run(self.settings.data_dir, self.flwr_run_id, self.started_at, time.time())
        checks = [line for line in read_json_lines(self.folder / REPLY_CHECKS)[0] if line.get("flwr_run_id") == self.flwr_run_id]
        return records.with_reply_checks(messages, checks)

    def record_rounds(self, starts: list[RoundStart], last_ended_at: float, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """metrics.jsonl with these rounds; the trackers told of those they were not told of yet."""
        settled = assignment.read(self.settings.data_dir)
        lines = round_lines(starts, messages, last_ended_at, evaluations.read(_text(self.folder / FLWR_RUN_LOG)), None if settled is None else settled.partitions)
        write_rounds(self.folder, lines)
        if self.tracking is not None:
            for line in lines[self.rounds_written:]:
                self.tracking.round_recorded(line)
        self.rounds_written = max(self.rounds_written, len(lines))
        return lines

    @contextlib.contextmanager
    def serverapp_works_here(self) -> Iterator[None]:
        """While this run streams, the ServerApp the SuperLink starts works in <run folder>/serverapp/
        (``serverapp_shim`` reads the run id from the results folder, which the server shares)."""
        marker, working = self.folder.parent / serverapp_shim.CURRENT_RUN, str(self.folder / SERVERAPP_FOLDER)
        with atomic_write(marker) as out:
            out.write(working + "\n")
        try:
            yield
        finally:
            if _text(marker).strip() == working:  # another submission may have taken it since
                marker.unlink(missing_ok=True)

    def flower_status(self, flwr_run_id: int) -> dict[str, Any]:
        listed = self.flwr("ls", CONNECTION, "--run-id", str(flwr_run_id), "--format", "json")
        try:
            runs = json.loads(listed.stdout).get("runs", [])
        except ValueError:
            return {"status": "unknown", "status-details": f"flwr ls gave no JSON (exit {listed.returncode}): {listed.stdout[-300:]}{listed.stderr[-300:]}"}
        return runs[0] if runs else {"status": "unknown", "status-details": "the SuperLink does not know this run"}

    def run(self) -> int:
        started_at, started = self.started_at, time.monotonic()
        deadline = started + self.settings.run_timeout
        summary: dict[str, Any] = {"run_id": self.run_id, "mode": "app", "app": str(Path(self.settings.app).resolve()), "started_at": iso(started_at)}
        tracking = self.tracking = RunTracking(
            self.folder, {**settings_module.as_dict(self.settings), "mode": "app", **app_identity(Path(self.settings.app))}, {"path": summary["app"], "sha256": app_fingerprint(Path(self.settings.app))},
            mlflow_experiment=self.settings.mlflow_experiment, mlflow_optional=self.settings.mlflow_optional, tensorboard=self.settings.tensorboard,
            flush_timeout=self.settings.tracking_flush_timeout, engine_mode=APP_MODE,
        )
        flwr_run_id = status = None
        code: int | None = None
        try:
            problem = self.wait_for_federation(deadline)
        except KeyboardInterrupt:
            self.interrupted, problem = True, "stopped (SIGTERM or Ctrl-C) before the run was submitted"
        if problem is None:
            with self.serverapp_works_here():
                code, flwr_run_id = self.stream(deadline)
            if self.interrupted:
                problem = "stopped (SIGTERM or Ctrl-C) while it ran; the Flower run was stopped too" if flwr_run_id else "stopped (SIGTERM or Ctrl-C) before Flower started the run"
            elif flwr_run_id is None:
                problem = f"flwr run did not start a run (exit code {code}): {_said(self.folder / FLWR_RUN_LOG)}"
            if flwr_run_id is not None:
                status = self.flower_status(flwr_run_id)
        messages = self.run_messages()
        with open(self.folder / MESSAGES, "w") as out:
            out.writelines(json.dumps(record, sort_keys=True) + "\n" for record in messages)
        central = evaluations.read(_text(self.folder / FLWR_RUN_LOG))
        starts = round_starts(self.folder)
        rounds = self.record_rounds(starts, max([time.time(), *(record.get("ended_at", 0) for record in messages)]), messages)
        cause = problem or self.verdict(code, status, messages)
        summary.update(
            status="interrupted" if self.interrupted else "failed" if cause else "completed",
            cause=cause,
            flwr_run_id=flwr_run_id,
            flwr_status=None if status is None else status.get("status"),
            flwr_status_details=None if status is None else status.get("status-details"),
            flwr_run_exit_code=code,
            messages=_message_counts(messages),
            initial_accuracy=central.initial.get("accuracy"),
            initial_loss=central.initial.get("loss"),
            final_accuracy=central.by_round[max(central.by_round)].get("accuracy") if central.by_round else None,
            final_loss=central.by_round[max(central.by_round)].get("loss") if central.by_round else None,
            serverapp_files=[str(path.relative_to(self.folder)) for path in files_under(self.folder / SERVERAPP_FOLDER)],
            foreign_supernodes=self.foreign,  # online at submission beyond the settled ones (None: not reached)
            nodes=sorted({record["node"] for record in messages}),
            # identity -> partition, as task mode's summary.json (the report names replicas by it)
            partitions={record["node"]: record["partition"] for record in sorted(messages, key=lambda r: r["node"]) if record["partition"] is not None},
            # train replies (updates) the ServerApp's checks refused (services.appmode.replies; every refused reply: messages),
            # and replies clipped to FL_MAX_UPDATE_NORM, as task mode counts its updates
            updates_rejected=sum(1 for record in messages if record.get("outcome") == records.REFUSED and record.get("message_type") == "train"),
            updates_clipped=sum(1 for record in messages if "clipped_from_norm" in record),
            # SuperNodes the front refused while the run went (unregistered key, bad signature), each once, as task mode counts wrong join secrets
            joins_refused=sum(1 for line in read_json_lines(self.folder.parent / JOINS_REFUSED)[0] if started_at <= line.get("at", 0)),
            slots_per_device=slots_per_device([m for m in messages if m.get("device")]),
            concurrent_workers_peak=concurrent_workers_peak(messages),
            rounds_requested=starts[-1].rounds if starts else None,  # the ServerApp's, from Flower's "[ROUND k/N]" lines (None: it logged none)
            rounds_recorded=len(rounds),
            rounds_completed=rounds_completed(rounds),
            # partition -> rounds it missed and why (services.misses), as task mode: failed, update rejected, not connected
            rounds_missed_by_partition=misses.by_partition(rounds),
            elapsed_seconds=round(time.monotonic() - started, 3),
            ended_at=iso(time.time()),
        )
        write_json_atomically(self.folder / "summary.json", summary)
        tracking.finish()  # the rounds, the run's end and its files, to MLflow and TensorBoard
        if self.interrupted:
            log.error("run %s (Flower run %s) interrupted: %s", self.run_id, flwr_run_id, cause)
            return EXIT_INTERRUPTED
        if cause:
            log.error("run %s (Flower run %s) FAILED: %s", self.run_id, flwr_run_id, cause)
            return EXIT_FAILED
        log.info("run %s (Flower run %s) completed: %s", self.run_id, flwr_run_id, summary["messages"])
        return 0

    def verdict(self, code: int | None, status: dict[str, Any] | None, messages: list[dict[str, Any]]) -> str | None:
        """Why the run failed, or None. Flower's own exit code and status are checked first."""
        if code is None:
            return f"the run did not end within {self.settings.run_timeout:g} s (FL_RUN_TIMEOUT); it was stopped"
        assert status is not None
        if status.get("status") != "finished:completed":
            return f"Flower reports the run as {status.get('status')}: {status.get('status-details')}"
        if messages and not any(record.get("outcome") == "ok" for record in messages):
            causes = sorted({str(record.get("cause")) for record in messages})
            return f"every ClientApp message failed ({len(messages)}): {'; '.join(causes[:3])}"
        if code != 0:
            return f"flwr run exited with code {code}"
        return None


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _said(log_path: Path, lines: int = 6) -> str:
    """What flwr's CLI said last, without its box drawing, on one line."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    said = [line.strip(" \u2502\u256d\u256e\u2570\u256f\u2500") for line in text.splitlines()]
    return " ".join(line for line in said if line)[-600:].split(" ", 1)[-1] if any(said) else "(nothing)"


def _message_counts(messages: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {"total": len(messages)}
    for record in messages:
        counts[record.get("outcome", "unknown")] = counts.get(record.get("outcome", "unknown"), 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    settings = settings_module.parse(SubmitSettings, argv, program="services.appmode.submit", description=__doc__, validate=validate)
    logs.setup()
    Path(settings.results_dir).mkdir(parents=True, exist_ok=True)
    alone = HeldLock(Path(settings.results_dir) / ONE_AT_A_TIME)
    if not alone.acquire():  # the ServerApp's working folder and the run's records assume one run at a time
        print(f"services.appmode.submit: error: another submission is running with results in {settings.results_dir}; "
              "Bouquet runs one Flower run at a time on its SuperLink: wait for it to end", file=sys.stderr)
        return EXIT_FAILED

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # the run's end is still recorded (summary.json "interrupted", the trackers told)

    signal.signal(signal.SIGTERM, stop)
    submission = Submission(settings)
    try:
        code = submission.run()
    finally:
        shutil.rmtree(submission.home, ignore_errors=True)
    print(submission.folder)
    alone.release()
    return code


if __name__ == "__main__":
    sys.exit(main())

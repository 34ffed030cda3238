"""``python -m services.monitor``: record the memory of one Bouquet run until it ends.

Samples GPU memory through NVML (or, without a GPU, the PSS of the run's processes) every
--monitor-interval seconds into <run folder>/memory.csv, attributing every process to its
replica and every sample to its round. When the server writes summary.json (the run is over;
a server stopped by a signal writes "interrupted" and is followed into its resume), or on
SIGTERM / Ctrl-C, it writes memory_summary.json, then report.html, and exits 0. A monitor
started for a run that an earlier monitor recorded continues its memory.csv.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services import logs
from services import settings as settings_module
from services.monitor.containers import ContainerNames
from services.monitor.csvlog import MemoryCsv, read_rows, relabel
from services.monitor.follow import recording_lock, wait_for_run_folder
from services.monitor.host import HostReader
from services.monitor.nvml import NvmlUnavailable, open_nvml
from services.monitor.processes import ProcessTable
from services.monitor.readings import MemoryReader
from services.monitor.rounds import RoundLog
from services.monitor.sampler import Sampler
from services.settings import MonitorSettings
from services.monitor.summary import summarize
from services.files import METRICS, write_json_atomically

log = logging.getLogger("bouquet.monitor")
PROGRAM = "services.monitor"
INTERRUPTED = "interrupted"  # summary.json of a server stopped by a signal (services.server)


def choose_reader(source: str, table: ProcessTable, interval: float) -> MemoryReader:
    """NVML when asked or when a GPU is visible; otherwise host memory, said once."""
    if source == "host":
        return HostReader(table, interval)
    try:
        return open_nvml()
    except NvmlUnavailable as reason:
        if source == "nvml":
            print(f"{PROGRAM}: error: --monitor-source / FL_MONITOR_SOURCE = 'nvml': {reason}; use auto or host", file=sys.stderr)
            raise SystemExit(settings_module.EXIT_BAD_SETTING) from None
        log.warning("no GPU (%s): recording host memory (PSS of the run's processes) instead", reason)
        return HostReader(table, interval)


def open_exporter(port: int | None) -> Any:
    if port is None:
        return None
    from services.monitor.exporter import Exporter

    try:
        exporter = Exporter(port)
    except OSError as error:
        print(f"{PROGRAM}: error: --metrics-port / FL_METRICS_PORT = {port}: cannot listen ({error})", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("Prometheus metrics on :%d/metrics", port)
    return exporter


def main(argv: list[str] | None = None) -> int:
    settings = settings_module.parse(MonitorSettings, argv, program=PROGRAM, description=__doc__)
    logs.setup()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    table = ProcessTable(settings.monitor_scope, ContainerNames(settings.docker_api), run_volume=settings.run_volume)
    reader = choose_reader(settings.monitor_source, table, settings.monitor_interval)
    exporter = None
    try:
        exporter = open_exporter(settings.metrics_port)
        results_dir = Path(settings.results_dir)
        run_path = wait_for_run_folder(results_dir, settings.run_id, settings.run_wait, stop)
        if run_path is None:
            wanted = f"{results_dir / settings.run_id}" if settings.run_id else f"a new run folder under {results_dir}"
            log.error("gave up: %s did not appear within %g s (FL_RUN_WAIT)", wanted, settings.run_wait)
            return 1
        lock = recording_lock(run_path)
        if not lock.acquire():
            log.error("%s is being recorded by another monitor", run_path)
            return 1
        try:
            csv_out = MemoryCsv(run_path / "memory.csv")
            give_to_folder_owner(csv_out.path)
            return record(settings, run_path, reader, table, csv_out, exporter, stop)
        finally:
            lock.release()
    finally:
        reader.close()
        if exporter is not None:
            exporter.close()


def record(settings: MonitorSettings, run_path: Path, reader: MemoryReader, table: ProcessTable, csv_out: MemoryCsv, exporter: Any, stop: threading.Event) -> int:
    rounds = RoundLog(run_path / METRICS)

    def write(rows: list[dict[str, Any]]) -> None:
        csv_out.write(rows)
        if exporter is not None:
            exporter.update(rows, len(rounds.rounds))

    continued = csv_out.continuation
    sampler = Sampler(
        reader, table, rounds, write, settings.monitor_interval,
        first_sample=continued.next_sample if continued else 0, first_t=continued.first_t if continued else None,
    )
    if continued:
        log.info("continuing the recording of run %s from sample %d (the run resumed, or its monitor was restarted)", run_path.name, continued.next_sample)
    log.info("recording %s memory of run %s every %g s (scope %s) into %s", reader.source, run_path.name, settings.monitor_interval, settings.monitor_scope, csv_out.path)
    sampler.start()
    ended = "stopped by signal"
    interrupted_seen = False
    try:
        while not stop.wait(0.2):
            if (run_path / "summary.json").exists():
                if _read_json(run_path / "summary.json").get("status") == INTERRUPTED:
                    # The server was stopped, not the run: it resumes when the server starts again.
                    if not interrupted_seen:
                        log.info("the server stopped (summary: interrupted); still recording, for when the run resumes")
                    interrupted_seen = True
                    continue
                ended = "the run ended"
                seen = time.time()  # one more sample after the end, so the last round has its "after" sample
                deadline = time.monotonic() + 5 * settings.monitor_interval + 1
                while (sampler.last_t or 0) <= seen and time.monotonic() < deadline and not stop.is_set():
                    time.sleep(settings.monitor_interval / 4)
                break
    finally:
        sampler.stop()
        csv_out.close()
    finish(settings, run_path, reader, sampler, csv_out)
    log.info("stopped (%s) after %d samples", ended, sampler.samples)
    return 0


def finish(settings: MonitorSettings, run_path: Path, reader: MemoryReader, sampler: Sampler, csv_out: MemoryCsv) -> dict[str, Any]:
    rounds = RoundLog(run_path / METRICS).refresh()
    relabel(csv_out.path, rounds)
    give_to_folder_owner(csv_out.path)  # the relabelled file is a new file
    rows = read_rows(csv_out.path)
    restarts = _read_json(run_path / "state.json").get("restarts", [])  # the server's, from the run's own state
    summary = summarize(rows, rounds, settings.residual_tolerance_mib, restarted_at=[restart["from_round"] for restart in restarts])
    run_summary = run_path / "summary.json"
    summary.update(
        run_id=run_path.name,
        source=reader.source,
        scope=settings.monitor_scope,
        run_status=_read_json(run_summary).get("status"),
        run_restarts=restarts,
        monitor={
            "interval_s": settings.monitor_interval,
            "samples": sampler.samples,
            "rows": csv_out.rows_written,
            "mean_sample_ms": round(1000 * sampler.busy_s / max(1, sampler.samples), 2),
            "max_sample_ms": round(1000 * sampler.max_busy_s, 2),
            "failed_samples": sampler.errors,
            "cpu_seconds": round(sum(os.times()[:2]), 2),  # the monitor's own CPU time, start-up included
            "sessions": sessions(run_path, sampler),
        },
    )
    summary.update(reader.facts())  # devices; on the host, which measure (PSS, RSS) the numbers are
    write_json_atomically(run_path / "memory_summary.json", summary)
    give_to_folder_owner(run_path / "memory_summary.json")
    log.info("verdict: %s", summary["verdict"]["text"])
    error = draw_report(run_path, settings.residual_tolerance_mib, rows)
    if error is not None:  # the page is lost, the numbers are not: say so where they are
        summary["report_error"] = error
        write_json_atomically(run_path / "memory_summary.json", summary)
        give_to_folder_owner(run_path / "memory_summary.json")
    send_to_mlflow(run_path)
    return summary


def send_to_mlflow(run_path: Path) -> None:
    """When the server recorded the run in MLflow (tracking.json says where), add what only the
    monitor has: the memory held after each round, the verdict, memory.csv and report.html. A
    tracking server that fails is logged; the files stay in the run folder, and
    ``python -m services.tracking <run folder>`` sends them later."""
    if not (run_path / "tracking.json").exists() or "run_id" not in _read_json(run_path / "tracking.json").get("mlflow", {}):
        return
    try:
        from services.tracking.mlflow_run import send_later  # MLflow's client only when the run is in MLflow

        run = send_later(run_path)
        if run is not None:
            run.send_monitor_records()
            log.info("memory records and report sent to %s", run.where)
    except Exception as error:
        log.warning("could not send the memory records to MLflow (%s: %s); python -m services.tracking %s sends them later", type(error).__name__, error, run_path)


def draw_report(run_path: Path, tolerance_mib: float, rows: list[dict[str, Any]]) -> str | None:
    """Write report.html beside memory_summary.json, so a compose run has its report without
    the host's Python environment. Drawing is the last and least essential step: a failure
    (matplotlib missing or broken, a full disk) is logged and returned, never raised."""
    try:
        from services.monitor.report import write_report  # matplotlib is imported only here

        page = write_report(run_path, tolerance_mib, rows=rows)
        give_to_folder_owner(page)
    except Exception as error:
        log.exception("could not write %s", run_path / "report.html")
        return f"{type(error).__name__}: {error}"
    log.info("report: %s", page)
    return None


def give_to_folder_owner(path: Path) -> None:
    """Where the monitor runs as root (the Kubernetes DaemonSet: Kubernetes gives a non-root
    container no capabilities), its files should still belong to whoever owns the run folder,
    like the server's. (Compose steps it down to that owner before it starts.)"""
    if os.geteuid() == 0:
        folder = path.parent.stat()
        os.chown(path, folder.st_uid, folder.st_gid)


def sessions(run_path: Path, sampler: Sampler) -> list[dict[str, Any]]:
    """Every monitor that recorded this run, oldest first: more than one when the run resumed
    after its server stopped, or the monitor itself was restarted (memory.csv goes on)."""
    earlier = _read_json(run_path / "memory_summary.json").get("monitor", {}).get("sessions") or []
    earlier = [session for session in earlier if session["first_sample"] < sampler.first_sample]
    if sampler.first_sample > 0 and not earlier:  # the earlier monitor died before writing its summary
        earlier = [{"first_sample": 0, "samples": sampler.first_sample}]
    return [*earlier, {"first_sample": sampler.first_sample, "samples": sampler.samples}]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    sys.exit(main())

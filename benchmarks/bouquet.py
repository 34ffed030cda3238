"""Run the federation with Bouquet itself (the local launcher, ``python -m services.launcher``,
which ``scripts/run_local.py`` runs: gRPC server + N client processes on 127.0.0.1) under one
worker start method, and read back its metrics.jsonl; or any launcher command line
(``run_launcher``: app mode for benchmarks/appmode.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import psutil

from benchmarks import processes
from services import lifetime
from services.files import read_rounds, tail
from services.settings import LocalSettings, as_flags
from services.taskspec import TaskSpec

REPO = Path(__file__).resolve().parent.parent


def members(launcher_pid: int) -> dict[str, int]:
    """{"server": pid, "client-<i>": pid} among the launcher's children (they run in their own sessions)."""
    found: dict[str, int] = {}
    try:
        children = psutil.Process(launcher_pid).children()
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            command = child.cmdline()
            if "services.server" in command:
                found["server"] = child.pid
            elif "services.client" in command:
                found[child.environ().get("FL_CLIENT_ID", f"client-pid{child.pid}")] = child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


RUN_ID = "run"


def launcher_flags(work_dir: Path, clients: int, rounds: int, spec: TaskSpec, local: LocalSettings) -> list[str]:
    """The launcher's flags for one run: the task and the placement given whole, so nothing is
    left to the launcher's defaults (the Deployment Engine run gets the same objects)."""
    return [
        "--clients", str(clients), "--rounds", str(rounds), "--results-dir", str(work_dir), "--run-id", RUN_ID,
        *as_flags(spec), *as_flags(local),
    ]


def run(
    work_dir: Path,
    clients: int,
    rounds: int,
    spec: TaskSpec,
    local: LocalSettings,
    on_started: Callable[[Callable[[], dict[str, int]]], None] | None = None,
    timeout: float = 1800.0,
) -> list[dict[str, Any]]:
    """One run under ``local.worker_start``; returns its per-round records. ``on_started(members)``
    gets a function that lists the federation's processes (the benchmark samples their memory)."""
    flags = launcher_flags(work_dir, clients, rounds, spec, local)
    run_launcher(work_dir, flags, f"{local.worker_start}, {clients} clients", on_started, timeout)
    return read_rounds(work_dir / RUN_ID)


def run_launcher(
    work_dir: Path,
    flags: list[str],
    label: str,
    on_started: Callable[[Callable[[], dict[str, int]]], None] | None = None,
    timeout: float = 1800.0,
) -> Path:
    """``python -m services.launcher`` with ``flags`` (task mode, or app mode with --app) to its end;
    its run folder (``flags`` must name ``--results-dir work_dir --run-id RUN_ID``)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "services.launcher", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    log_path = work_dir / "run_local.log"
    launcher = processes.start(argv, log_path, env, REPO)
    try:
        if on_started is not None:
            on_started(lambda: members(launcher.pid))
        code = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(launcher)
        raise RuntimeError(f"launcher ({label}) did not finish within {timeout:g} s") from None
    except BaseException:
        _stop(launcher)
        raise
    if code != 0:
        raise RuntimeError(f"launcher ({label}) exited with code {code}:\n{tail(log_path)}")
    return work_dir / RUN_ID


def _stop(launcher: subprocess.Popen) -> None:
    """Ctrl-C for the launcher (it then stops its server and clients in order), SIGKILL as a last resort."""
    if launcher.poll() is None:
        lifetime.send(launcher, signal.SIGINT)
        if lifetime.wait(launcher, 45) is not None:
            return
    for pid in members(launcher.pid).values():  # each leads its own session
        lifetime.signal_group(pid, signal.SIGKILL)
    lifetime.stop(launcher, grace=1, whole_group=True)

"""Start and stop the benchmark's background processes, each with its own log file. Ports and
waiting for a process to listen: services.net (free_port, wait_until_listening);
the end of a log: services.files.tail."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A process in its own session, so stopping it also reaches the children it started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        return subprocess.Popen(argv, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL whatever is left after ``grace`` seconds."""
    for process in processes:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process, signal.SIGKILL)  # children left behind (e.g. ClientApp processes)
        if process.poll() is None:
            process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


"""Start the benchmark's background processes, each with its own log file; stop them with
services.lifetime (``stop_all(..., whole_group=True)``: the children they left behind too). Ports
and waiting for a process to listen: services.net (free_port, wait_until_listening); the end of a
log: services.files.tail."""

from __future__ import annotations

import subprocess
from pathlib import Path

from services import lifetime

STOP_GRACE_S = 10.0  # SIGTERM to each process group, SIGKILL to whatever is left after it


def start(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A process in its own session, so stopping it also reaches the children it started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        return lifetime.start(argv, dies_with_parent=False, own_session=True, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=env)


"""Three Docker hosts on this machine for tests/test_swarm.py, made and removed by
scripts/swarm_local.sh (what docs/swarm.md has a user run): each host a dockerd in a network
namespace of its own, node 1 the Swarm manager, nodes 2 and 3 workers.

Every name (namespaces, state folder) carries this test process's own prefix, so a user's swarm
of the same script, or another test session's, is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "swarm_local.sh"
TOOLS = ("docker", "dockerd", "ip", "nsenter", "unshare")


def unavailable_reason(images: list[str]) -> str | None:
    """Why three local Docker hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making network namespaces and Docker daemons needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        info = None
    if info is None or info.returncode != 0:
        return "the machine's Docker daemon is not reachable (start dockerd, e.g. `bash .ci/docker.sh start`)"
    absent = [image for image in images if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode]
    if absent:
        return f"images {absent} are missing: run scripts/build_images_offline.sh"
    return None


class LocalSwarm:
    """The three hosts: ``up()`` makes them, ``down()`` removes everything, even after a failed ``up()``."""

    def __init__(self, images: list[str]) -> None:
        # Short: the daemons' sockets live in it (a Unix socket path holds 107 bytes).
        self.state = Path(tempfile.mkdtemp(prefix="bqs-", dir="/tmp"))
        self.state.rmdir()  # swarm_local.sh makes it, and refuses one that exists
        self.prefix = f"bqt{os.getpid() % 100000}"
        self.env = {**os.environ, "BOUQUET_SWARM_DIR": str(self.state), "BOUQUET_SWARM_PREFIX": self.prefix, "BOUQUET_SWARM_IMAGES": " ".join(images)}
        self.log: list[str] = []

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        self.log.append(f"$ swarm_local.sh {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def up(self, timeout: float = 480) -> float:
        """Make the three hosts; the seconds it took."""
        started = time.monotonic()
        result = self._script("up", timeout=timeout)
        assert result.returncode == 0, f"swarm_local.sh up failed:\n{result.stdout}{result.stderr}"
        return time.monotonic() - started

    def down(self) -> None:
        self._script("down", timeout=300)

    def leftovers(self) -> list[str]:
        """What ``down`` should have removed and did not: namespaces, the state folder."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        left = [name for name in names if name.startswith(f"{self.prefix}-")]
        return left + ([str(self.state)] if self.state.exists() else [])

    def socket(self, node: int) -> str:
        return f"unix://{self.state}/n{node}/docker.sock"

    def docker(self, node: int, *args: str, timeout: float = 120, check: bool = True, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", "-H", self.socket(node), *args], capture_output=True, text=True, timeout=timeout, input=input, env=env,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker -H node{node} {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def stop_host(self, node: int) -> None:
        result = self._script("stop-host", str(node), timeout=120)
        assert result.returncode == 0, f"swarm_local.sh stop-host {node} failed:\n{result.stdout}{result.stderr}"

    def node_state(self, hostname: str) -> str:
        """The manager's view of a node: ready, down, ..."""
        return self.docker(1, "node", "inspect", "--format", "{{.Status.State}}", hostname).stdout.strip()

    def tasks(self, service: str) -> list[dict]:
        """The service's tasks as the manager lists them (every state), one dict each."""
        out = self.docker(1, "service", "ps", "--no-trunc", "--format", "{{json .}}", service).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def service_logs(self, service: str, tail: int = 80) -> str:
        return self.docker(1, "service", "logs", "--no-task-ids", "--tail", str(tail), service, check=False, timeout=60).stdout

"""The compose path exactly as docs/containers.md and the README tell a user to type it (issue 20).

- TLS: `scripts/make_certs.py --out certs --name server ...` as whoever runs it (root in CI),
  and as another user with a private umask, while Docker creates ./results (so the server
  steps down to uid 1000, not the key's owner): the run completes over TLS either way.
- Following a run to its end: `docker compose up --attach server --attach gpu-monitor
  --abort-on-container-failure --exit-code-from server` returns the server's exit status: 0 for
  a completed run (with report.html written), 1 for a run whose rounds all failed (a task whose
  train raises), without being cut short by the one-shot `check` exiting 0.

Marked ``docker``; they skip without Docker and the CPU images unless BOUQUET_REQUIRE_DOCKER=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_compose import REPO, Stack, _docker_ready

# The command docs/containers.md gives for following a run to its end (issue 20: the usual
# `--abort-on-container-exit` also aborts when `check` exits 0; `--abort-on-container-failure`
# alone also when a replica crashes, which Docker would restart).
FOLLOW = ("up", "--attach", "server", "--attach", "gpu-monitor", "--abort-on-container-failure", "--exit-code-from", "server")
MAKE_CERTS = ("scripts/make_certs.py", "--out", "certs", "--name", "server", "--name", "localhost", "--ip", "127.0.0.1")
OTHER_USER = 1001  # a host user who is neither root nor the image's uid 1000


def _follow(stack: Stack, replicas: int) -> subprocess.CompletedProcess:
    return stack.run(*FOLLOW, "--no-build", "--scale", f"client={replicas}", check=False, timeout=900)


def _summary(results: Path) -> dict:
    [run_dir] = [path for path in results.iterdir() if path.is_dir()]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def project_folder():
    """A folder other users can enter (pytest's tmp_path is private to its user), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="bouquet-documented-"))
    folder.chmod(0o755)
    yield folder
    subprocess.run(["docker", "run", "--rm", "--user", "0", "-v", f"{folder}:/f", "--entrypoint", "sh", "bouquet/server:cpu", "-c", "rm -rf /f/*"],
                   capture_output=True)  # Docker made ./results as root and the server wrote into it
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("maker", ["invoking user", "another user"])
def test_tls_exactly_as_documented_completes(project_folder: Path, maker: str) -> None:
    """Issue 20: certificates made as root gave `cannot read server.key as uid 1000` and the
    run died in 1.5 s. Here nobody chowns anything: ./results is left for Docker to create."""
    compose = _docker_ready("v2")
    make_certs = [sys.executable, str(REPO / MAKE_CERTS[0]), *MAKE_CERTS[1:]]
    if maker == "another user" and os.geteuid() != 0:
        pytest.skip("a folder of another user needs root to make (CI runs as root)")
    # umask 077 for the other user: a careful user's; make_certs.py must still leave ca.crt readable by the replicas
    made = subprocess.run(make_certs, cwd=project_folder, capture_output=True, text=True, umask=0o077 if maker == "another user" else -1)
    assert made.returncode == 0, made.stderr
    certs, results = project_folder / "certs", project_folder / "results"
    if maker == "another user":  # their folder, as they would have made it (the interpreter here may be private to root)
        for path in (certs, *certs.iterdir()):
            os.chown(path, OTHER_USER, OTHER_USER)
    assert (certs / "server.key").stat().st_mode & 0o077 == 0, "the key must stay private to its owner"
    stack = Stack(compose, results, f"tls{maker.split()[0]}", FL_DATASET="digits", FL_ROUNDS="1", FL_LOCAL_EPOCHS="1",
                  COMPOSE_FILE="docker-compose.yml:docker-compose.tls.yml", BOUQUET_TLS_DIR=str(certs))
    try:
        up = _follow(stack, 2)
        said = up.stdout + up.stderr
        assert up.returncode == 0, f"exit {up.returncode}\n{said[-4000:]}"
        summary = _summary(results)
        assert summary["status"] == "completed" and summary["num_partitions"] == 2, summary
        assert (results / summary["run_id"] / "report.html").exists(), "the command returned before the sidecar wrote the report"
        server_log = stack.run("logs", "--no-color", "server").stdout
        assert "with TLS" in server_log, server_log[-2000:]
    finally:
        stack.down()


FAILING_TASK = '''"""The built-in task, except that every training raises: every round fails for every client."""
from services.builtin_task import Net, configure, load_centralized_dataset, load_data, test  # noqa: F401


def train(net, trainloader, epochs, lr, device):
    raise RuntimeError("this task fails every training on purpose")
'''


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_documented_follow_command_returns_a_failed_runs_exit_status(project_folder: Path) -> None:
    compose = _docker_ready("v2")
    task = project_folder / "task"
    task.mkdir(mode=0o755)
    (task / "task.py").write_text(FAILING_TASK)
    (task / "task.py").chmod(0o644)
    results = project_folder / "results"
    stack = Stack(compose, results, "followfail", FL_TASK="/task/task.py", BOUQUET_TASK_DIR=str(task), FL_ROUNDS="1")
    try:
        up = _follow(stack, 2)
        said = up.stdout + up.stderr
        assert up.returncode == 1, f"exit {up.returncode}\n{said[-4000:]}"
        summary = _summary(results)
        assert summary["status"] == "incomplete" and summary["rounds_completed"] == 0, summary
        assert "dependency failed to start" not in said, said[-4000:]
    finally:
        stack.down()

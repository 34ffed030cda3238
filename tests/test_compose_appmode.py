"""App mode under Compose v2 (8 replicas) and Debian's docker-compose 1.29 (3): the same
docker-compose.yml with FL_MODE=app.

`up --scale client=N` then `run --rm submit` with the example Flower App in the task folder, as
the README says. The server container runs the SuperLink, each replica a SuperNode with its
partition; the submit service streams the run and exits 0; every message ran in a worker forked
by the host's one worker pool (after a node's first message, from the pool's warm child that
loaded the App once), never more at once than slots; the memory sidecar attributes the
replicas' processes and writes its report. BOUQUET_TEST_IMAGE_TAG=<tag> runs images built with
`scripts/build_images_offline.sh --tag <tag>` (default: the cpu tags CI builds).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from test_compose import REPO, Stack, _docker_ready

EXAMPLE = REPO / "examples" / "quickstart-app"


def app_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "task"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def image_overlay(tmp_path: Path) -> str:
    """COMPOSE_FILE: the base file, plus an overlay naming other images when a tag is asked for."""
    tag = os.environ.get("BOUQUET_TEST_IMAGE_TAG", "cpu")
    if tag == "cpu":
        return "docker-compose.yml"
    overlay = tmp_path / "images.yml"
    server = f"    image: bouquet/server:{tag}\n"
    client = f"    image: bouquet/client:{tag}\n"
    overlay.write_text("services:\n" + "".join(f"  {name}:\n{server}" for name in ("join-secret", "check", "server", "submit", "gpu-monitor"))
                       + "".join(f"  {name}:\n{client}" for name in ("client", "worker-pool")))
    return f"docker-compose.yml:{overlay}"


@pytest.mark.docker
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("implementation, replicas", [("v2", 8), ("v1", 3)])
def test_app_mode_scale_runs_the_flower_app_on_every_replica(tmp_path: Path, implementation: str, replicas: int) -> None:
    compose = _docker_ready(implementation)
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)
    stack = Stack(compose, results, f"appmode{implementation}", FL_MODE="app", BOUQUET_TASK_DIR=str(app_folder(tmp_path)), FL_RUN_ID="app8",
                  FL_APP_RUN_CONFIG="num-server-rounds=2", FL_TORCH_THREADS="1")
    stack.env["COMPOSE_FILE"] = image_overlay(tmp_path)
    logs = stack.logs
    try:
        stack.run("up", "--detach", "--no-build", "--scale", f"client={replicas}")
        submitted = stack.run("run", "--rm", "submit", timeout=1200, check=False)
        run_dir = results / "app8"
        summary = json.loads((run_dir / "summary.json").read_text())
        context = f"\n{submitted.stdout[-3000:]}{submitted.stderr[-2000:]}\n{logs()}"
        assert submitted.returncode == 0, context
        assert "Successfully started run" in (run_dir / "flwr-run.log").read_text()
        assert summary["status"] == "completed" and sorted(summary["partitions"].values()) == list(range(replicas)), context
        records = [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]
        trains = [r for r in records if r["message_type"] == "train"]
        assert len(trains) == replicas * 2 and all(r["outcome"] == "ok" for r in records), context
        assert len({r["node"] for r in trains}) == replicas
        assert len({r["parent_pid"] for r in records}) == 1 and all(r["forkserver_pid"] is None for r in records), "not all forked by the one pool"
        for node in {r["node"] for r in records}:
            mine = [r for r in records if r["node"] == node]
            assert len({r["pid"] for r in mine}) == len(mine), f"{node}: a worker pid served two messages"
            assert all(r["app_was_warm"] for r in mine[1:]), f"{node}: a later message loaded the App again"
        slots = {r["slots"] for r in records}
        assert len(slots) == 1 and summary["concurrent_workers_peak"]["cpu"] <= slots.pop(), summary

        deadline = time.monotonic() + 180
        while not (run_dir / "report.html").exists():
            assert time.monotonic() < deadline, f"no report.html 180 s after the run ended\n{logs()}"
            time.sleep(2)
        with open(run_dir / "memory.csv") as rows:
            table = list(csv.DictReader(rows))
        seen = {row["replica"] for row in table if row["role"] == "client"}
        assert len(seen) == replicas, f"monitor saw client replicas {seen}"
        workers = {row["replica"] for row in table if row["role"] == "worker"}
        assert workers and workers <= seen, f"per-message workers attributed to {workers}, not to the replicas {seen}"
        assert any(row["replica"] == "worker-pool" for row in table), "the pool is not a line of its own"
        memory = json.loads((run_dir / "memory_summary.json").read_text())
        assert memory["verdict"]["ok"] is True, memory["verdict"]["text"]
    finally:
        stack.down()


STRANGER_CALLS = [("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"),
                  ("POST", "/v1/runtime/acquire-task"), ("GET", "/openapi.json"), ("GET", "/docs")]


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_app_mode_over_tls_shows_strangers_only_the_fleet_calls_and_submits_through_the_private_control_port(tmp_path: Path) -> None:
    """As docs/appmode.md runs it with docker-compose.tls.yml and docker-compose.publish.yml: the
    published :8080 answers a stranger's Control, Runtime and API-page calls 404, the published
    Control port 403 without the submit token; `run --rm submit` completes on both replicas,
    whose SuperNode keys the server registered."""
    import httpx

    from services.certs import make_certificates
    from services.net import free_port

    compose = _docker_ready("v2")
    results, certs = tmp_path / "results", tmp_path / "certs"
    results.mkdir()
    results.chmod(0o777)
    make_certificates(certs, ["server", "localhost"], ["127.0.0.1"])
    if os.geteuid() == 0:  # as a user would have them: certificates owned by one (non-root) user
        for path in (certs, *certs.iterdir()):
            os.chown(path, 1000, 1000)
    published, control = free_port(), free_port()
    stack = Stack(compose, results, "appfront", FL_MODE="app", BOUQUET_TASK_DIR=str(app_folder(tmp_path)), FL_RUN_ID="front",
                  FL_APP_RUN_CONFIG="num-server-rounds=1", FL_TORCH_THREADS="1", BOUQUET_TLS_DIR=str(certs),
                  BOUQUET_SERVER_PORT=str(published), BOUQUET_CONTROL_PORT=str(control))
    stack.env["COMPOSE_FILE"] = f"{image_overlay(tmp_path)}:docker-compose.tls.yml:docker-compose.publish.yml"
    logs = stack.logs
    try:
        stack.run("up", "--detach", "--no-build", "--scale", "client=2")
        submitted = stack.run("run", "--rm", "submit", timeout=1200, check=False)
        context = f"\n{submitted.stdout[-3000:]}{submitted.stderr[-2000:]}\n{logs()}"
        assert submitted.returncode == 0, context
        summary = json.loads((results / "front" / "summary.json").read_text())
        assert summary["status"] == "completed" and sorted(summary["partitions"].values()) == [0, 1], context
        with httpx.Client(base_url=f"https://127.0.0.1:{published}", verify=str(certs / "ca.crt"), timeout=30) as stranger:
            answers = {path: stranger.request(method, path, content=b"").status_code for method, path in STRANGER_CALLS}
        assert answers == {path: 404 for _, path in STRANGER_CALLS}
        with httpx.Client(base_url=f"https://127.0.0.1:{control}", verify=str(certs / "ca.crt"), timeout=30) as caller:
            assert caller.post("/v1/control/list-runs", content=b"").status_code == 403
        server_log = stack.run("logs", "--no-color", "server", check=False).stdout
        assert server_log.count("SuperNode key") >= 2 and "registered" in server_log, server_log[-3000:]
        assert "Bearer" not in server_log and "SuperNode authentication is off" not in server_log
    finally:
        stack.down()

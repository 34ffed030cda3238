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
    overlay.write_text("services:\n" + "".join(f"  {name}:\n{server}" for name in ("check", "server", "submit", "gpu-monitor")) + "".join(f"  {name}:\n    image: bouquet/client:{tag}\n" for name in ("client", "worker-pool")))
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

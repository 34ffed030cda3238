"""A real federation: server and 3 clients as processes, gRPC over loopback, digits.

While it runs, the test SIGKILLs one client's worker in round 2 (what the kernel's OOM
killer does). Asserted from the run folder, as a user would read it: accuracy rises,
every fit ran in a fresh worker (not the client, not last round's worker), the killed
round is recorded as failed for that client only, and the client trains again in round 3.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, REPO

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS, VICTIM = 3, 3, "client-1"


def client_process(identity: str, data_dir: Path) -> psutil.Process | None:
    """This run's client with that identity (its --data-dir is this test session's own)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        try:
            if "services.client" in cmdline and str(data_dir) in cmdline and process.environ().get("FL_CLIENT_ID") == identity:
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def training_worker(client: psutil.Process) -> psutil.Process | None:
    """A worker under the client: spawned (its child) or forked by its forkserver (a grandchild)."""
    try:
        for process in client.children(recursive=True):
            parent = process.parent()
            if parent is not None and parent.pid != client.pid and "forkserver" in " ".join(parent.cmdline()):
                return process
            if "--multiprocessing-fork" in process.cmdline() and "forkserver" not in " ".join(process.cmdline()):
                return process
    except psutil.Error:
        pass
    return None


def kill_worker_in_round_2(run_path: Path, data_dir: Path, stop: threading.Event, killed: list[int]) -> None:
    """Once round 1 is recorded, SIGKILL the victim's next training worker as soon as it exists."""
    metrics = run_path / "metrics.jsonl"
    victim = None
    while not stop.is_set():
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            victim = victim or client_process(VICTIM, data_dir)
            worker = training_worker(victim) if victim else None
            if worker is not None:
                worker.kill()
                killed.append(worker.pid)
                return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    run_id = "integration"
    data_dir = tmp_path_factory.getbasetemp() / "data"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_worker_in_round_2, args=(results / run_id, data_dir, stop, killed), daemon=True)
    killer.start()
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--dataset", "digits",
         "--results-dir", str(results), "--run-id", run_id, "--data-dir", str(data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=420,
    )
    stop.set()
    killer.join()
    run_path = results / run_id
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    return run_path, rounds, json.loads((run_path / "summary.json").read_text()), killed, done


def test_all_rounds_complete_and_accuracy_rises(federation):
    run_path, rounds, summary, _, done = federation
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["initial_accuracy"] < rounds[0]["accuracy"] < rounds[-1]["accuracy"]
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert sorted(p.name for p in (run_path / "checkpoints").iterdir()) == ["round-0001.npz", "round-0002.npz", "round-0003.npz"]
    assert str(run_path) in done.stdout


def test_every_client_holds_its_own_partition(federation):
    _, rounds, summary, _, _ = federation
    assert sorted(summary["partitions"].values()) == [0, 1, 2]
    first = {c["id"]: c["partition"] for c in rounds[0]["clients"]}
    assert first == summary["partitions"]
    assert sum(c["num_examples"] for c in rounds[0]["clients"]) == 1437  # digits' training split, each example once


def test_every_fit_ran_in_a_fresh_worker(federation):
    _, rounds, _, _, _ = federation
    previous: dict[str, int] = {}
    for record in rounds:
        for client in record["clients"]:
            assert client["worker_pid"] != client["client_pid"]
            assert client["worker_pid"] != previous.get(client["id"])
            previous[client["id"]] = client["worker_pid"]


def test_killed_worker_fails_its_round_and_the_client_stays_up(federation):
    _, rounds, _, killed, _ = federation
    assert killed, "the test never found the victim's worker to kill"
    round_2 = rounds[1]
    assert (round_2["clients_ok"], round_2["clients_failed"]) == (CLIENTS - 1, 1)
    [failure] = round_2["failures"]
    assert failure["id"] == VICTIM and failure["worker_pid"] == killed[0] and "SIGKILL" in failure["cause"]
    assert VICTIM in {c["id"] for c in rounds[2]["clients"]}  # same client process, next round
    assert rounds[2]["clients_ok"] == CLIENTS

"""A real federation: server and 3 clients as processes, gRPC over loopback, digits.

One client's worker SIGKILLs itself in round 2 (what the kernel's OOM killer does): the run
trains the built-in task through tests/tasks/killed_in_round_2.py, which does that in the
victim's second training, so the kill happens at a known moment, however fast or slow this
machine is. Asserted from the run folder, as a user would read it: accuracy rises, every fit
ran in a fresh worker (not the client, not last round's worker), the killed round is recorded
as failed for that client only, and the client trains again in round 3.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS, VICTIM = 3, 3, "client-1"
TASK = REPO / "tests" / "tasks" / "killed_in_round_2.py"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    records = tmp_path_factory.mktemp("victim")
    run_id = "integration"
    data_dir = tmp_path_factory.getbasetemp() / "data"
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--task", str(TASK), "--dataset", "digits",
         "--results-dir", str(results), "--run-id", run_id, "--data-dir", str(data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=420,
        env={**os.environ, "BOUQUET_TEST_VICTIM": VICTIM, "BOUQUET_TEST_RECORDS": str(records)},
    )
    run_path = results / run_id
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    killed = [int((records / "killed.pid").read_text())] if (records / "killed.pid").exists() else []
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
    assert killed, "the victim's worker never reached its second training"
    round_2 = rounds[1]
    assert (round_2["clients_ok"], round_2["clients_failed"]) == (CLIENTS - 1, 1)
    [failure] = round_2["failures"]
    assert failure["id"] == VICTIM and failure["worker_pid"] == killed[0] and "SIGKILL" in failure["cause"]
    victim_pids = [{c["id"]: c["client_pid"] for c in record["clients"]}.get(VICTIM) for record in (rounds[0], rounds[2])]
    assert victim_pids[0] is not None and victim_pids[0] == victim_pids[1]  # same client process, next round
    assert rounds[2]["clients_ok"] == CLIENTS

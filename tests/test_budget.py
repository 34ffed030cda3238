"""One time budget per client job, known to both sides (services.budget): the wait for a slot is
bounded by the round's budget, not by FL_WORKER_TIMEOUT, so an honest client queued behind the
others is never cut off; a client past its budget is recorded as timed out."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from services import worker
from services.admission.gate import Admission
from services.budget import TRANSFER_MARGIN_S, JobBudget
from services.failures import Kind

from conftest import PYTHON, REPO

TASKS = REPO / "tests" / "tasks"


def test_the_budget_covers_a_full_queue_and_the_retry():
    budget = JobBudget.for_round(worker_timeout=10.0, jobs=6)
    assert budget.slot_wait_s == 60.0  # the five other jobs and one more ahead of it, each at its limit
    assert budget.client_s == 2 * (60.0 + 10.0)  # the job and its one retry after an out-of-memory
    assert budget.deadline_s == budget.client_s + TRANSFER_MARGIN_S
    assert JobBudget.for_round(10.0, 0).slot_wait_s == 10.0  # before the partitions are settled


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_wait_for_a_slot_is_bounded_by_its_own_limit_not_the_job_timeout(tmp_path):
    """A job that waits longer than its timeout for a slot still runs; past the wait's own limit it
    fails as timed out waiting for a slot."""
    from concurrent.futures import ThreadPoolExecutor
    from multiprocessing.connection import Listener

    one_slot = Admission(slots_dir=str(tmp_path / "slots"), slots=1, device="cpu")
    with Listener(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(max_workers=1) as pool:
        holder = pool.submit(worker.run, "worker_jobs:announce_and_hold", {"address": listener.address, "seconds": 4.0},
                             timeout=60, start_method="spawn", admission=one_slot)
        with listener.accept() as connection:
            connection.recv()  # the holder has the only slot for 4 s from now
        queued = worker.run("worker_jobs:report_pid", {"value": 1}, timeout=1.0, start_method="spawn", admission=one_slot, wait_timeout=60.0)
        assert queued.admitted["slot_wait_seconds"] > 1.0  # it waited longer than its own timeout, and ran
        holder.result()
        blocker = pool.submit(worker.run, "worker_jobs:announce_and_hold", {"address": listener.address, "seconds": 5.0},
                              timeout=60, start_method="spawn", admission=one_slot)
        with listener.accept() as connection:
            connection.recv()
        with pytest.raises(worker.WorkerFailed) as failure:
            worker.run("worker_jobs:report_pid", {"value": 1}, timeout=60.0, start_method="spawn", admission=one_slot, wait_timeout=1.0)
        assert failure.value.kind is Kind.TIMED_OUT
        assert failure.value.cause == "timed out after 1 s waiting for a slot (FL_WORKER_SLOTS)"
        blocker.result()  # it ends by itself a few seconds later


def run_local(tmp_path: Path, data_dir: Path, *flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--rounds", "1", "--dataset", "digits", "--local-epochs", "1",
         "--results-dir", str(tmp_path / "results"), "--data-dir", str(data_dir), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=560, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return done, Path(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_six_clients_queued_for_one_slot_with_a_short_worker_timeout_are_never_cut_off(tmp_path, data_dir):
    # Each job sleeps 8 s; six of them, one at a time, queue longer than the worker timeout. (The
    # timeout also bounds the server's task check, whose worker waits for the forkserver's torch
    # import on a loaded host: not smaller.)
    worker_timeout = 25.0
    done, run = run_local(tmp_path, data_dir, "--clients", "6", "--worker-slots", "1", "--worker-timeout", str(worker_timeout),
                          "--task", str(TASKS / "sleeps_in_train.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["failures"] == [] and record["clients_ok"] == 6
    waits = [client["slot_wait_seconds"] for client in record["clients"]]
    assert max(waits) > worker_timeout, waits  # the queue was longer than the worker timeout, and nobody was cut off
    assert record["concurrent_workers_peak"] == {"cpu": 1}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_hung_client_is_recorded_as_timed_out_within_its_budget(tmp_path, data_dir):
    worker_timeout = 30.0  # not smaller: it also bounds the server's task check (see above)
    done, run = run_local(tmp_path, data_dir, "--clients", "2", "--worker-timeout", str(worker_timeout),
                          "--task", str(TASKS / "hangs_in_train.py"))
    assert done.returncode != 0  # no round trained
    [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not record["trained"] and record["clients_ok"] == 0
    assert [(f["kind"], f["cause"]) for f in record["failures"]] == [("timed out", "timed out after 30 s (FL_WORKER_TIMEOUT)")] * 2
    assert record["round_seconds"] < JobBudget.for_round(worker_timeout, 2).deadline_s

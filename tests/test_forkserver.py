"""The forkserver start method: every worker is a new process forked from a forkserver that
preloaded torch and never touched CUDA, so each worker still gets (and frees) its own CUDA context.

The CUDA state of the forkserver is read through a forked child: a child is a memory copy of the
forkserver, and torch's at-fork hook marks it as a "bad fork" when the forkserver initialised
CUDA or merely counted devices. ``test_probe_detects_a_parent_that_touched_cuda`` shows the probe
does catch that on this machine (no GPU needed: counting devices is enough to poison a fork).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services import worker
from services.taskspec import Placement, TaskSpec

pytestmark = pytest.mark.integration  # real forkservers (torch preloaded) and workers

PROBE = "tests.worker_jobs:inherited_cuda_state"
REPO = Path(__file__).resolve().parent.parent


def digits_spec() -> TaskSpec:
    return TaskSpec(
        dataset="digits", model="digits-cnn", local_epochs=1, batch_size=32, learning_rate=0.05,
        partitioning="iid", dirichlet_alpha=0.5, seed=0, synthetic_samples=100, worker_timeout=300.0,
    )


def forkserver_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for pid {pid}")


def test_workers_are_new_pids_forked_from_a_forkserver_that_never_initialises_cuda(data_dir: Path) -> None:
    first = worker.run(PROBE, {}, timeout=300, start_method="forkserver")
    server_pid = worker.forkserver_pid()
    assert server_pid is not None and server_pid != os.getpid()

    # Real work in between: training and evaluation use CUDA in the worker when there is a GPU.
    placement = Placement(str(data_dir), "auto")
    initial = worker.run("services.task:initial_weights", {"spec": digits_spec()}, timeout=300, start_method="forkserver")
    trained = worker.run(
        "services.task:train",
        {"spec": digits_spec(), "placement": placement, "weights": initial.value, "partition_id": 0, "num_partitions": 2, "server_round": 1},
        timeout=300,
        start_method="forkserver",
    )
    scored = worker.run(
        "services.task:evaluate", {"spec": digits_spec(), "placement": placement, "weights": trained.value["weights"]},
        timeout=300, start_method="forkserver",
    )
    last = worker.run(PROBE, {}, timeout=300, start_method="forkserver")

    pids = [first.pid, initial.pid, trained.pid, scored.pid, last.pid]
    assert len(set(pids)) == len(pids), f"a worker PID was reused: {pids}"
    assert os.getpid() not in pids and server_pid not in pids
    assert trained.value["metrics"]["worker_pid"] == trained.pid
    assert worker.forkserver_pid() == server_pid, "the forkserver was restarted between workers"
    for probe in (first.value, last.value):
        assert probe["parent_pid"] == server_pid, "the worker was not forked from the forkserver"
        assert probe["torch_preloaded"], "the forkserver did not preload torch"
        assert not probe["parent_cuda_initialized"], "the forkserver initialised CUDA"
        assert not probe["bad_fork"], "the forkserver touched CUDA (initialised it or counted devices)"
        assert not probe["cuda_initialized"]
    # Forking a multi-threaded process can deadlock the child; the forkserver must stay single-threaded.
    assert forkserver_threads(server_pid) == 1


def test_probe_detects_a_parent_that_touched_cuda() -> None:
    """Negative control: a parent that calls torch.cuda.is_available() before forking is caught,
    both by the probe and by the guard every forkserver worker runs first."""
    code = textwrap.dedent(
        """
        import json, multiprocessing, torch
        from services import worker
        from tests.worker_jobs import inherited_cuda_state

        def child(queue):
            state = inherited_cuda_state()
            try:
                worker._refuse_poisoned_fork()
                state["guard"] = "passed"
            except RuntimeError as error:
                state["guard"] = str(error)
            queue.put(state)

        if __name__ == "__main__":
            torch.cuda.is_available()  # what a careless preloaded module might do at import
            context = multiprocessing.get_context("fork")
            queue = context.Queue()
            process = context.Process(target=child, args=(queue,))
            process.start()
            print(json.dumps(queue.get(timeout=120)))
            process.join()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["bad_fork"] is True
    assert "forkserver touched CUDA" in state["guard"]


def test_a_killed_forkserver_is_replaced_and_workers_keep_running() -> None:
    worker.prestart("forkserver")
    old = worker.forkserver_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    result = worker.run(PROBE, {}, timeout=300, start_method="forkserver")
    assert worker.forkserver_pid() not in (None, old)
    assert result.value["parent_pid"] == worker.forkserver_pid()
    assert not result.value["bad_fork"]


@pytest.mark.parametrize(
    ("job", "cause"),
    [("tests.worker_jobs:raise_error", "ValueError: bad partition"), ("tests.worker_jobs:kill_self", "killed by SIGKILL")],
)
def test_forkserver_worker_failures_are_reported_and_reaped(job: str, cause: str) -> None:
    with pytest.raises(worker.WorkerFailed) as failure:
        worker.run(job, {}, timeout=120, start_method="forkserver")
    assert cause in failure.value.cause
    assert failure.value.pid is not None and not Path(f"/proc/{failure.value.pid}").exists()


def test_forkserver_worker_past_its_timeout_is_killed() -> None:
    with pytest.raises(worker.WorkerFailed) as failure:
        worker.run("tests.worker_jobs:sleep_forever", {}, timeout=3, start_method="forkserver")
    assert "timed out" in failure.value.cause
    assert not Path(f"/proc/{failure.value.pid}").exists()


def test_a_worker_starts_with_what_fl_worker_preload_names_already_imported() -> None:
    """FL_WORKER_PRELOAD (task mode's client and server, app mode's node): the forkserver imports
    it once, so a worker's job finds it in sys.modules without importing it. A fresh interpreter:
    this test session's forkserver preloads other things."""
    code = textwrap.dedent(
        """
        import json
        from services import worker
        worker.prestart("forkserver", extra_preload=["sklearn.model_selection"])
        preloaded = worker.run("tests.worker_jobs:imported", {"module": "sklearn.model_selection"}, timeout=300, start_method="forkserver").value
        other = worker.run("tests.worker_jobs:imported", {"module": "sklearn.cluster"}, timeout=300, start_method="forkserver").value
        print(json.dumps([preloaded, other]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, False]

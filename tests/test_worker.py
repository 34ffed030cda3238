"""A worker either brings back its result or a one-line cause; either way it is reaped."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psutil
import pytest

from services import worker
from services.admission.gate import Admission
from services.failures import Kind

from conftest import PYTHON, REPO
from services.monitor.processes import is_worker_process


def no_children_left() -> bool:
    """No worker is left. multiprocessing's own helpers (the resource tracker, and a forkserver
    an earlier test started) live as long as this process, by design."""
    helpers = ("resource_tracker", "forkserver")
    workers = [c for c in psutil.Process().children(recursive=True) if not any(h in " ".join(c.cmdline()) for h in helpers)]
    return not workers


def test_result_comes_back_from_a_new_process():
    result = worker.run("worker_jobs:report_pid", {"value": 21}, timeout=60)
    assert result.value["value"] == 42
    assert result.pid == result.value["pid"] != os.getpid()
    assert result.value["parent"] == os.getpid()
    assert 0 < result.start_seconds <= result.total_seconds
    assert no_children_left()


def test_each_run_gets_a_fresh_pid():
    pids = {worker.run("worker_jobs:report_pid", {"value": 1}, timeout=60).pid for _ in range(3)}
    assert len(pids) == 3


def test_large_results_do_not_deadlock_the_pipe():
    result = worker.run("worker_jobs:large_result", {"megabytes": 64}, timeout=120)
    assert len(result.value) == 64 * 2**20


@pytest.mark.parametrize(
    "job, kwargs, timeout, kind, cause, traceback_names",
    [
        ("worker_jobs:raise_error", {}, 60, Kind.TASK_ERROR, "ValueError: bad partition", "raise_error"),
        ("worker_jobs:kill_self", {}, 60, Kind.KILLED, "killed by SIGKILL", None),
        ("worker_jobs:sleep_forever", {}, 3, Kind.TIMED_OUT, "timed out after 3 s", None),
        ("worker_jobs:exit_quietly", {}, 60, Kind.TASK_ERROR, "exited with code 3", None),
        ("worker_jobs:no_such_job", {}, 60, Kind.TASK_ERROR, "AttributeError", "resolve"),
        ("worker_jobs:out_of_memory_always", {}, 60, Kind.OUT_OF_MEMORY, "out of GPU memory (RuntimeError: CUDA error: out of memory)", "out_of_memory_always"),
    ],
)
def test_failures_name_their_kind_cause_and_traceback_and_leave_no_process(job, kwargs, timeout, kind, cause, traceback_names):
    with pytest.raises(worker.WorkerFailed) as failure:
        worker.run(job, kwargs, timeout=timeout)
    assert failure.value.kind is kind
    assert cause in failure.value.cause
    if traceback_names:  # the worker's own traceback came back, down to the frame that raised
        assert "Traceback (most recent call last)" in failure.value.traceback and traceback_names in failure.value.traceback
    else:
        assert failure.value.traceback == ""
    assert failure.value.record()["kind"] == kind.value
    assert failure.value.pid not in (None, os.getpid())
    assert no_children_left()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_worker_killed_while_receiving_large_inputs_does_not_hang_the_caller(start_method):
    """The OOM killer can strike before a worker has read its inputs (the weights); the
    caller then sees EOF or a reset connection, and must report the kill either way."""
    me = psutil.Process()
    worker.prestart(start_method)
    # prestart returns before the forkserver has imported its preloads, and importing them runs
    # subprocesses of the forkserver (ctypes.util.find_library runs /sbin/ldconfig -p), which look
    # like its workers: one job first, so the forkserver is done with them and only forks jobs.
    worker.run("worker_jobs:report_pid", {"value": 1}, timeout=60, start_method=start_method)
    before = {p.pid for p in me.children(recursive=True)}
    killed: list[int] = []

    def kill_first_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:  # listing children races with processes exiting: psutil may raise, so just look again
                for child in me.children(recursive=True):
                    if child.pid not in before and is_worker_process(child):
                        child.kill()
                        killed.append(child.pid)
                        return
            except psutil.Error:
                pass
            time.sleep(0.001)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    with pytest.raises(worker.WorkerFailed, match="SIGKILL") as failure:
        # The job never ends by itself: if the kill comes late it still ends the worker, never the test.
        worker.run("worker_jobs:sleep_forever", {"padding": b"x" * 50 * 2**20}, timeout=90, start_method=start_method)
    killer.join()
    assert killed == [failure.value.pid]  # the job's own worker, nothing else
    assert no_children_left()


def test_inprocess_mode_runs_in_the_caller():
    result = worker.run("worker_jobs:report_pid", {"value": 2}, timeout=60, start_method="inprocess")
    assert result.pid == os.getpid() == result.value["pid"]
    with pytest.raises(worker.WorkerFailed, match="ValueError: bad partition"):
        worker.run("worker_jobs:raise_error", {}, timeout=60, start_method="inprocess")


def test_unknown_start_method_is_refused():
    with pytest.raises(ValueError, match="start_method"):
        worker.run("worker_jobs:report_pid", {"value": 1}, timeout=5, start_method="fork")


CLIENT_HOLDING_A_SLOT = """
import sys
from services import worker
from services.admission.gate import Admission

host, port, start_method, slots_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
worker.run("worker_jobs:announce_and_hold", {"address": (host, port), "seconds": 3600}, timeout=3600,
           start_method=start_method, admission=Admission(slots_dir=slots_dir, slots=1, device="cpu"))
"""


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_worker_dies_with_its_sigkilled_client_and_frees_its_slot(tmp_path, start_method):
    """Outside a container nothing else would stop it: a client SIGKILLed mid-job must not leave
    its worker training and holding its slot (PR_SET_PDEATHSIG in the worker)."""
    from multiprocessing.connection import Listener

    from services.admission.slots import DeviceSlots

    slots_dir = str(tmp_path / "slots")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    with Listener(("127.0.0.1", 0)) as listener:
        host, port = listener.address
        client = subprocess.Popen([PYTHON, "-c", CLIENT_HOLDING_A_SLOT, host, str(port), start_method, slots_dir], env=env)
        try:
            with listener.accept() as connection:  # the worker holds the only slot now
                worker_pid = connection.recv()
            held = psutil.Process(worker_pid)
            assert DeviceSlots(slots_dir, "cpu").held() == 1
            client.kill()
            client.wait(timeout=60)
        finally:
            client.kill()
            client.wait()
    held.wait(timeout=60)  # returns once the worker is gone; it would hold its slot for an hour
    assert DeviceSlots(slots_dir, "cpu").held() == 0
    again = worker.run("worker_jobs:report_pid", {"value": 1}, timeout=120, start_method="spawn",
                       admission=Admission(slots_dir=slots_dir, slots=1, device="cpu"))
    assert again.admitted["slot_wait_seconds"] < 5  # the slot was free, not waited for

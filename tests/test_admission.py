"""Host-wide admission of workers to device slots, with real worker processes and two fake GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Listener
from pathlib import Path

import pytest

from services import worker
from services.admission import retry
from services.admission.gate import Admission
from services.admission.inventory import Device, _allowed
from services.admission.sizing import NeedBook, size
from services.failures import is_out_of_memory
from services.admission.slots import DeviceSlots
from services.server.results import concurrent_workers_peak, slots_per_device

from conftest import PYTHON, REPO
from fake_gpus import FakeGpus

START = "forkserver"  # the default, and fast: a forked worker starts in milliseconds


def admission(tmp_path: Path, slots="auto", **overrides) -> Admission:
    return Admission(slots_dir=str(tmp_path / "slots"), slots=slots, **{"inventory": FakeGpus((8000.0, 6000.0)), **overrides})


# --- sizing ------------------------------------------------------------------------------------


def gpu(free: float) -> Device:
    return Device("cuda:0", "GPU-x", 16000.0, free)


def test_auto_on_a_gpu_starts_with_one_slot_until_a_worker_measured_its_need():
    assert size(gpu(12000), "auto", None, held=0, measured=True).slots == 1


def test_auto_on_a_gpu_divides_usable_memory_by_the_need_counting_held_slots_back():
    assert size(gpu(12000), "auto", 3000, held=0, measured=True).slots == 4
    # two workers hold ~3000 MiB each: free memory fell, the slots stay what they were
    settled = size(gpu(6000), "auto", 3000, held=2, measured=True)
    assert settled.slots == 4 and settled.share_mib == 3000
    assert size(gpu(500), "auto", 3000, held=0, measured=False).slots == 1  # never below one
    assert "FL_WORKER_MEMORY_MIB" in size(gpu(9000), "auto", 3000, held=0, measured=False).reason


def test_auto_on_the_cpu_is_the_cores_given_and_a_number_is_taken_as_it_is():
    assert size(Device("cpu", cores=3), "auto", None, held=0, measured=True).slots == 3
    assert size(gpu(12000), 5, 3000, held=0, measured=True).slots == 5
    assert size(gpu(12000), "unlimited", 3000, held=0, measured=True).slots is None


def test_an_existing_cuda_visible_devices_restricts_the_inventory():
    devices = FakeGpus((1.0, 2.0, 3.0)).devices()
    assert [d.name for d in _allowed(devices, "2,0")] == ["cuda:0", "cuda:2"]
    assert [d.name for d in _allowed(devices, "GPU-fake-1")] == ["cuda:1"]
    assert _allowed(devices, None) == devices


def test_the_need_book_keeps_the_largest_need_and_raises_it_after_an_out_of_memory(tmp_path):
    book = NeedBook(tmp_path)
    assert book.read("k") is None
    book.remember("k", 900.0)
    book.remember("k", 700.0)
    assert book.read("k") == 900.0
    assert book.raise_after_oom("k", share_mib=1200.0) == 1800.0


def test_slot_files_count_holders_and_a_reserved_device_admits_nobody(tmp_path):
    mine, other = DeviceSlots(tmp_path, "cuda:0"), DeviceSlots(tmp_path, "cuda:0")
    first = mine.try_take(2)
    assert first is not None and other.held() == 1
    assert other.try_take(2) is not None
    assert DeviceSlots(tmp_path, "cuda:0").try_take(2) is None  # both slots held (by this process's descriptors)
    os.close(first)
    assert other.held() == 1
    assert not other.reserved()


# --- real workers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_forkserver():
    """Start the forkserver (it imports torch) before any timed wait for a slot begins."""
    worker.prestart(START)
    worker.run("worker_jobs:report_pid", {"value": 0}, timeout=600, start_method=START)


@pytest.fixture(autouse=True)
def warm_for_real_workers(request):
    """Only the tests with real workers (marked integration) warm the forkserver: the fast subset
    (-m "not integration and not docker") must not start torch."""
    if request.node.get_closest_marker("integration"):
        request.getfixturevalue("warm_forkserver")


def run_admitted(tmp_path: Path, job: str, kwargs: dict, **overrides):
    return worker.run(job, kwargs, timeout=120, start_method=START, admission=admission(tmp_path, **overrides))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_never_more_than_n_workers_hold_a_device_and_they_spread_over_both_gpus(tmp_path):
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda _: run_admitted(tmp_path, "worker_jobs:hold", {"seconds": 2.0}, slots=2), range(10)))
    records = [r.admitted for r in results]
    peaks = concurrent_workers_peak(records)
    assert set(peaks) == {"cuda:0", "cuda:1"}  # placement used both fake GPUs
    assert max(peaks.values()) == 2  # full, never over
    assert slots_per_device(records) == {"cuda:0": 2, "cuda:1": 2}
    for result in results:  # each worker was confined to its GPU before its job ran
        assert result.value["visible"] == f"GPU-fake-{result.admitted['device'][-1]}"
        assert result.admitted["worker_started_at"] <= result.admitted["worker_ended_at"]
    assert max(r.admitted["slot_wait_seconds"] for r in results) >= 0.5  # 10 jobs of 2 s, 4 slots: some waited


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_sigkilled_worker_frees_its_slot_at_once(tmp_path):
    one_gpu = dict(slots=1, inventory=FakeGpus((8000.0,)))
    with Listener(("127.0.0.1", 0)) as listener:
        address = listener.address
        outcomes: dict[str, object] = {}

        def run(name: str, seconds: float) -> None:
            try:
                outcomes[name] = run_admitted(tmp_path, "worker_jobs:announce_and_hold", {"address": address, "seconds": seconds}, **one_gpu)
            except worker.WorkerFailed as failure:
                outcomes[name] = failure

        holder = threading.Thread(target=run, args=("holder", 3600))
        holder.start()
        with listener.accept() as connection:
            holder_pid = connection.recv()
        waiter = threading.Thread(target=run, args=("waiter", 0))
        waiter.start()
        # the waiter is blocked behind the only slot: it cannot announce itself until the holder is gone
        killed_at = time.time()
        os.kill(holder_pid, signal.SIGKILL)
        with listener.accept() as connection:
            waiter_pid = connection.recv()
        admitted_after = time.time() - killed_at
    holder.join()
    waiter.join()
    assert waiter_pid != holder_pid
    assert "killed by SIGKILL" in outcomes["holder"].cause
    assert outcomes["waiter"].admitted["worker_started_at"] >= killed_at
    assert admitted_after < 2.0  # polled every 50 ms: the slot came free with the kill, not by a timeout


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_an_out_of_memory_is_retried_once_alone_on_a_device_and_raises_the_need(tmp_path):
    marker = tmp_path / "ran-out-once"
    chosen = admission(tmp_path, slots=2)
    result, retried = retry.run("worker_jobs:out_of_memory_once", {"marker": str(marker)}, timeout=120, start_method=START, admission=chosen)
    assert (result.value, retried) == ("trained", True)
    assert result.admitted["slots"] == 1 and "whole device" in result.admitted["sizing"]
    # the first worker had half of cuda:0's 8000 MiB: the task is now known to need more than that
    assert NeedBook(chosen.slots_dir).read(chosen.need_key) == 6000.0

    with pytest.raises(worker.WorkerFailed) as failure:
        retry.run("worker_jobs:out_of_memory_always", {}, timeout=120, start_method=START, admission=admission(tmp_path / "b", slots=2))
    assert failure.value.cause == "CUDA out of memory on GPU 0 (needed ~6000 MiB, slots 2)"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_other_failures_are_not_retried(tmp_path):
    with pytest.raises(worker.WorkerFailed, match="ValueError: bad partition") as failure:
        retry.run("worker_jobs:raise_error", {}, timeout=120, start_method=START, admission=admission(tmp_path))
    assert not failure.value.out_of_memory
    assert NeedBook(tmp_path / "slots").read("default") is None


def test_out_of_memory_is_recognised_by_type_name_or_message_but_not_a_host_memory_error():
    class OutOfMemoryError(RuntimeError):
        pass

    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUDA_ERROR_OUT_OF_MEMORY"))
    assert not is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("bad partition"))


# --- a real local federation ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_local_run_with_two_slots_never_has_more_than_two_workers_alive(tmp_path, data_dir):
    completed = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--clients", "6", "--rounds", "3", "--dataset", "digits", "--worker-slots", "2",
         "--local-epochs", "1", "--results-dir", str(tmp_path / "results"), "--data-dir", str(data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=580, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    run = Path(completed.stdout.strip().splitlines()[-1])
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for record in rounds:
        clients = record["clients"]
        assert len(clients) == 6 and all("slot_wait_seconds" in c and c["device"] == "cpu" for c in clients)
        assert concurrent_workers_peak(clients) == record["concurrent_workers_peak"] == {"cpu": 2}
        assert record["slots_per_device"] == {"cpu": 2}


# --- the report -----------------------------------------------------------------------------------


def test_the_report_shows_workers_alive_per_device_and_the_settled_slots(tmp_path):
    from test_monitor import recorded_run

    from services.admission.records import workers_alive
    from services.monitor.report import write_report
    from services.monitor.rounds import RoundLog, clients_of, settled_slots

    run = recorded_run(tmp_path / "run")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.jsonl", "w") as out:
        for record in lines:
            begin = json_epoch(record["started_at"])
            record["clients"] = [
                {"device": "cuda:0", "slots": 2, "worker_started_at": begin + 0.1, "worker_ended_at": begin + 0.5},
                {"device": "cuda:0", "slots": 2, "worker_started_at": begin + 0.2, "worker_ended_at": begin + 0.6},
                {"device": "cuda:1", "slots": 1, "worker_started_at": begin + 0.1, "worker_ended_at": begin + 0.3},
            ]
            record["slots_per_device"] = slots_per_device(record["clients"])
            out.write(json.dumps(record) + "\n")
    rounds = RoundLog(run / "metrics.jsonl").refresh()
    alive = workers_alive(clients_of(rounds))
    assert max(n for _, n in alive["cuda:0"]) == 2 and max(n for _, n in alive["cuda:1"]) == 1
    assert alive["cuda:0"][-1][1] == 0  # every worker ended
    assert settled_slots(rounds) == {"cuda:0": 2, "cuda:1": 1}
    page = write_report(run, tolerance_mib=64).read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "worker slots per device (FL_WORKER_SLOTS): cuda:0 2, cuda:1 1" in page


def json_epoch(iso: str) -> float:
    from services.monitor.rounds import epoch

    return epoch(iso)

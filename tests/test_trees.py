"""The benchmark's per-member memory sampler (benchmarks.trees) on live process trees: it
runs on the monitor's sampling loop, counts workers by the monitor's worker rule, and reads
PSS in its first sample."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import psutil
import pytest

from services.monitor.nvml import NvmlReader
from services.monitor.processes import is_worker_process
from services.monitor.readings import MIB
from benchmarks.trees import TreeSampler

# A member that starts one multiprocessing worker and says so once the worker runs its target
# (past exec: a spawned process still shows its parent's command line until then).
MEMBER = """
import multiprocessing, sys, time

def hold(running):
    running.set()
    time.sleep(120)

if __name__ == "__main__":
    context = multiprocessing.get_context(sys.argv[1])
    running = context.Event()
    worker = context.Process(target=hold, args=(running,))
    worker.start()
    assert running.wait(60), "the worker did not start"
    print(worker.pid, flush=True)
    worker.join()
"""


@pytest.fixture
def member(request, tmp_path):
    """(member pid, worker pid) of a member process running one worker of the given start method."""
    script = tmp_path / "member.py"
    script.write_text(MEMBER)
    process = subprocess.Popen([sys.executable, str(script), request.param], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker_pid = int(process.stdout.readline())
        yield process.pid, worker_pid
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("member", ["spawn", "forkserver"], indirect=True)
def test_one_sample_counts_the_members_worker_and_its_whole_tree(member):
    member_pid, worker_pid = member
    assert is_worker_process(psutil.Process(worker_pid))
    assert not is_worker_process(psutil.Process(member_pid))
    sampler = TreeSampler(lambda: {"client-0": member_pid, "gone": 2**22 + 1}, is_worker=is_worker_process)
    sampler.sample_once()
    (sample,) = sampler.samples  # a member whose root is gone gives no sample
    assert (sample.member, sample.workers, sample.busy) == ("client-0", 1, True)
    tree = {member_pid, *(child.pid for child in psutil.Process(member_pid).children(recursive=True))}
    assert worker_pid in tree and sample.processes == len(tree)
    assert sample.rss_bytes > 0 and sample.pss_bytes is not None and 0 < sample.pss_bytes <= sample.rss_bytes
    assert sample.gpu_bytes is None  # never started: no NVML reader


def test_the_sampling_thread_samples_until_stopped_and_counts_a_failing_sample_once():
    calls = 0
    sampled_twice = threading.Event()

    def members() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("member list unreadable right now")
        if calls >= 3:
            sampled_twice.set()
        return {"self": os.getpid()}

    with TreeSampler(members, interval=0.01) as sampler:
        assert sampled_twice.wait(30)
    count = len(sampler.samples)
    assert count >= 2 and sampler.errors == 1
    assert all(sample.member == "self" and sample.workers == 0 for sample in sampler.samples)
    assert len(sampler.samples) == count  # stopped: no sample after the block


def recorded_nvml(used_by_pid: dict[int, int | None], device_used: int) -> SimpleNamespace:
    """A one-GPU NVML stand-in (the monitor's NvmlReader reads it as it reads pynvml)."""
    return SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: "gpu0",
        nvmlDeviceGetName=lambda handle: b"Recorded GPU",
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=device_used, total=80 * 1024 * MIB),
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=50),
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in used_by_pid.items()],
        nvmlShutdown=lambda: None,
    )


@pytest.mark.parametrize("member", ["spawn"], indirect=True)
def test_gpu_memory_of_a_tree_is_what_the_monitors_nvml_reader_gives_its_processes(member):
    member_pid, worker_pid = member
    sampler = TreeSampler(lambda: {"client-0": member_pid}, is_worker=is_worker_process)
    # the worker holds 512 MiB, the member a CUDA context whose size NVML withholds, a stranger 1 GiB
    sampler.gpu = NvmlReader(recorded_nvml({worker_pid: 512 * MIB, member_pid: None, 2**22 + 1: 1024 * MIB}, device_used=2000 * MIB))
    sampler.sample_once()
    (sample,) = sampler.samples
    assert sample.gpu_bytes == 512 * MIB
    assert [used for _, used in sampler.device_used] == [2000 * MIB]

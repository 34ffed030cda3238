"""Jobs for the worker tests. Imported by name inside the worker, like services.task."""

from __future__ import annotations

import os
import signal
import sys
import time


def report_pid(value: int, padding: bytes = b"") -> dict:
    return {"pid": os.getpid(), "parent": os.getppid(), "value": value * 2}


def raise_error() -> None:
    raise ValueError("bad partition")


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever(padding: bytes = b"") -> None:
    time.sleep(3600)


def exit_quietly() -> None:
    os._exit(3)


def large_result(megabytes: int) -> bytes:
    return b"x" * (megabytes * 2**20)


def inherited_cuda_state() -> dict:
    """The CUDA state a worker inherited from its parent at fork time (tests/test_forkserver.py).

    Run it as the first thing in a forkserver child: the child is a memory copy of the
    forkserver, so ``torch.cuda._initialized`` is the forkserver's flag, and torch's at-fork
    hook marks the child as a "bad fork" when the forkserver initialised CUDA or counted
    devices (``torch.cuda.is_available()``). Both must be false. This module must not import
    torch at its top: ``torch_preloaded`` tells whether the forkserver had."""
    torch_preloaded = "torch" in sys.modules
    import torch

    return {
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
        "torch_preloaded": torch_preloaded,
        "parent_cuda_initialized": bool(torch.cuda._initialized),
        "bad_fork": bool(torch.cuda._is_in_bad_fork()),
        "cuda_initialized": torch.cuda.is_initialized(),
    }


def hold(seconds: float, log_dir: str = "") -> dict:
    """Hold the slot a while and say which device this worker was confined to."""
    time.sleep(seconds)
    return {"pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError: the worker recognises it by its type name."""


def out_of_memory_once(marker: str) -> str:
    """Run out of memory the first time (no marker yet), succeed the second."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return "trained"


def out_of_memory_always() -> None:
    raise RuntimeError("CUDA error: out of memory")


def announce_and_hold(address: str, seconds: float) -> int:
    """Tell the test (over a socket it listens on) that this worker holds its slot, then hold it."""
    from multiprocessing.connection import Client

    with Client(address) as connection:
        connection.send(os.getpid())
    time.sleep(seconds)
    return os.getpid()


def imported(module: str) -> bool:
    """Whether ``module`` was imported in this worker before its job ran (inherited from the forkserver)."""
    import sys

    return module in sys.modules


WARMED: dict[str, int] = {}  # in a pool's warm child: what it warmed, and its pid


def warm_up(key: str) -> None:
    """A warm child's one-time work (app mode imports a run's App here)."""
    if key == "cannot-warm":
        raise ImportError("no module named 'missing_app'")
    if key == "warm-then-die":
        os.kill(os.getpid(), signal.SIGKILL)
    WARMED[key] = os.getpid()


def what_was_warm() -> dict:
    return {"warmed": dict(WARMED), "pid": os.getpid(), "parent": os.getppid()}

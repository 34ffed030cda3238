"""Jobs for the worker tests. Imported by name inside the worker, like services.task."""

from __future__ import annotations

import os
import signal
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

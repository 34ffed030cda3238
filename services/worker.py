"""Run one job in a fresh worker process and bring back its result, or the reason it failed.

CUDA releases a process's memory only when the process exits, so every training and
evaluation job runs in its own process: ``spawn`` starts a fresh interpreter;
``forkserver`` forks from a server process that preloaded torch but never touched CUDA
(each child still creates and frees its own CUDA context); ``inprocess`` runs the job in
the caller, which is the memory problem Bouquet exists to avoid (kept for comparison).

The result travels back over a one-way pipe (no Manager process). Whatever happens, the
worker is reaped before this returns: a job that raises, dies from a signal (the kernel's
OOM killer sends SIGKILL) or outlives its timeout becomes a ``WorkerFailed`` naming why.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

START_METHODS = ("spawn", "forkserver", "inprocess")
# Modules the forkserver imports once so forked workers start warm. None of them touches CUDA.
FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "services.task"]


class WorkerFailed(RuntimeError):
    """The job did not produce a result; ``cause`` says why in one line."""

    def __init__(self, cause: str, pid: int | None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.pid = pid


@dataclass(frozen=True)
class WorkerResult:
    value: Any
    pid: int
    start_seconds: float  # from asking for the process until the job was imported and about to run
    total_seconds: float


def _context(start_method: str) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


def resolve(job: str) -> Callable[..., Any]:
    """'package.module:function' -> the function. Jobs travel by name so that the caller
    never imports the job's module (and torch with it)."""
    module, _, name = job.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(connection: multiprocessing.connection.Connection, job: str, kwargs: dict[str, Any]) -> None:
    """Entry point inside the worker: import the job, report readiness, run it, send its outcome."""
    try:
        function = resolve(job)
        connection.send(("started", os.getpid()))
        connection.send(("ok", function(**kwargs)))
    except BaseException as error:  # the parent must learn about every failure, even KeyboardInterrupt
        connection.send(("error", _describe_exception(error), traceback.format_exc()))
    finally:
        connection.close()


def _describe_exception(error: BaseException) -> str:
    kind = type(error).__name__
    if kind == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return f"out of GPU memory ({kind}: {str(error).splitlines()[0] if str(error) else ''})"
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{kind}: {first_line}" if first_line else kind


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return f"killed by {name} (the kernel's OOM killer sends SIGKILL when host memory runs out)"
        return f"killed by {name}"
    return f"exited with code {exitcode} without sending a result"


def run(job: str, kwargs: dict[str, Any], *, timeout: float, start_method: str = "spawn") -> WorkerResult:
    """Run the job ('module:function') with ``kwargs`` in a new process; return its value or raise WorkerFailed."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if start_method == "inprocess":
        return _run_inprocess(job, kwargs)

    asked = time.monotonic()
    context = _context(start_method)
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(sender, job, kwargs), name=f"bouquet-worker-{job.partition(':')[2]}", daemon=True)
    started_at: float | None = None
    try:
        process.start()
        sender.close()  # so that the receiver sees EOF once the worker is gone
        deadline = asked + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailed(f"timed out after {timeout:g} s (FL_WORKER_TIMEOUT)", process.pid)
            ready = multiprocessing.connection.wait([receiver, process.sentinel], timeout=remaining)
            if not ready:
                continue
            if receiver in ready or receiver.poll():
                try:
                    message = receiver.recv()
                except EOFError:
                    process.join(timeout=5)
                    raise WorkerFailed(_describe_exit(process.exitcode), process.pid) from None
                if message[0] == "started":
                    started_at = time.monotonic()
                elif message[0] == "ok":
                    finished = time.monotonic()
                    process.join(timeout=30)
                    return WorkerResult(message[1], process.pid, (started_at or finished) - asked, finished - asked)
                else:
                    raise WorkerFailed(message[1], process.pid)
            else:  # the process ended and nothing is left in the pipe
                process.join(timeout=5)
                raise WorkerFailed(_describe_exit(process.exitcode), process.pid)
    finally:
        if process.is_alive():
            process.kill()
        if process.pid is not None:
            process.join()
        receiver.close()
        if hasattr(process, "close"):
            process.close()


def _run_inprocess(job: str, kwargs: dict[str, Any]) -> WorkerResult:
    asked = time.monotonic()
    try:
        value = resolve(job)(**kwargs)
    except Exception as error:
        raise WorkerFailed(_describe_exception(error), os.getpid()) from error
    return WorkerResult(value, os.getpid(), 0.0, time.monotonic() - asked)

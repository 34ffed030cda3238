"""Run one job in a fresh worker process and bring back its result, or the reason it failed.

CUDA releases a process's memory only when the process exits, so every training and
evaluation job runs in its own process: ``spawn`` starts a fresh interpreter;
``forkserver`` forks from a server process that preloaded torch but never touched CUDA
(each child still creates and frees its own CUDA context); ``inprocess`` runs the job in
the caller, which is the memory problem Bouquet exists to avoid (kept for comparison).

Parent and worker share one duplex pipe (no Manager process): the parent sends the job and
its inputs (the weights) down it from a helper thread, the worker answers on it with
"admitted" (when it was given an ``Admission``: it waited for a slot on a device, see
services.admission), "started" and then its result or its exception. Whatever happens, the worker is reaped
before ``run`` returns: a job that raises, dies from a signal (the kernel's OOM killer sends
SIGKILL) or outlives its timeout becomes a ``WorkerFailed`` naming why.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from services.settings import WORKER_STARTS

if TYPE_CHECKING:  # the worker imports services.admission.gate itself, only when admitted
    from services.admission.gate import Admission

# Modules the forkserver imports once so forked workers start warm. None of them touches CUDA:
# importing torch loads its CUDA libraries but neither initialises CUDA nor counts devices.
# Anything that did (even torch.cuda.is_available()) would make every forked worker unable to
# use the GPU; _refuse_poisoned_fork turns that into a clear failure, tests/test_forkserver.py
# checks it never happens.
FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "services.task", "services.builtin_task"]
_extra_preload: list[str] = []  # prestart(extra_preload=...): app mode's node adds flwr's ClientApp runtime


class WorkerFailed(RuntimeError):
    """The job did not produce a result; ``cause`` says why in one line."""

    def __init__(self, cause: str, pid: int | None, out_of_memory: bool = False, admitted: dict[str, Any] | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.pid = pid
        self.out_of_memory = out_of_memory  # a CUDA out-of-memory: services.admission.retry runs it again
        self.admitted = admitted  # where it had been admitted (device, slots, share), if it was


@dataclass(frozen=True)
class WorkerResult:
    value: Any
    pid: int
    start_seconds: float  # from asking for the process until the job was imported and about to run (slot wait excluded)
    total_seconds: float
    admitted: dict[str, Any] | None = None  # device, slots, slot_wait_seconds, worker_started_at/ended_at (epoch s)


def _context(start_method: str) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when the forkserver starts (first worker, or prestart); it is one process
        # per client (or server) process, restarted by multiprocessing if it dies.
        context.set_forkserver_preload(FORKSERVER_PRELOAD + _extra_preload)
    return context


def prestart(start_method: str, extra_preload: Sequence[str] = ()) -> None:
    """Start the forkserver now (it imports torch, ~1-2 s), so the first round does not wait for it.
    ``extra_preload``: more modules it imports (kept for a forkserver restarted after a death).

    No-op for the other start methods. The forkserver is started by exec, not fork, so it is
    safe to call from a process that already runs gRPC threads."""
    _extra_preload[:] = [name for name in extra_preload if name not in FORKSERVER_PRELOAD]
    if start_method == "forkserver":
        _context(start_method)
        from multiprocessing import forkserver

        forkserver.ensure_running()


def forkserver_pid() -> int | None:
    """PID of this process's forkserver, or None before it started (for tests and the benchmark)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def _refuse_poisoned_fork() -> None:
    """In a forkserver child: fail loudly if the forkserver touched CUDA (the child could not use it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda._is_in_bad_fork():
        raise RuntimeError(
            "the forkserver touched CUDA before forking this worker, so the worker cannot use the GPU; "
            "a module in services.worker.FORKSERVER_PRELOAD must not call torch.cuda at import "
            "(use FL_WORKER_START=spawn meanwhile)"
        )


def resolve(job: str) -> Callable[..., Any]:
    """'package.module:function' -> the function. Jobs travel by name so that the caller
    never imports the job's module (and torch with it)."""
    module, _, name = job.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(connection: multiprocessing.connection.Connection, forked: bool = False) -> None:
    """Entry point inside the worker: receive the job, wait for its slot (before anything can
    initialise CUDA), import the job, report readiness, run it, send its outcome."""
    try:
        job, kwargs, admission = connection.recv()
        if forked:
            _refuse_poisoned_fork()
        ticket = None
        if admission is not None:
            from services.admission import gate

            ticket = gate.admit(admission)
            connection.send(("admitted", ticket.record()))
            gate.enter(ticket)
        function = resolve(job)
        connection.send(("started", os.getpid()))
        value = function(**kwargs)
        if ticket is not None:
            gate.remember(admission, ticket)
        connection.send(("ok", value, time.time()))  # the slot is held until this process exits, just after
    except BaseException as error:  # the parent must learn about every failure, even KeyboardInterrupt
        connection.send(("error", _describe_exception(error), traceback.format_exc(), is_out_of_memory(error)))
    finally:
        connection.close()


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory, known by type name (torch.cuda.OutOfMemoryError) or by the message
    torch and the driver give (CUDA_ERROR_OUT_OF_MEMORY, cudaErrorMemoryAllocation); the
    caller never imports torch to check the type."""
    text = str(error).lower()
    if isinstance(error, MemoryError):  # the host's, not the GPU's
        return False
    return type(error).__name__ == "OutOfMemoryError" or any(mark in text for mark in ("out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation"))


def _describe_exception(error: BaseException) -> str:
    kind = type(error).__name__
    if is_out_of_memory(error):
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


def run(job: str, kwargs: dict[str, Any], *, timeout: float, start_method: str = "spawn", admission: "Admission | None" = None) -> WorkerResult:
    """Run the job ('module:function') with ``kwargs`` in a new process; return its value or raise WorkerFailed.

    With ``admission`` the worker first waits for a slot (services.admission); the timeout
    counts from when it holds one, and the wait for it is bounded by the same timeout."""
    if start_method not in WORKER_STARTS:
        raise ValueError(f"start_method must be one of {WORKER_STARTS}, got {start_method!r}")
    if start_method == "inprocess":
        return _run_inprocess(job, kwargs)

    asked = time.monotonic()
    context = _context(start_method)
    receiver, worker_end = context.Pipe()
    process = context.Process(target=_worker_main, args=(worker_end, start_method == "forkserver"), name=f"bouquet-worker-{job.partition(':')[2]}", daemon=True)
    started_at: float | None = None
    admitted: dict[str, Any] | None = None
    waited = 0.0  # for a slot: not part of the worker's start or run time
    handover = threading.Thread(target=_hand_over, args=(receiver, job, kwargs, admission), daemon=True)
    try:
        _start(process, start_method)
        worker_end.close()  # only the worker holds its end now: we see EOF once it is gone
        handover.start()
        deadline = asked + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waiting = " waiting for a slot (FL_WORKER_SLOTS)" if admission is not None and admitted is None else ""
                raise WorkerFailed(f"timed out after {timeout:g} s{waiting} (FL_WORKER_TIMEOUT)", process.pid, admitted=admitted)
            ready = multiprocessing.connection.wait([receiver, process.sentinel], timeout=remaining)
            if not ready:
                continue
            if receiver in ready or receiver.poll():
                try:
                    message = receiver.recv()
                except (EOFError, OSError):  # a worker killed with our inputs unread resets the socket
                    process.join(timeout=5)
                    raise WorkerFailed(_describe_exit(process.exitcode), process.pid, admitted=_ended(admitted, time.time())) from None
                if message[0] == "admitted":
                    admitted = message[1]
                    deadline = time.monotonic() + timeout  # the job's own time starts now
                    waited = admitted["slot_wait_seconds"]  # as the worker measured it: its own start is not waiting
                elif message[0] == "started":
                    started_at = time.monotonic() - waited
                elif message[0] == "ok":
                    finished = time.monotonic() - waited
                    process.join(timeout=30)
                    return WorkerResult(message[1], process.pid, (started_at or finished) - asked, finished - asked, _ended(admitted, message[2]))
                else:
                    raise WorkerFailed(message[1], process.pid, out_of_memory=message[3], admitted=_ended(admitted, time.time()))
            else:  # the process ended and nothing is left in the pipe
                process.join(timeout=5)
                raise WorkerFailed(_describe_exit(process.exitcode), process.pid, admitted=_ended(admitted, time.time()))
    finally:
        if process.is_alive():
            process.kill()
        if process.pid is not None:
            process.join()
        if handover.ident is not None:
            handover.join()  # the worker is gone, so a blocked send has failed by now
        receiver.close()
        if hasattr(process, "close"):
            process.close()


def _ended(admitted: dict[str, Any] | None, ended_at: float) -> dict[str, Any] | None:
    return None if admitted is None else {**admitted, "worker_ended_at": round(ended_at, 4)}


def _hand_over(connection: multiprocessing.connection.Connection, job: str, kwargs: dict[str, Any], admission: Any) -> None:
    """Send the job and its inputs over our own pipe, from a thread.

    The inputs (weights) do not travel as Process arguments: multiprocessing writes those
    into a pipe whose read end the parent itself keeps open until the write completes, so a
    worker killed before it read them all would block the parent forever. Here a dead worker
    only makes this send fail, and the main loop reports why the worker died."""
    try:
        connection.send((job, kwargs, admission))
    except OSError:
        pass


def _start(process: multiprocessing.process.BaseProcess, start_method: str) -> None:
    """Start the worker; a forkserver that just died (e.g. OOM-killed) is replaced and the start
    retried once. Any other failure to start becomes a WorkerFailed, so the round fails cleanly."""
    try:
        process.start()
        return
    except (OSError, EOFError) as error:
        if start_method != "forkserver":
            raise WorkerFailed(f"could not start a {start_method} worker: {type(error).__name__}: {error}", None) from error
        first_error = error
    _await_forkserver_exit(forkserver_pid())
    try:
        process.start()  # multiprocessing notices the dead forkserver and starts a new one
    except (OSError, EOFError) as error:
        raise WorkerFailed(
            f"could not start a forkserver worker ({type(first_error).__name__}: {first_error}; "
            f"after restarting the forkserver: {type(error).__name__}: {error})",
            None,
        ) from error


def _await_forkserver_exit(pid: int | None, patience: float = 5.0) -> None:
    """Wait until the dead forkserver is a zombie: only then does multiprocessing see it is gone
    (it checks with waitpid, which we must not call ourselves or it would lose the status)."""
    deadline = time.monotonic() + patience
    while pid is not None and time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)


def _run_inprocess(job: str, kwargs: dict[str, Any]) -> WorkerResult:
    asked = time.monotonic()
    try:
        value = resolve(job)(**kwargs)
    except Exception as error:
        raise WorkerFailed(_describe_exception(error), os.getpid()) from error
    return WorkerResult(value, os.getpid(), 0.0, time.monotonic() - asked)

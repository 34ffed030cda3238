"""Run one job in a fresh worker process and bring back its result, or the reason it failed.

CUDA releases a process's memory only when the process exits, so every training and
evaluation job runs in its own process: ``spawn`` starts a fresh interpreter;
``forkserver`` forks from a server process that preloaded torch but never touched CUDA
(each child still creates and frees its own CUDA context); ``inprocess`` runs the job in
the caller, which is the memory problem Bouquet exists to avoid (kept for comparison).

Parent and worker share one duplex pipe (no Manager process): the parent sends the job and
its inputs (the weights) down it from a helper thread, the worker answers on it with
"admitted" (when it was given a ``BeforeJob``: something to wait for and set up before the job,
such as a slot on a device, see services.admission), "started" and then its result or its exception. Whatever happens, the worker is reaped
before ``run`` returns: a job that raises, dies from a signal (the kernel's OOM killer sends
SIGKILL) or outlives its timeout becomes a ``WorkerFailed`` naming why.

With a host worker pool (``use_pool``, FL_WORKER_POOL=host) a ``forkserver`` job is forked by
the host's one pool (services.pool) instead of this process's own forkserver: the same job, the
same messages, over the pool's Unix socket; the pool reports the worker's exit code.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from services.failures import Kind, classify, first_line
from services.lifetime import die_with_parent, ended, is_alive
from services.pool import wire
from services.settings import WORKER_STARTS

# Modules the forkserver imports once so forked workers start warm. None of them touches CUDA:
# importing torch loads its CUDA libraries but neither initialises CUDA nor counts devices.
# Anything that did (even torch.cuda.is_available()) would make every forked worker unable to
# use the GPU; _refuse_poisoned_fork turns that into a clear failure, tests/test_forkserver.py
# checks it never happens.
FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "services.task", "services.builtin_task"]
_extra_preload: list[str] = []  # prestart(extra_preload=...): FL_WORKER_PRELOAD; app mode's node adds flwr's ClientApp runtime
POOL_EXITED = "worker pool exited"  # the cause of a job whose pool died under it


@dataclass(frozen=True)
class PoolUse:
    """Where this process's forkserver jobs go instead of its own forkserver (FL_WORKER_POOL=host)."""

    socket_path: str
    role: str  # "client" or "server": whose workers they are, for the memory monitor
    identity: str = ""


_pool: list[PoolUse] = []  # the one PoolUse of this process, once use_pool checked it
_session: list[tuple[multiprocessing.connection.Connection, str, list[str]]] = []  # its hello connection, slots folder, preloads
_session_lock = threading.Lock()  # the server's evaluation and a round's job may both renew it


class Entered(Protocol):
    """What ``BeforeJob.enter`` hands back: held until the worker exits."""

    def record(self) -> dict[str, Any]:
        """What the parent is told (``WorkerResult.admitted``); must hold ``slot_wait_seconds``."""

    def after_job(self) -> None:
        """Called once the job returned, before its value is sent (e.g. to remember what it used)."""


class BeforeJob(Protocol):
    """The seam before the job: a picklable object that travels with the job to the worker, which
    calls ``enter()`` after it started and before it imports the job (so before anything can
    initialise CUDA). The worker knows nothing else of it; services.admission provides one."""

    waiting_for: str  # what enter() waits for, for the timeout's message, e.g. "a slot (FL_WORKER_SLOTS)"

    def enter(self) -> Entered:
        """Wait (as long as needed: the parent bounds it) and prepare this process for the job."""


class WorkerFailed(RuntimeError):
    """The job did not produce a result: ``kind`` (services.failures.Kind) says what happened,
    ``cause`` why in one line, ``traceback`` where (the worker's, for an exception; "" otherwise)."""

    def __init__(
        self, cause: str, pid: int | None, out_of_memory: bool = False, admitted: dict[str, Any] | None = None,
        *, kind: Kind | None = None, traceback: str = "", error_type: str | None = None, detail: str = "",
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.pid = pid
        self.kind = kind or (Kind.OUT_OF_MEMORY if out_of_memory else Kind.TASK_ERROR)
        self.traceback = traceback
        self.error_type = error_type  # the exception's class name when the job raised (e.g. "TaskError")
        self.detail = detail  # its message's first line, without the class name
        self.admitted = admitted  # where it had been admitted (device, slots, share), if it was
        self.started = False  # whether the job itself had begun (``run`` sets it): what it did may have taken effect

    @property
    def out_of_memory(self) -> bool:
        """A CUDA out-of-memory: services.admission.retry runs the job again."""
        return self.kind is Kind.OUT_OF_MEMORY

    def record(self) -> dict[str, Any]:
        """What the client sends the server and metrics.jsonl keeps."""
        return {"kind": self.kind.value, "cause": self.cause, "worker_pid": self.pid, "traceback": self.traceback}


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


def use_pool(pool: PoolUse, slots_dir: str, extra_preload: Sequence[str], patience: float) -> wire.Facts:
    """Send this process's forkserver jobs to the host's worker pool, once it answered (waiting up
    to ``patience`` s for it) and serves this deployment with these preloads; raises
    wire.PoolUnreachable or wire.PoolUnusable, naming the setting, otherwise. The hello's
    connection stays open while this process lives: the pool's count of who still needs it."""
    preload = [name for name in extra_preload if name not in FORKSERVER_PRELOAD]
    facts, session = wire.hello(pool.socket_path, patience)
    try:
        wire.check(facts, pool.socket_path, slots_dir, preload)
    except BaseException:
        session.close()
        raise
    leave_pool()
    _pool[:] = [pool]
    _session[:] = [(session, slots_dir, preload)]
    return facts


def leave_pool() -> None:
    """Back to this process's own warm process; the pool sees this session end."""
    _pool.clear()
    for session, _, _ in _session:
        session.close()
    _session.clear()


def _renew_session(deadline: float) -> None:
    """A pool that was restarted (compose restarts one that died) gets this process's session
    again, and is checked as the first one was."""
    with _session_lock:
        session, slots_dir, preload = _session[0]
        if not session.closed and not session.poll():  # nothing arrives on a live session: the pool is the one we greeted
            return
        session.close()
        facts, renewed = wire.hello(_pool[0].socket_path, max(0.0, deadline - time.monotonic()))
        try:
            wire.check(facts, _pool[0].socket_path, slots_dir, preload)
        except BaseException:
            renewed.close()
            raise
        _session[0] = (renewed, slots_dir, preload)


def forkserver_pid() -> int | None:
    """PID of this process's forkserver, or None before it started (for tests and the benchmark)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def _let_go_of_the_forkserver() -> None:
    """In a forkserver child: close the copy of the client's "alive" pipe that multiprocessing hands
    every child (so it could start children of its own). The forkserver exits when the last copy
    closes; while a worker kept one, a SIGKILLed client's forkserver would wait for the worker and
    the worker, dying with the forkserver, for the forkserver. A job that starts forkserver
    children of its own gets a forkserver of its own."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
        server._forkserver_address = None


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


def _worker_main(connection: multiprocessing.connection.Connection, forked: bool = False, client: int | None = None) -> None:
    """Entry point inside a worker of this process: first of all it dies with its parent (a forked
    worker's parent is the forkserver, which exits the moment its client does; a spawned
    worker's is the client, the ``client`` pid), then it serves its one job."""
    die_with_parent(signal.SIGKILL)
    if forked:
        _let_go_of_the_forkserver()
    if client is not None and (not is_alive(client) if forked else os.getppid() != client):
        os._exit(1)  # the client died before the request took effect: nobody will signal us
    serve_job(connection, forked)


def serve_job(connection: multiprocessing.connection.Connection, forked: bool) -> None:
    """Receive the job, pass the seam before it (e.g. wait for a slot, before anything can
    initialise CUDA), import the job, report readiness, run it, send its outcome. A worker of the
    host pool (services.pool) runs this too."""
    try:
        job, kwargs, before_job = connection.recv()
        if forked:
            _refuse_poisoned_fork()
        entered = None
        if before_job is not None:
            entered = before_job.enter()
            connection.send(("admitted", entered.record()))
        function = resolve(job)
        connection.send(("started", os.getpid()))
        value = function(**kwargs)
        if entered is not None:
            entered.after_job()
        connection.send(("ok", value, time.time()))  # the slot is held until this process exits, just after
    except BaseException as error:  # the parent must learn about every failure, even KeyboardInterrupt
        kind, cause = classify(error)
        connection.send(("error", kind.value, cause, traceback.format_exc(), type(error).__name__, first_line(error)))
    finally:
        connection.close()


def _exit_failure(exitcode: int | None, pid: int | None, admitted: dict[str, Any] | None, started: bool) -> WorkerFailed:
    """The worker ended without a result: killed by a signal, or exited without answering (once
    the job had started, the job ended it; before, the worker never got to run it)."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (the kernel's OOM killer sends SIGKILL when host memory runs out)" if -exitcode == signal.SIGKILL else ""
        return WorkerFailed(f"killed by {name}{why}", pid, admitted=admitted, kind=Kind.KILLED)
    return WorkerFailed(f"exited with code {exitcode} without sending a result", pid, admitted=admitted, kind=Kind.TASK_ERROR if started else Kind.START_FAILED)


@dataclass(frozen=True)
class Warm:
    """For the host pool: fork this job's worker from a child of the pool that ran ``function(key)``
    once (e.g. app mode imports a run's App there), made at the first job that names it."""

    function: str  # 'module:function'
    key: str


def run(
    job: str, kwargs: dict[str, Any], *, timeout: float, start_method: str = "spawn", admission: BeforeJob | None = None,
    wait_timeout: float | None = None, warm: Warm | None = None,
) -> WorkerResult:
    """Run the job ('module:function') with ``kwargs`` in a new process; return its value or raise WorkerFailed.

    With ``admission`` (any ``BeforeJob``, e.g. services.admission's Admission) the worker first
    passes it; the wait is bounded by ``wait_timeout`` (default: ``timeout``, see services.budget)
    and ``timeout`` counts from when it has passed. A forkserver job goes to the host's worker
    pool once ``use_pool`` pointed this process at one (forked from its ``warm`` child, if named).
    A ``WorkerFailed`` says whether the job had ``started``."""
    if start_method not in WORKER_STARTS:
        raise ValueError(f"start_method must be one of {WORKER_STARTS}, got {start_method!r}")
    if start_method == "inprocess":
        return _run_inprocess(job, kwargs)

    asked = time.monotonic()
    waiting = admission is not None
    limit = wait_timeout if waiting and wait_timeout is not None else timeout
    deadline = asked + limit
    if start_method == "forkserver" and _pool:
        worker: _Worker = _PoolWorker(_pool[0], job, deadline, warm)
    else:
        worker = _OwnWorker(_context(start_method), job, start_method)
    started_at: float | None = None
    admitted: dict[str, Any] | None = None
    waited = 0.0  # for a slot: not part of the worker's start or run time
    handover = threading.Thread(target=_hand_over, args=(worker.connection, job, kwargs, admission), daemon=True)
    try:
        handover.start()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = f" waiting for {admission.waiting_for}" if waiting and admitted is None else " (FL_WORKER_TIMEOUT)"
                raise WorkerFailed(f"timed out after {limit:g} s{what}", worker.pid, admitted=admitted, kind=Kind.TIMED_OUT)
            ready = multiprocessing.connection.wait(worker.waitables, timeout=remaining)
            if not ready:
                continue
            if worker.connection in ready or worker.connection.poll():
                try:
                    message = worker.connection.recv()
                except (EOFError, OSError):  # a worker killed with our inputs unread resets the socket
                    raise worker.ended_without_result(_ended(admitted, time.time()), started_at is not None) from None
                if worker.consumed(message):
                    continue
                if message[0] == "admitted":
                    admitted = message[1]
                    limit = timeout
                    deadline = time.monotonic() + timeout  # the job's own time starts now
                    waited = admitted["slot_wait_seconds"]  # as the worker measured it: its own start is not waiting
                elif message[0] == "started":
                    started_at = time.monotonic() - waited
                elif message[0] == "ok":
                    finished = time.monotonic() - waited
                    worker.await_exit(30)
                    return WorkerResult(message[1], worker.pid, (started_at or finished) - asked, finished - asked, _ended(admitted, message[2]))
                else:
                    _, kind, cause, trace, error_type, detail = message
                    raise WorkerFailed(cause, worker.pid, admitted=_ended(admitted, time.time()), kind=Kind(kind), traceback=trace, error_type=error_type, detail=detail)
            else:  # the process ended and nothing is left in the pipe
                raise worker.ended_without_result(_ended(admitted, time.time()), started_at is not None)
    except WorkerFailed as failure:
        failure.started = started_at is not None
        raise
    finally:
        worker.stop()
        if handover.ident is not None:
            handover.join()  # the worker is gone, so a blocked send has failed by now
        worker.connection.close()


class _Worker(Protocol):
    """One job's process as ``run`` sees it: ours (a child), or one the host pool forked."""

    connection: multiprocessing.connection.Connection
    pid: int | None

    @property
    def waitables(self) -> list[Any]: ...

    def consumed(self, message: tuple) -> bool:
        """True for a message about the process itself (not the job's), taken in here."""

    def ended_without_result(self, admitted: dict[str, Any] | None, started: bool) -> WorkerFailed: ...

    def await_exit(self, patience: float) -> None:
        """After the result: the process is gone (its slot and memory freed) within ``patience``."""

    def stop(self) -> None:
        """Kill it if it still runs, and reap it."""


class _OwnWorker:
    """A child of this process: spawned, or forked by this process's forkserver."""

    def __init__(self, context: multiprocessing.context.BaseContext, job: str, start_method: str) -> None:
        self.connection, worker_end = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(worker_end, start_method == "forkserver", os.getpid()), name=f"bouquet-worker-{job.partition(':')[2]}", daemon=True)
        try:
            _start(self.process, start_method)
        except BaseException:
            self.connection.close()
            raise
        finally:
            worker_end.close()  # only the worker holds its end now: we see EOF once it is gone
        self.pid = self.process.pid

    @property
    def waitables(self) -> list[Any]:
        return [self.connection, self.process.sentinel]

    def consumed(self, message: tuple) -> bool:
        return False

    def ended_without_result(self, admitted: dict[str, Any] | None, started: bool) -> WorkerFailed:
        self.process.join(timeout=5)
        return _exit_failure(self.process.exitcode, self.pid, admitted, started)

    def await_exit(self, patience: float) -> None:
        self.process.join(timeout=patience)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        if self.process.pid is not None:
            self.process.join()
        if hasattr(self.process, "close"):
            self.process.close()


class _PoolWorker:
    """A worker the host's pool forked for this job; the pool tells its exit code."""

    def __init__(self, pool: PoolUse, job: str, deadline: float, warm: Warm | None = None) -> None:
        self.pool = pool
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.exited = False
        try:  # a pool that is restarting is waited for, within the job's own wait
            if _session:
                _renew_session(deadline)
            self.connection = wire.connect(pool.socket_path, max(0.0, deadline - time.monotonic()))
        except wire.PoolUnreachable as problem:
            raise WorkerFailed(f"{POOL_EXITED}: {problem} (FL_WORKER_POOL_SOCKET)", None, kind=Kind.START_FAILED) from None
        except (wire.PoolUnusable, OSError) as problem:
            raise WorkerFailed(f"could not reach the worker pool: {problem} (FL_WORKER_POOL_SOCKET)", None, kind=Kind.START_FAILED) from None
        try:
            warm_with, warm_key = (warm.function, warm.key) if warm is not None else ("", "")
            self.connection.send(wire.Request("job", role=pool.role, identity=pool.identity, job=job, warm_with=warm_with, warm_key=warm_key))
        except OSError:
            pass  # the pool is gone: the stream's end says so

    @property
    def waitables(self) -> list[Any]:
        return [self.connection]

    def consumed(self, message: tuple) -> bool:
        if message[0] == "forked":
            self.pid = message[1]
            return True
        if message[0] == "exited":  # before a result: the stream ends next, and run() asks why
            self.exited, self.exit_code = True, message[1]
            return True
        return False

    def ended_without_result(self, admitted: dict[str, Any] | None, started: bool) -> WorkerFailed:
        if not self.exited:
            self._await_exited(5)
        if not self.exited:
            return WorkerFailed(
                f"{POOL_EXITED} (FL_WORKER_POOL_SOCKET={self.pool.socket_path}): the worker died with it", self.pid, admitted=admitted,
                kind=Kind.KILLED if started else Kind.START_FAILED,
            )
        return _exit_failure(self.exit_code, self.pid, admitted, started)

    def await_exit(self, patience: float) -> None:
        self._await_exited(patience)

    def stop(self) -> None:
        """Closing our side of the socket ends the worker (it watches for that) if it still runs."""
        if self.exited:
            return
        try:
            shut_writing(self.connection)
        except OSError:
            return
        self._await_exited(10)

    def _await_exited(self, patience: float) -> None:
        deadline = time.monotonic() + patience
        while not self.exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.connection.poll(remaining):
                return
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                return
            if message[0] == "exited":
                self.exited, self.exit_code = True, message[1]


def shut_writing(connection: multiprocessing.connection.Connection) -> None:
    """Tell the other end that nothing more comes (it sees the end of the stream); reading goes on."""
    with socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
        duplicate.shutdown(socket.SHUT_WR)


def _ended(admitted: dict[str, Any] | None, ended_at: float) -> dict[str, Any] | None:
    return None if admitted is None else {**admitted, "worker_ended_at": round(ended_at, 4)}


def _hand_over(connection: multiprocessing.connection.Connection, job: str, kwargs: dict[str, Any], before_job: BeforeJob | None) -> None:
    """Send the job and its inputs over our own pipe, from a thread.

    The inputs (weights) do not travel as Process arguments: multiprocessing writes those
    into a pipe whose read end the parent itself keeps open until the write completes, so a
    worker killed before it read them all would block the parent forever. Here a dead worker
    only makes this send fail, and the main loop reports why the worker died."""
    try:
        connection.send((job, kwargs, before_job))
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
            raise WorkerFailed(f"could not start a {start_method} worker: {type(error).__name__}: {error}", None, kind=Kind.START_FAILED) from error
        first_error = error
    # Once the dead forkserver is a zombie, multiprocessing sees it is gone (it checks with
    # waitpid, which this process must not call or it would take the status from it).
    if (dead := forkserver_pid()) is not None:
        ended(dead, patience=5.0)
    try:
        process.start()  # multiprocessing notices the dead forkserver and starts a new one
    except (OSError, EOFError) as error:
        raise WorkerFailed(
            f"could not start a forkserver worker ({type(first_error).__name__}: {first_error}; "
            f"after restarting the forkserver: {type(error).__name__}: {error})",
            None, kind=Kind.START_FAILED,
        ) from error


def _run_inprocess(job: str, kwargs: dict[str, Any]) -> WorkerResult:
    asked = time.monotonic()
    try:
        value = resolve(job)(**kwargs)
    except Exception as error:
        kind, cause = classify(error)
        raise WorkerFailed(cause, os.getpid(), kind=kind, traceback=traceback.format_exc(), error_type=type(error).__name__, detail=first_line(error)) from error
    return WorkerResult(value, os.getpid(), 0.0, time.monotonic() - asked)

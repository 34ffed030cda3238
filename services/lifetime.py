"""A child process's whole life, written once: started (tied to this process, in a session of its
own when asked), asked to stop, given a grace, killed when the grace runs out; and whether any
process, a child or not, has ended.

A process that must not outlive its parent asks the kernel to signal it when the parent dies
(Linux ``PR_SET_PDEATHSIG``): however the parent dies, SIGKILL included, nothing is left running.

The launcher's children (server, clients, monitor) get SIGTERM so they can write their records;
a worker gets SIGKILL from its parent (the forkserver, which exits as soon as its client is gone,
or the client itself for a spawned worker), so a SIGKILLed client's training stops at once and
the kernel frees the worker's slot lock with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
ENDED_POLL_S = 0.02  # how often ``ended`` looks again while it has patience left


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent process dies. A parent that died before this call took effect
    sends nothing: callers that must not miss it check afterwards (``is_alive``). No-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")


def adopt_orphans() -> None:
    """Become the parent of this process's orphaned descendants (Linux child subreaper): the
    host pool reaps, and reports, the workers its warm children fork through a middle process."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def is_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts: its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class Child(subprocess.Popen):
    """A child that remembers whether it leads a session (so a process group) of its own: when it
    does, stopping it can reach whatever it started, which it may have left behind."""

    def __init__(self, argv: Sequence[str], *, dies_with_parent: bool, own_session: bool, **popen: Any) -> None:
        super().__init__(argv, start_new_session=own_session, preexec_fn=die_with_parent if dies_with_parent else None, **popen)
        self.own_session = own_session


def start(argv: Sequence[str], *, dies_with_parent: bool = True, own_session: bool = False, **popen: Any) -> Child:
    """``subprocess.Popen(argv, **popen)``. ``dies_with_parent``: the child gets SIGTERM when this
    process dies, however it dies, so nothing is left running. ``own_session``: a Ctrl-C at the
    terminal reaches this process only (it stops the child in its own order), and the SIGKILL
    that ends ``stop``'s grace reaches the child's descendants too."""
    return Child(argv, dies_with_parent=dies_with_parent, own_session=own_session, **popen)


def send(process: subprocess.Popen, sig: int = signal.SIGTERM, *, whole_group: bool = False) -> None:
    """``sig`` to ``process`` unless it has ended. ``whole_group``: to its process group (it leads
    one: started with ``own_session``), so the processes it started get it too."""
    if whole_group:
        _group_leader(process)
        if process.poll() is None:
            signal_group(process.pid, sig)
    else:
        process.send_signal(sig)  # nothing once it has ended (Popen checks)


def wait(process: subprocess.Popen, timeout: float | None) -> int | None:
    """``process``'s exit code once it ends, or None if it still runs after ``timeout`` seconds
    (None: as long as it takes)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def reap(processes: Iterable[subprocess.Popen], grace: float | None, *, whole_group: bool = False) -> list[int]:
    """Wait up to ``grace`` seconds, together, for ``processes`` to end (None: as long as it
    takes), then SIGKILL each that still runs, its whole group when it leads one (started with
    ``own_session``), and reap it; their exit codes. ``whole_group``: what is left of each group
    gets SIGKILL even when its leader ended in time (children it left behind)."""
    deadline = None if grace is None else time.monotonic() + grace
    codes = []
    for process in processes:
        if whole_group:
            _group_leader(process)
        code = wait(process, None if deadline is None else max(0.1, deadline - time.monotonic()))
        if whole_group or (code is None and getattr(process, "own_session", False)):
            signal_group(process.pid, signal.SIGKILL)
        if code is None:
            process.kill()  # its group's SIGKILL may have ended it already (Popen checks)
            code = process.wait()
        codes.append(code)
    return codes


def stop(process: subprocess.Popen, grace: float | None, sig: int = signal.SIGTERM, *, whole_group: bool = False) -> int:
    """``sig`` (SIGTERM: time to write its records), up to ``grace`` seconds to end, then SIGKILL
    (see ``reap``); its exit code. Safe on a process that has already ended."""
    return stop_all([process], grace, sig, whole_group=whole_group)[0]


def stop_all(processes: Sequence[subprocess.Popen], grace: float | None, sig: int = signal.SIGTERM, *, whole_group: bool = False) -> list[int]:
    """``stop`` for several processes at once: ``sig`` to each first, then one grace for all."""
    for process in processes:
        send(process, sig, whole_group=whole_group)
    return reap(processes, grace, whole_group=whole_group)


def signal_group(leader: int, sig: int) -> None:
    """``sig`` to every process in the group ``leader`` leads; nothing if none is left."""
    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_leader(process: subprocess.Popen) -> None:
    if not getattr(process, "own_session", False):
        raise ValueError(f"pid {process.pid} leads no process group of its own: start it with lifetime.start(..., own_session=True)")


def ended(pid: int, patience: float = 0.0) -> bool:
    """Whether ``pid`` has ended: gone, or a zombie its parent has not reaped yet. Read from
    /proc, so it works for a process this one did not start, or must not reap (``waitpid`` would
    take the exit status from the one that waits for it: multiprocessing, for its forkserver). A
    process closes its files before it becomes a zombie, so one seen ending through a pipe or
    sentinel may still run for a moment: ``patience`` seconds to see it end."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(ENDED_POLL_S)

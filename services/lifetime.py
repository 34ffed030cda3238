"""A process that must not outlive its parent asks the kernel to signal it when the parent dies
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
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36


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

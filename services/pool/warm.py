"""A warm child of the pool: forked once per key (app mode: a run's App), it runs the warming
function once (imports that App) and then forks the workers of every job that names the key, so
each of them starts with it loaded instead of loading it again.

The pool hands a job over as its request and the asker's socket (``SCM_RIGHTS``) on a
``SOCK_SEQPACKET`` pair, one message per job, and hears back, in the same order, the pid of the
worker forked for it. The worker is forked through a short-lived middle process, so that it is
the pool's child (the pool is a child subreaper, ``lifetime.adopt_orphans``): the pool reaps
every worker and tells its asker how it ended exactly as for the workers it forks itself, and
dropping the warm child (the pool closes its end) leaves the running workers alone.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from typing import Callable

from services import worker
from services.failures import first_line
from services.lifetime import die_with_parent

MAX_MESSAGE = 1 << 16  # a pickled Request
REPARENT_PATIENCE_S = 10.0  # the middle process exits at once: the worker is the pool's child within milliseconds


def serve(channel: socket.socket, warm_with: str, key: str, pool_pid: int, serve_one: Callable[[socket.socket, object], None]) -> None:
    """The warm child's life: warm up, say so, then fork one worker per job until the pool
    closes the channel (dropped, or the pool died). Never returns."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() != pool_pid:
        os._exit(1)
    try:
        worker.resolve(warm_with)(key)
    except BaseException as error:  # an App that does not import: its jobs fork from the pool itself
        # LookupError: nothing to warm yet (a restarted pool has not installed the App again); worth another try later
        channel.send(pickle.dumps(("failed", f"{type(error).__name__}: {first_line(error)}", isinstance(error, LookupError))))
        os._exit(1)
    channel.send(pickle.dumps(("ready",)))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 1)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        request = pickle.loads(data)
        asker = socket.socket(fileno=fds[0])
        pid = _fork_adopted(asker, request, channel, pool_pid, serve_one)
        asker.close()
        channel.send(pickle.dumps(("forked", pid)))


def _fork_adopted(asker: socket.socket, request: object, channel: socket.socket, pool_pid: int, serve_one: Callable[[socket.socket, object], None]) -> int:
    """Fork the job's worker through a middle process that exits at once: the worker is then
    the pool's child. Returns the worker's pid."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                channel.close()
                _await_adoption(pool_pid)
                serve_one(asker, request)
            os.write(write_end, pid.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        pid = int.from_bytes(os.read(read_end, 4), "little")
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)
    return pid


def _await_adoption(pool_pid: int) -> None:
    """Until the middle process has exited and the pool adopted this worker (or the pool is gone)."""
    deadline = time.monotonic() + REPARENT_PATIENCE_S
    while os.getppid() != pool_pid:
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.001)

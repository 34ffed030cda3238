"""The host worker pool's loop: accept a connection, fork a fresh worker for it, reap the
worker and tell the asker how it ended.

The pool imported torch (and FL_WORKER_PRELOAD) but never CUDA, and stays single-threaded so
that forking it is safe: one ``selectors`` loop over the listening socket and a pidfd per worker.
A worker dies with the pool (``PR_SET_PDEATHSIG``) and with its asker: it watches its
connection and kills itself when the asker's end closes (a SIGKILLed replica, a timed-out
job), so its slot lock and memory go back at once. The pool writes ``("exited", code)`` itself,
without blocking: a stuck asker never stalls the other replicas.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import uuid
from dataclasses import asdict, dataclass, field

from services import worker
from services.lifetime import die_with_parent
from services.pool import wire

log = logging.getLogger("bouquet.pool")

BACKLOG = 256  # connections waiting to be accepted: every replica of a large host asking at once


@dataclass
class _Running:
    """A worker the pool forked, until it is reaped and its asker told."""

    pid: int
    pidfd: int
    asker: socket.socket
    outgoing: bytes = b""  # the "exited" frame not yet written (the asker's buffer was full)
    exit_code: int | None = None


@dataclass
class Pool:
    socket_path: str
    slots_dir: str
    preload: list[str]
    pool_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    pid: int = field(default_factory=os.getpid)  # the pool's own (its workers see it as their parent)
    running: dict[int, _Running] = field(default_factory=dict)  # by pidfd

    @property
    def records(self) -> str:
        return wire.records_dir(self.socket_path)

    def facts(self) -> wire.Facts:
        return wire.Facts(self.pool_id, self.pid, list(self.preload), os.path.realpath(self.slots_dir), socket.gethostname())

    def bind(self) -> socket.socket:
        """Listen at the socket path (a stale socket of a dead pool is replaced, a live pool's is
        not: wire.PoolUnusable), and claim the slots folder for this pool (its id file)."""
        wire.check_socket_path(self.socket_path)
        if os.path.exists(self.socket_path):
            try:
                wire.connect(self.socket_path, 0).close()
            except wire.PoolUnreachable:
                os.unlink(self.socket_path)  # a dead pool's
            else:
                raise wire.PoolUnusable(f"{self.socket_path!r}: another worker pool is serving it")
        folder = os.path.dirname(os.path.abspath(self.socket_path))
        os.makedirs(folder, exist_ok=True)
        os.makedirs(self.records, exist_ok=True)
        for stale in os.listdir(self.records):  # a dead pool's workers died with it
            os.unlink(os.path.join(self.records, stale))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o660)  # this user and group (compose: bouquet) may ask, nobody else
        listener.listen(BACKLOG)
        listener.setblocking(False)
        os.makedirs(self.slots_dir, exist_ok=True)
        id_file = wire.pool_id_file(self.slots_dir)
        with open(id_file + ".tmp", "w") as file:
            file.write(self.pool_id + "\n")
        os.replace(id_file + ".tmp", id_file)
        return listener

    def serve(self, listener: socket.socket) -> None:
        """Fork a worker per connection until SIGTERM / SIGINT (workers die with the pool)."""
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "accept")
        try:
            while True:
                for key, events in selector.select():
                    if key.data == "accept":
                        self._accept(listener, selector)
                    elif key.data == "exited":
                        self._reap(key.fd, selector)
                    else:  # "write": the rest of an "exited" frame
                        self._flush(self.running[key.data], selector)
        finally:
            selector.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        try:
            asker, _ = listener.accept()
        except BlockingIOError:
            return
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                selector.close()
                for running in self.running.values():
                    os.close(running.pidfd)
                    running.asker.close()
                _serve_one(asker, self)
            finally:
                os._exit(1)  # _serve_one exits itself; only a failure before it lands here
        pidfd = os.pidfd_open(pid)
        asker.setblocking(False)
        self.running[pidfd] = _Running(pid, pidfd, asker)
        selector.register(pidfd, selectors.EVENT_READ, "exited")

    def _reap(self, pidfd: int, selector: selectors.BaseSelector) -> None:
        running = self.running[pidfd]
        selector.unregister(pidfd)
        _, status = os.waitpid(running.pid, 0)
        os.close(pidfd)
        running.exit_code = os.waitstatus_to_exitcode(status)
        try:
            os.unlink(os.path.join(self.records, f"{running.pid}.json"))
        except FileNotFoundError:
            pass
        data = pickle.dumps(("exited", running.exit_code))
        running.outgoing = struct.pack("!i", len(data)) + data  # multiprocessing.connection's framing
        selector.register(running.asker, selectors.EVENT_WRITE, pidfd)
        self._flush(running, selector)

    def _flush(self, running: _Running, selector: selectors.BaseSelector) -> None:
        try:
            sent = running.asker.send(running.outgoing)
        except BlockingIOError:
            return  # the selector calls again once the asker reads
        except OSError:  # the asker is gone: nobody to tell
            sent = len(running.outgoing)
        running.outgoing = running.outgoing[sent:]
        if not running.outgoing:
            selector.unregister(running.asker)
            running.asker.close()
            del self.running[running.pidfd]


def _serve_one(asker: socket.socket, pool: Pool) -> None:
    """In the forked worker: say hello, or run the one job the asker sends, then exit."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() != pool.pid:
        os._exit(1)  # the pool died before PR_SET_PDEATHSIG took effect
    asker.setblocking(True)
    connection = worker.multiprocessing.connection.Connection(asker.detach())
    code = 0
    try:
        connection.send(("forked", os.getpid()))
        request: wire.Request = connection.recv()
        if request.kind == "hello":
            connection.send(("hello", asdict(pool.facts())))
        else:
            wire.write_record(pool.records, os.getpid(), request)
            _die_when_the_asker_leaves(connection.fileno())
            worker.serve_job(connection, forked=True)
    except (EOFError, OSError):
        code = 1  # the asker left before its job arrived
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_when_the_asker_leaves(fd: int) -> None:
    """A watcher thread: the asker's end closing (it died, or gave up on the job) kills this
    worker at once, whether it runs, waits for a slot, or sends its result."""

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        while True:
            for _, events in poller.poll():
                if events & select.POLLNVAL:  # the job is done and closed the connection itself
                    return
                if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="bouquet-asker-watch", daemon=True).start()

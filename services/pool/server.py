"""The host worker pool's loop: accept a connection, read its request, answer a hello or fork a
fresh worker for a job, reap the worker and tell the asker how it ended.

The pool imported torch (and FL_WORKER_PRELOAD) but never CUDA, and stays single-threaded so
that forking it is safe: one ``selectors`` loop over the listening socket, the connections whose
request is still arriving, the askers' sessions and a pidfd per worker. A hello connection stays
open as long as its asker lives (its session): with FL_WORKER_POOL_LIFETIME=askers the pool
exits once every asker that said hello is gone and no worker runs (compose's `up` then ends
with the run).
A worker dies with the pool (``PR_SET_PDEATHSIG``) and with its asker: it watches its
connection and kills itself when the asker's end closes (a SIGKILLed replica, a timed-out
job), so its slot lock and memory go back at once. The pool writes ``("exited", code)`` itself,
without blocking: a stuck asker never stalls the other replicas.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
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
MAX_REQUEST = 1 << 16  # bytes: a Request is a few hundred


class PoolDone(Exception):
    """Every asker has gone (FL_WORKER_POOL_LIFETIME=askers): the run is over."""


@dataclass
class _Arriving:
    """A connection whose request has not fully arrived yet."""

    asker: socket.socket
    received: bytes = b""


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
    until_askers_leave: bool = False  # FL_WORKER_POOL_LIFETIME=askers
    running: dict[int, _Running] = field(default_factory=dict)  # by pidfd
    arriving: dict[int, _Arriving] = field(default_factory=dict)  # by socket fd
    sessions: dict[int, socket.socket] = field(default_factory=dict)  # by socket fd: askers that said hello
    sessions_seen: int = 0

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
        with wire.reachable(self.socket_path) as address:
            listener.bind(address)
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
        """Serve until SIGTERM / SIGINT, or until every asker has gone (``until_askers_leave``);
        running workers die with the pool."""
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, ("accept", None))
        try:
            while True:
                for key, _ in selector.select():
                    what, item = key.data
                    if what == "accept":
                        self._accept(listener, selector)
                    elif what == "request":
                        self._read_request(item, listener, selector)
                    elif what == "session":
                        self._end_session(item, selector)
                    elif what == "exited":
                        self._reap(item, selector)
                    else:  # "write": the rest of an "exited" frame
                        self._flush(item, selector)
        except PoolDone:
            log.info("every replica and server that used the pool has gone (%d in all): the pool exits", self.sessions_seen)
        finally:
            selector.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        try:
            asker, _ = listener.accept()
        except BlockingIOError:
            return
        asker.setblocking(False)
        arriving = _Arriving(asker)
        self.arriving[asker.fileno()] = arriving
        selector.register(asker, selectors.EVENT_READ, ("request", arriving))

    def _read_request(self, arriving: _Arriving, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        """Take in the request as it arrives (multiprocessing.connection's framing); then answer
        a hello (the connection becomes the asker's session) or fork the job's worker."""
        received = arriving.received
        size = struct.unpack("!i", received[:4])[0] if len(received) >= 4 else None
        if size is not None and not 0 < size <= MAX_REQUEST:
            chunk = b""  # not a Request: refused below
        else:  # exactly the request's bytes: the job the asker sends next is its worker's to read
            try:
                chunk = arriving.asker.recv(4 - len(received) if size is None else 4 + size - len(received))
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
        arriving.received += chunk
        size = struct.unpack("!i", arriving.received[:4])[0] if len(arriving.received) >= 4 else None
        if chunk and (size is None or len(arriving.received) < 4 + size):
            return  # more to come
        selector.unregister(arriving.asker)
        del self.arriving[arriving.asker.fileno()]
        request = _parse(arriving.received, size)
        if request is None:  # gone before asking, or not a Bouquet asker
            arriving.asker.close()
            self._maybe_done()
        elif request.kind == "hello":
            frame = _frame(("hello", asdict(self.facts())))
            try:
                arriving.asker.setblocking(True)
                arriving.asker.settimeout(5)
                arriving.asker.sendall(frame)
                arriving.asker.setblocking(False)
            except OSError:
                arriving.asker.close()
                return
            self.sessions[arriving.asker.fileno()] = arriving.asker
            self.sessions_seen += 1
            selector.register(arriving.asker, selectors.EVENT_READ, ("session", arriving.asker))
        else:
            self._fork(arriving.asker, request, listener, selector)

    def _end_session(self, asker: socket.socket, selector: selectors.BaseSelector) -> None:
        """An asker's session ends when it dies or stops (it never writes on it again)."""
        selector.unregister(asker)
        self.sessions.pop(asker.fileno(), None)
        asker.close()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.until_askers_leave and self.sessions_seen and not self.sessions and not self.running:
            raise PoolDone()

    def _fork(self, asker: socket.socket, request: wire.Request, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                selector.close()
                for running in self.running.values():
                    os.close(running.pidfd)
                    running.asker.close()
                for other in [*self.sessions.values(), *(a.asker for a in self.arriving.values())]:
                    other.close()
                _serve_one(asker, request, self)
            finally:
                os._exit(1)  # _serve_one exits itself; only a failure before it lands here
        pidfd = os.pidfd_open(pid)
        self.running[pidfd] = _Running(pid, pidfd, asker)
        selector.register(pidfd, selectors.EVENT_READ, ("exited", pidfd))

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
        running.outgoing = _frame(("exited", running.exit_code))
        selector.register(running.asker, selectors.EVENT_WRITE, ("write", running))
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
            self._maybe_done()


def _frame(message: object) -> bytes:
    """One message as multiprocessing.connection.Connection.send frames it."""
    data = pickle.dumps(message)
    return struct.pack("!i", len(data)) + data


def _parse(received: bytes, size: int | None) -> wire.Request | None:
    if size is None or size < 0 or len(received) != 4 + size:
        return None
    try:
        request = pickle.loads(received[4:])
    except Exception:
        return None
    return request if isinstance(request, wire.Request) else None


def _serve_one(asker: socket.socket, request: wire.Request, pool: Pool) -> None:
    """In the forked worker: run the asker's one job, then exit."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() != pool.pid:
        os._exit(1)  # the pool died before PR_SET_PDEATHSIG took effect
    asker.setblocking(True)
    if request.role == "client" and request.identity:
        os.environ["FL_CLIENT_ID"] = request.identity  # as a worker of the replica itself sees it (its client identity)
    connection = multiprocessing.connection.Connection(asker.detach())
    code = 0
    try:
        connection.send(("forked", os.getpid()))
        try:
            wire.write_record(pool.records, os.getpid(), request)
        except OSError:
            pass  # the job matters more than its attribution: the monitor then counts it as the pool's
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

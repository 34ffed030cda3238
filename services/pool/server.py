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

A job may name a warm child (``Request.warm_key``: app mode names its run's App): the pool
forks that child once (``services.pool.warm``), queues the key's jobs until it is ready, and
from then on has it fork them; the pool still reaps and reports every worker. At most
``MAX_WARM_CHILDREN`` live at once (the least recently used goes), and one unused for
``WARM_IDLE_S`` goes too (its run has ended). A key whose warming failed forks from the pool.
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
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

from services import worker
from services.lifetime import adopt_orphans, die_with_parent
from services.pool import warm, wire

log = logging.getLogger("bouquet.pool")

BACKLOG = 256  # connections waiting to be accepted: every replica of a large host asking at once
MAX_REQUEST = 1 << 16  # bytes: a Request is a few hundred
MAX_WARM_CHILDREN = 2  # warm children at once (app mode: a run's App each; two runs may overlap)
WARM_IDLE_S = 300.0  # a warm child no job named for this long is dropped (its run is over)


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
class _WarmChild:
    """A child of the pool that ran ``warm_with(key)`` once and forks the key's workers."""

    key: str
    pid: int
    pidfd: int
    channel: socket.socket  # the pool's end: jobs go out with their asker's socket, ("ready"|"failed"|"forked", ...) come back
    ready: bool = False
    waiting: list[tuple[socket.socket, wire.Request]] = field(default_factory=list)  # until ready
    handed: deque = field(default_factory=deque)  # askers whose worker's pid has not come back yet, in order
    used_at: float = field(default_factory=time.monotonic)


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
    warm_children: dict[str, _WarmChild] = field(default_factory=dict)  # by key
    unwarmable: dict[str, str] = field(default_factory=dict)  # key -> why its warming failed
    listener: socket.socket | None = field(default=None, repr=False)  # while serving

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
        adopt_orphans()  # the workers a warm child forks become this process's children
        os.makedirs(self.slots_dir, exist_ok=True)
        id_file = wire.pool_id_file(self.slots_dir)
        with open(id_file + ".tmp", "w") as file:
            file.write(self.pool_id + "\n")
        os.replace(id_file + ".tmp", id_file)
        return listener

    def serve(self, listener: socket.socket) -> None:
        """Serve until SIGTERM / SIGINT, or until every asker has gone (``until_askers_leave``);
        running workers die with the pool."""
        self.listener = listener
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, ("accept", None))
        try:
            while True:
                for key, _ in selector.select(self._next_expiry()):
                    what, item = key.data
                    if what == "warm":
                        self._hear_warm_child(item, selector)
                    elif what == "warm-exited":
                        self._reap_warm_child(item, selector)
                    elif what == "accept":
                        self._accept(listener, selector)
                    elif what == "request":
                        self._read_request(item, listener, selector)
                    elif what == "session":
                        self._end_session(item, selector)
                    elif what == "exited":
                        self._reap(item, selector)
                    else:  # "write": the rest of an "exited" frame
                        self._flush(item, selector)
                self._drop_idle_warm_children()
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
            self._start_job(arriving.asker, request, listener, selector)

    def _start_job(self, asker: socket.socket, request: wire.Request, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        """Fork the job's worker here, or have the warm child its request names fork it."""
        if not request.warm_key or request.warm_key in self.unwarmable:
            self._fork(asker, request, listener, selector)
            return
        child = self.warm_children.get(request.warm_key) or self._start_warm_child(request, listener, selector)
        child.used_at = time.monotonic()
        if child.ready:
            self._hand_over(child, asker, request)
        else:
            child.waiting.append((asker, request))

    def _start_warm_child(self, request: wire.Request, listener: socket.socket, selector: selectors.BaseSelector) -> _WarmChild:
        while len(self.warm_children) >= MAX_WARM_CHILDREN:
            self._drop_warm_child(min(self.warm_children.values(), key=lambda child: child.used_at))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                self._close_inherited(listener, selector)
                warm.serve(theirs, request.warm_with, request.warm_key, self.pid, lambda asker, job: _serve_one(asker, job, self))
            finally:
                os._exit(1)
        theirs.close()
        child = _WarmChild(request.warm_key, pid, os.pidfd_open(pid), ours)
        self.warm_children[child.key] = child
        selector.register(ours, selectors.EVENT_READ, ("warm", child))
        selector.register(child.pidfd, selectors.EVENT_READ, ("warm-exited", child))
        log.info("warm child %d: warming %s for the jobs that name it", pid, _short(child.key))
        return child

    def _hand_over(self, child: _WarmChild, asker: socket.socket, request: wire.Request) -> None:
        try:
            socket.send_fds(child.channel, [pickle.dumps(request)], [asker.fileno()])
        except OSError:  # the warm child is gone: its exit is on the way, fork from here
            child.waiting.append((asker, request))
            return
        child.handed.append(asker)

    def _hear_warm_child(self, child: _WarmChild, selector: selectors.BaseSelector) -> None:
        try:
            data = child.channel.recv(MAX_REQUEST)
        except OSError:
            data = b""
        if not data:  # it died: its pidfd reports that
            selector.unregister(child.channel)
            return
        message = pickle.loads(data)
        if message[0] == "ready":
            child.ready = True
            log.info("warm child %d ready for %s", child.pid, _short(child.key))
            waiting, child.waiting = child.waiting, []
            for asker, request in waiting:
                self._hand_over(child, asker, request)
        elif message[0] == "failed":
            _, cause, try_later = message
            if not try_later:
                self.unwarmable[child.key] = cause
            log.warning("could not warm %s (%s): its jobs fork from the pool itself%s", _short(child.key), cause, " for now" if try_later else "")
        else:  # ("forked", pid): the next handed asker's worker, now this process's child
            asker = child.handed.popleft()
            pidfd = os.pidfd_open(message[1])
            self.running[pidfd] = _Running(message[1], pidfd, asker)
            selector.register(pidfd, selectors.EVENT_READ, ("exited", pidfd))

    def _reap_warm_child(self, child: _WarmChild, selector: selectors.BaseSelector) -> None:
        """A warm child ended (dropped, failed, or killed): its queued jobs fork from the pool; a
        job handed over whose worker never came back ends (its asker sees the pool's end)."""
        selector.unregister(child.pidfd)
        os.waitpid(child.pid, 0)
        os.close(child.pidfd)
        if child.channel.fileno() in selector.get_map():
            selector.unregister(child.channel)
        child.channel.close()
        if self.warm_children.get(child.key) is child:
            del self.warm_children[child.key]
        for asker in child.handed:
            asker.close()
        for asker, request in child.waiting:
            self._fork(asker, request, self.listener, selector)
        self._maybe_done()

    def _drop_warm_child(self, child: _WarmChild) -> None:
        """Close its channel: it exits once it has forked what it was handed; reaped when it has."""
        del self.warm_children[child.key]
        try:
            child.channel.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        log.info("warm child %d for %s dropped", child.pid, _short(child.key))

    def _drop_idle_warm_children(self) -> None:
        now = time.monotonic()
        for child in [c for c in self.warm_children.values() if c.ready and not c.handed and now - c.used_at > WARM_IDLE_S]:
            self._drop_warm_child(child)

    def _next_expiry(self) -> float | None:
        idle = [child.used_at + WARM_IDLE_S - time.monotonic() for child in self.warm_children.values()]
        return max(1.0, min(idle)) if idle else None

    def _close_inherited(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        """In a fresh child of the pool: let go of everything the pool holds open."""
        listener.close()
        selector.close()
        for running in self.running.values():
            os.close(running.pidfd)
            running.asker.close()
        for other in [*self.sessions.values(), *(a.asker for a in self.arriving.values())]:
            other.close()
        for child in self.warm_children.values():
            os.close(child.pidfd)
            child.channel.close()
            for asker in child.handed:
                asker.close()
            for asker, _ in child.waiting:
                asker.close()

    def _end_session(self, asker: socket.socket, selector: selectors.BaseSelector) -> None:
        """An asker's session ends when it dies or stops (it never writes on it again)."""
        selector.unregister(asker)
        self.sessions.pop(asker.fileno(), None)
        asker.close()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.until_askers_leave and self.sessions_seen and not self.sessions and not self.running and not any(c.handed or c.waiting for c in self.warm_children.values()):
            raise PoolDone()

    def _fork(self, asker: socket.socket, request: wire.Request, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                self._close_inherited(listener, selector)
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


def _short(key: str) -> str:
    return key[:12]


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

"""Where a replica meets the host worker pool, and what they say: shared by both sides.

One connection per job. The replica connects to the pool's Unix socket and sends a ``Request``
(who asks: the memory monitor counts the worker for that replica); the pool forks a fresh
worker and hands it the connection. On it travel, in order:

- worker → replica: ``("forked", pid)``
- replica → worker: the job exactly as ``services.worker`` sends it to any worker
- worker → replica: ``services.worker``'s own messages (admitted, started, ok or error)
- pool → replica: ``("exited", code)`` once the pool reaped the worker: what ``waitpid`` tells a
  parent (a negative code is the signal that killed it)

The stream ending without ``exited`` means the pool itself is gone. A ``hello`` request instead
of a job is answered with the pool's ``Facts`` (what it preloaded, which slots folder it admits
to), checked when a replica starts; that connection then stays open as the replica's session. Standard library only: the client side runs in
replicas that never import torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing.connection
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

SOCKET_NAME = "pool.sock"
POOL_FOLDER = "pool"  # in the slots folder: the socket, the pool's id, the worker records
RECORDS = "workers"  # <pool folder>/workers/<pid>.json: who asked for each running worker
POOL_ID = "pool.id"  # <slots folder>/pool.id: written by the pool that admits to this folder
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL: longer paths go through reachable()
RETRY_SECONDS = 0.2  # between tries while the pool is not there yet


class PoolUnreachable(RuntimeError):
    """Nothing answers at the socket (yet): the pool has not started, or it died."""


class PoolUnusable(RuntimeError):
    """The socket setting itself is wrong (not a socket, not readable, too long, another deployment's pool)."""


@dataclass(frozen=True)
class Request:
    kind: str  # "hello" or "job"
    role: str = "client"  # client or server: whose worker this is
    identity: str = ""  # the client identity the server knows ("" for the server)
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)  # the asker's pid in its own namespace
    job: str = ""
    warm_with: str = ""  # 'module:function' that a warm child of the pool runs once with warm_key ...
    warm_key: str = ""  # ... to fork this job's worker from (services.worker.Warm); "" forks from the pool


@dataclass(frozen=True)
class Facts:
    """What a pool tells a replica that says hello."""

    pool_id: str
    pid: int
    preload: list[str]
    slots_dir: str
    hostname: str


def default_socket(slots_dir: str) -> str:
    return os.path.join(slots_dir, POOL_FOLDER, SOCKET_NAME)


def records_dir(socket_path: str) -> str:
    return os.path.join(os.path.dirname(socket_path), RECORDS)


def pool_id_file(slots_dir: str) -> str:
    return os.path.join(slots_dir, POOL_ID)


@contextlib.contextmanager
def reachable(socket_path: str) -> Iterator[str]:
    """The path to bind or connect to: ``socket_path`` itself, or, when it is longer than a Unix
    socket address may be (a deep data folder), the same file reached through an open handle on
    its folder (``/proc/self/fd/N/pool.sock``), so any folder works."""
    if len(os.fsencode(socket_path)) <= MAX_SOCKET_PATH:
        yield socket_path
        return
    try:
        folder = os.open(os.path.dirname(os.path.abspath(socket_path)), os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise PoolUnusable(f"{socket_path!r}: its folder cannot be opened: {error.strerror}") from None
    try:
        yield f"/proc/self/fd/{folder}/{os.path.basename(socket_path)}"
    finally:
        os.close(folder)


def check_socket_path(socket_path: str) -> None:
    """A path that is a Unix socket if something is there (PoolUnusable otherwise)."""
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise PoolUnusable(f"{socket_path!r} cannot be read: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise PoolUnusable(f"{socket_path!r} is not a Unix socket")


def connect(socket_path: str, patience: float) -> multiprocessing.connection.Connection:
    """A connection to the pool, trying for ``patience`` seconds while nothing listens there yet."""
    deadline = time.monotonic() + patience
    while True:
        check_socket_path(socket_path)
        endpoint = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with reachable(socket_path) as address:
                endpoint.connect(address)
            return multiprocessing.connection.Connection(endpoint.detach())
        except (FileNotFoundError, ConnectionRefusedError) as error:
            endpoint.close()
            if time.monotonic() >= deadline:
                raise PoolUnreachable(f"no worker pool answers at {socket_path!r} ({type(error).__name__})") from None
        except OSError as error:
            endpoint.close()
            if error.errno in (errno.EACCES, errno.EPERM, errno.ENOTSOCK, errno.EROFS):
                raise PoolUnusable(f"{socket_path!r} refuses this process: {error.strerror}") from None
            raise
        time.sleep(RETRY_SECONDS)


def hello(socket_path: str, patience: float) -> tuple[Facts, multiprocessing.connection.Connection]:
    """Ask the pool what it is (waiting ``patience`` seconds for it to come up). The connection
    that comes back is the asker's session: kept open while the asker lives, it tells the pool
    who still needs it."""
    connection = connect(socket_path, patience)
    try:
        connection.send(Request("hello"))
        kind, facts = connection.recv()
        if kind != "hello":
            raise PoolUnusable(f"{socket_path!r} answered {kind!r} to hello: not a Bouquet worker pool")
        return Facts(**facts), connection
    except (EOFError, OSError) as error:
        connection.close()
        raise PoolUnreachable(f"the worker pool at {socket_path!r} closed the connection ({type(error).__name__})") from None
    except BaseException:
        connection.close()
        raise


def read_pool_id(slots_dir: str) -> str | None:
    try:
        with open(pool_id_file(slots_dir)) as file:
            return file.read().strip() or None
    except OSError:
        return None


def write_record(folder: str, pid: int, request: Request) -> None:
    """Who asked for worker ``pid`` (read by the memory monitor), written whole or not at all."""
    path = os.path.join(folder, f"{pid}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(asdict(request), file)
    os.replace(path + ".tmp", path)


def read_record(path: str) -> dict | None:
    try:
        with open(path) as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def pool_folder_of(environ: dict[str, str], cwd: str) -> str:
    """The pool's folder as a pool process with this environment uses it (the memory monitor
    reads it from the pool's /proc entry; the launcher and compose configure the pool this way)."""
    socket_path = environ.get("FL_WORKER_POOL_SOCKET") or default_socket(
        environ.get("FL_SLOTS_DIR") or os.path.join(environ.get("FL_DATA_DIR") or "data", "slots")
    )
    return os.path.join(cwd, os.path.dirname(socket_path))


def check(facts: Facts, socket_path: str, slots_dir: str, preload: list[str]) -> None:
    """The pool found at ``socket_path`` serves this replica: it admits workers to this replica's
    slots folder (so admission counts every worker on the host) and preloaded what it needs."""
    ours = read_pool_id(slots_dir)
    if ours != facts.pool_id:
        raise PoolUnusable(
            f"FL_WORKER_POOL_SOCKET={socket_path} is the worker pool of another deployment: it admits workers to the slots "
            f"folder {facts.slots_dir!r} (FL_SLOTS_DIR), which is not this process's {slots_dir!r} "
            "(give the pool and every replica the same slots folder, or each deployment its own socket)"
        )
    missing = [name for name in preload if name not in facts.preload]
    if missing:
        raise PoolUnusable(
            f"FL_WORKER_PRELOAD={','.join(preload)}: the worker pool at {socket_path} did not preload {', '.join(missing)} "
            f"(it preloaded {', '.join(facts.preload)}); give the pool the same FL_WORKER_PRELOAD"
        )

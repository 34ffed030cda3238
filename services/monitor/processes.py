"""Which processes belong to the run, and to which replica each one belongs.

Roles: ``client`` and ``server`` (the Python interpreter running ``-m services.client`` /
``services.server`` itself; never a wrapper whose arguments name it, such as compose's
``init: true`` process ``docker-init -- bouquet-entrypoint python -m services.client``),
``worker`` (a process under a client: its per-round training and evaluation workers),
``server-worker`` (the same under the server: initial weights, central evaluation),
``helper`` (any other process under them: multiprocessing's resource tracker and forkserver,
a short-lived subprocess), ``pool`` (the host worker pool, ``services.pool``: a line of its own),
``monitor`` and ``other`` (anything else, e.g. another program on the GPU).
A worker belongs to the replica of the client or server above it; a worker the host pool forked
belongs to the replica that asked for it, which the pool wrote down in its records folder
(``services.pool.wire``; found through the pool's environment, as compose and the launcher set it). A client's replica is its
identity: FL_CLIENT_ID from its environment (the local launcher sets client-0..N-1), else
its container's hostname (or compose names, where FL_DOCKER_API is set), else its pid.

Scope ``launcher`` keeps the processes started by the monitor's parent (scripts/run_local.py
starts server, clients and monitor side by side), so other runs on the same machine stay
out; scope ``host`` takes every Bouquet process on the host (containers with ``pid: host``),
and with a run volume (compose: the data volume, FL_RUN_VOLUME) only those that see that very
folder, so another compose project on the same host stays out.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Protocol

import psutil

from services.monitor.containers import Container, ContainerNames, read_container_id, read_hostname
from services.pool import wire

log = logging.getLogger("bouquet.monitor")

PROGRAMS = {"services.client": "client", "services.server": "server", "services.monitor": "monitor", "services.pool": "pool"}
FORKSERVER = "from multiprocessing.forkserver import main"  # the -c command of multiprocessing's forkserver
SPAWNED = "--multiprocessing-fork"  # the last argument of every process multiprocessing spawns
OWNER_ROLES = ("client", "server")
WORKER_ROLES = ("worker", "server-worker")
POOL = "pool"
RUN_ROLES = (*OWNER_ROLES, *WORKER_ROLES, "helper", POOL)
POOL_REPLICA = "worker-pool"  # the pool's line in the records (its compose name, where names are known)
MAX_DEPTH = 4  # forkserver workers sit two levels below their client
PYTHON_EXECUTABLE = re.compile(r"python(\d+(\.\d+)*)?")  # python, python3, python3.11 (any folder)
OPTIONS_WITH_VALUE = "WX"  # python -W arg, -X opt: the next token (or the rest of this one) is theirs
LONG_OPTIONS_WITH_VALUE = ("--check-hash-based-pycs",)


@dataclass(frozen=True)
class Attribution:
    pid: int
    ppid: int | None
    started: float | None  # process creation time, seconds since the epoch
    role: str
    replica: str
    identity: str  # the client identity the server knows (metrics.jsonl "id"); "" for others
    container: str  # short container id; "" on the host


def python_target(cmdline: tuple[str, ...]) -> tuple[str, str] | None:
    """What a Python interpreter was asked to run: ("module", name), ("command", code),
    ("script", path) or ("stdin", "-"); None when argv[0] is not a Python interpreter.

    Only the interpreter's own options are read, as CPython parses them: a wrapper such as
    docker-init, tini, ``sh -c``, setpriv or sudo carries the real command line among its
    arguments, and must not be taken for the program it starts."""
    if not cmdline or not PYTHON_EXECUTABLE.fullmatch(os.path.basename(cmdline[0])):
        return None
    tokens = iter(cmdline[1:])
    for token in tokens:
        if token == "--" or token == "-" or not token.startswith("-"):
            path = token if token != "--" else next(tokens, None)
            if path is None:
                return None
            return ("stdin", "-") if path == "-" else ("script", path)
        if token.startswith("--"):
            if token in LONG_OPTIONS_WITH_VALUE:
                next(tokens, None)
            continue
        for position, flag in enumerate(token[1:], start=1):
            if flag in "cm" or flag in OPTIONS_WITH_VALUE:
                value = token[position + 1 :] or next(tokens, None)
                if flag in OPTIONS_WITH_VALUE:
                    break
                if value is None:
                    return None
                return ("command" if flag == "c" else "module", value)
    return None


def program_of(cmdline: tuple[str, ...]) -> str | None:
    """"client", "server" or "monitor" when the process IS the interpreter running that
    Bouquet module (``python -m services.client``, or ``python .../services/client/__main__.py``);
    None for anything else, wrappers whose arguments name the module included."""
    target = python_target(cmdline)
    if target is None:
        return None
    kind, value = target
    if kind == "module":
        return PROGRAMS.get(value)
    if kind == "script":
        for module, program in PROGRAMS.items():
            main = module.replace(".", "/") + "/__main__.py"
            if value == main or value.endswith("/" + main):
                return program
    return None


def is_forkserver(cmdline: tuple[str, ...]) -> bool:
    """multiprocessing's forkserver, or a worker it forked (which keeps its command line)."""
    target = python_target(cmdline)
    return target is not None and target[0] == "command" and FORKSERVER in target[1]


def is_worker(cmdline: tuple[str, ...], parent_cmdline: tuple[str, ...], owner_program: str | None) -> bool:
    """The one rule for "this process under a client or server does one job and exits":
    forked by the forkserver (it keeps the forkserver's command line, so only its parent tells),
    spawned by multiprocessing (``... --multiprocessing-fork``), or a fork of its owner that has
    not exec'd yet (it still shows the owner's command line; only when the owner's program is
    known). Anything else under an owner (resource tracker, the forkserver itself, other
    subprocesses) is a helper."""
    if is_forkserver(parent_cmdline):
        return True
    target = python_target(cmdline)
    if target is not None and target[0] == "command" and cmdline[-1] == SPAWNED:
        return True
    return owner_program is not None and program_of(cmdline) == owner_program


def is_worker_process(process: psutil.Process) -> bool:
    """``is_worker`` for a live process whose owner's program is not known (e.g. the benchmark's
    process trees); False once it has exited."""
    try:
        parent = process.parent()
        parent_cmdline = tuple(parent.cmdline()) if parent is not None else ()
        return is_worker(tuple(process.cmdline()), parent_cmdline, None)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


class Probe(Protocol):
    """Facts about processes; psutil on a live host, recorded tables in tests."""

    def listing(self) -> dict[int, tuple[int | None, float | None]]: ...  # pid -> (ppid, started)

    def details(self, pid: int) -> tuple[tuple[str, ...], str | None]: ...  # (cmdline, the identity its environment sets)

    def container_id(self, pid: int) -> str | None: ...

    def hostname(self, pid: int) -> str | None: ...  # of the container the process runs in

    def sees(self, pid: int, folder: str) -> bool | None: ...  # whether it sees our ``folder`` at that path; None: cannot tell

    def pool_record(self, pid: int, pool: int) -> dict | None: ...  # who asked the pool ``pool`` for its worker ``pid``


def boot_time(proc: str = "/proc") -> float:
    """Boot time to the millisecond. psutil's comes from /proc/stat's whole-second btime, which
    puts process start times up to a second early: too coarse to tell whether a worker started
    before or after a round ended."""
    with open(os.path.join(proc, "uptime")) as uptime:
        return time.time() - float(uptime.read().split()[0])


class ProcProbe:
    """Reads /proc directly: one small read of /proc/<pid>/stat per process per sample (about
    a third of what psutil.process_iter costs), command lines and identities once per process."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.boot = boot_time(proc)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self._pool_folders: dict[int, str | None] = {}

    def listing(self) -> dict[int, tuple[int | None, float | None]]:
        out: dict[int, tuple[int | None, float | None]] = {}
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.proc, name, "stat"), "rb") as stat:
                    data = stat.read()
            except OSError:  # exited since the listing
                continue
            fields = data[data.rfind(b")") + 2 :].split()  # the command name may hold spaces and parentheses
            out[int(name)] = (int(fields[1]), round(self.boot + int(fields[19]) / self.ticks, 3))
        return out

    def details(self, pid: int) -> tuple[tuple[str, ...], str | None]:
        try:
            process = psutil.Process(pid)
            cmdline = tuple(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return (), None
        identity = None
        if program_of(cmdline) == "client":  # what services.client reports: FL_CLIENT_ID, else the hostname
            try:
                environ = process.environ()
                identity = environ.get("FL_CLIENT_ID") or environ.get("HOSTNAME")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                # Another user's environment needs CAP_SYS_PTRACE, which containers lack by
                # default; a replica in a container is then named by its container (hostname).
                pass
        return cmdline, identity or None

    def container_id(self, pid: int) -> str | None:
        return read_container_id(pid, self.proc)

    def hostname(self, pid: int) -> str | None:
        return read_hostname(pid, self.proc)

    def sees(self, pid: int, folder: str) -> bool | None:
        """The same folder (device and inode) at the same path in the process's mount
        namespace: true for every container that mounts the same volume there."""
        try:
            ours = os.stat(folder)
        except OSError:
            return None
        try:
            theirs = os.stat(os.path.join(self.proc, str(pid), "root", folder.lstrip("/")))
        except FileNotFoundError:
            return False
        except OSError:  # PermissionError without CAP_SYS_PTRACE; or the process just exited
            return None
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def pool_record(self, pid: int, pool: int) -> dict | None:
        """The record the pool's worker wrote, read through the worker's own view of the files
        (/proc/<pid>/root) under the pid it has in its own namespace (the last of NSpid)."""
        if pool not in self._pool_folders:
            try:
                process = psutil.Process(pool)
                self._pool_folders[pool] = wire.pool_folder_of(process.environ(), process.cwd())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._pool_folders[pool] = None
        folder = self._pool_folders[pool]
        if folder is None:
            return None
        try:
            with open(os.path.join(self.proc, str(pid), "status")) as status:
                inner = next(line.split()[-1] for line in status if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            return None
        return wire.read_record(os.path.join(self.proc, str(pid), "root", folder.lstrip("/"), wire.RECORDS, f"{inner}.json"))


class ProcessTable:
    """Refreshed once per sample; remembers what never changes (command line, identity, owner),
    so a worker stays attributed to its client even if it outlives it. Processes younger than
    SETTLE_S are looked at afresh every sample: between fork and exec a new worker still shows
    its parent's command line."""

    SETTLE_S = 1.0

    def __init__(
        self,
        scope: str,
        names: ContainerNames,
        probe: Probe | None = None,
        self_pid: int | None = None,
        root_pid: int | None = None,
        clock=time.time,
        run_volume: str | None = None,
    ) -> None:
        if scope not in ("host", "launcher"):
            raise ValueError(f"scope must be host or launcher, got {scope!r}")
        self.scope = scope
        self.names = names
        self.probe = probe or ProcProbe()
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.root_pid = os.getppid() if root_pid is None else root_pid
        self.clock = clock
        self.run_volume = run_volume
        self._unseen_warned = False
        self._listing: dict[int, tuple[int | None, float | None]] = {}
        self._askers: dict[tuple[str, str], int] | None = None
        self._details: dict[tuple[int, float | None], tuple[tuple[str, ...], str | None]] = {}
        self._settled: dict[tuple[int, float | None], Attribution] = {}
        self._in_scope: set[tuple[int, float | None]] = set()
        self._out_of_scope: set[tuple[int, float | None]] = set()
        self._young: set[tuple[int, float | None]] = set()
        self._young_in_scope: set[tuple[int, float | None]] = set()

    def refresh(self) -> None:
        now = self.clock()
        self._listing = self.probe.listing()
        self._askers: dict[tuple[str, str], int] | None = None  # (role, identity) -> pid, built on a pool worker's first lookup
        alive = {(pid, started) for pid, (_, started) in self._listing.items()}
        for cache in (self._details, self._settled):
            for key in set(cache) - alive:
                del cache[key]
        self._in_scope &= alive
        self._out_of_scope &= alive
        self._young = {key for key in alive if key[1] is not None and now - key[1] < self.SETTLE_S}
        self._young_in_scope = set()
        for key in self._young:
            self._details.pop(key, None)
            self._settled.pop(key, None)
        for key in alive - self._in_scope - self._out_of_scope:
            belongs = self._belongs(key[0])
            if key in self._young:
                if belongs:
                    self._young_in_scope.add(key)
            else:
                (self._in_scope if belongs else self._out_of_scope).add(key)

    def tracked(self) -> list[int]:
        """The run's own processes (servers, clients, their workers and helpers), in pid order."""
        keys = self._in_scope | self._young_in_scope
        return sorted(pid for pid, _ in keys if self.describe(pid).role in RUN_ROLES)

    def describe(self, pid: int) -> Attribution:
        key = self._key(pid)
        if key in self._settled:
            return self._settled[key]
        ppid, started = self._listing.get(pid, (None, None))
        role, owner = self._role(pid)
        if owner is None:
            container = self._container(pid)
            attribution = Attribution(pid, ppid, started, role, container.replica if container else "host", "", _short(container))
        else:
            replica, identity, container = self._owner(owner, role if owner == pid else self._role(owner)[0])
            attribution = Attribution(pid, ppid, started, role, replica, identity, _short(container))
            if key not in self._young:
                self._settled[key] = attribution
        return attribution

    # -- internals -----------------------------------------------------------------------------

    def _key(self, pid: int) -> tuple[int, float | None]:
        return pid, self._listing.get(pid, (None, None))[1]

    def _cmdline(self, pid: int) -> tuple[tuple[str, ...], str | None]:
        key = self._key(pid)
        if key not in self._details:
            self._details[key] = self.probe.details(pid)
        return self._details[key]

    def _ancestors(self, pid: int):
        seen = 0
        current = self._listing.get(pid, (None, None))[0]
        while current and current in self._listing and seen < MAX_DEPTH:
            yield current
            current = self._listing[current][0]
            seen += 1

    def _role(self, pid: int) -> tuple[str, int | None]:
        """(role, pid of the owning client, server or pool, or None)."""
        cmdline, _ = self._cmdline(pid)
        program = program_of(cmdline)
        if program == "monitor":
            return "monitor", None
        owners = (*OWNER_ROLES, POOL)
        owner_pid, owner = next(
            ((ancestor, found) for ancestor in self._ancestors(pid) if (found := program_of(self._cmdline(ancestor)[0])) in owners),
            (None, None),
        )
        if program in owners and owner != program:
            return program, pid
        if owner_pid is None:
            return "other", None
        if owner == POOL:
            return self._pool_worker(pid, owner_pid)
        parent = self._listing.get(pid, (None, None))[0]
        parent_cmdline = self._cmdline(parent)[0] if parent is not None else ()
        if is_worker(cmdline, parent_cmdline, owner):
            return ("worker" if owner == "client" else "server-worker"), owner_pid
        return "helper", owner_pid  # resource tracker, forkserver, or any other subprocess

    def _pool_worker(self, pid: int, pool: int) -> tuple[str, int | None]:
        """A process under the host pool: the worker of the replica (or server) that asked for it,
        as the pool's records say; anything else there (a worker whose asker is gone, or not yet
        written down) is the pool's helper. A forked worker keeps the pool's command line, so the
        pool is the topmost of the pool-looking ancestors."""
        while (parent := self._listing.get(pool, (None, None))[0]) and program_of(self._cmdline(parent)[0]) == POOL:
            pool = parent
        worker = pid
        while self._listing.get(worker, (None, None))[0] not in (pool, None):
            worker = self._listing[worker][0]  # a process the worker started itself (e.g. a DataLoader's)
        read = getattr(self.probe, "pool_record", None)
        record = read(worker, pool) if read is not None else None
        if record is not None:
            asker = self._asker(record.get("role"), record.get("identity") or "")
            if asker is not None:
                return ("worker" if record.get("role") == "client" else "server-worker"), asker
        return "helper", pool

    def _asker(self, role: str | None, identity: str) -> int | None:
        """The client with this identity (or the server) among the processes this sample lists;
        the sample's owners are looked up once, whatever number of pool workers ask."""
        if self._askers is None:
            self._askers = {}
            for pid in self._listing:
                cmdline, env_identity = self._cmdline(pid)
                program = program_of(cmdline)
                if program == "server":
                    self._askers.setdefault(("server", ""), pid)
                elif program == "client":
                    self._askers.setdefault(("client", env_identity or self.probe.hostname(pid) or ""), pid)
        return self._askers.get((role or "", identity if role == "client" else ""))

    def _owner(self, owner: int, owner_role: str) -> tuple[str, str, Container | None]:
        """(replica, identity, container) of a client or server process."""
        _, env_identity = self._cmdline(owner)
        container = self._container(owner)
        if owner_role == POOL:
            return (container.replica if container and container.named else POOL_REPLICA), "", container
        if owner_role == "server":
            return (container.replica if container and container.named else "server"), "", container
        if container is not None:  # compose names ("client-3") read better than hostnames (container ids)
            identity = env_identity or container.hostname or ""
            return (container.replica if container.named or not identity else identity), identity, container
        return env_identity or f"client-pid{owner}", env_identity or "", None

    def _container(self, pid: int) -> Container | None:
        container_id = self.probe.container_id(pid)
        return self.names.lookup(container_id, lambda: self.probe.hostname(pid)) if container_id else None

    def _belongs(self, pid: int) -> bool:
        if pid == self.self_pid:
            return False
        if self.scope == "launcher":
            chain = [pid, *self._full_ancestors(pid)]
            return self.root_pid in chain[1:] and self.self_pid not in chain
        role, owner = self._role(pid)
        if role not in RUN_ROLES:
            return False
        if self.run_volume is None:
            return True
        sees = self.probe.sees(owner if owner is not None else pid, self.run_volume)
        if sees is None and not self._unseen_warned:
            self._unseen_warned = True
            log.warning("cannot look into another process's mounts (/proc/<pid>/root needs CAP_SYS_PTRACE): "
                        "processes whose view of %s is unknown are left out of the run", self.run_volume)
        return bool(sees)

    def _full_ancestors(self, pid: int) -> list[int]:
        chain, current = [], self._listing.get(pid, (None, None))[0]
        while current and current in self._listing and current not in chain:
            chain.append(current)
            current = self._listing[current][0]
        return chain


def _short(container: Container | None) -> str:
    return container.id[:12] if container else ""

"""The memory monitor: attribution, round labels and summary driven by recorded samples, the
NVML reader driven by a recorded NVML, and one real local run with the monitor and report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from services.monitor import csvlog, nvml as nvml_module
from services.monitor.containers import ContainerNames, container_id_from_cgroup
from services.monitor.processes import ProcessTable, ProcProbe, program_of
from services.monitor.readings import MIB, DeviceReading, ProcessReading, Reading
from services.files import iso
from services.monitor.rounds import Round, RoundLog, label
from services.monitor.sampler import Sampler
from services.monitor.summary import summarize, verdict
from services.net import free_port

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
T0 = 1_800_000_000.0  # recorded samples start here (seconds since the epoch)

# --- containers ----------------------------------------------------------------------------------

CID = "3f4e5d6c7b8a" + "0" * 52


@pytest.mark.parametrize(
    "cgroup, expected",
    [
        (f"12:memory:/docker/{CID}\n11:cpu:/docker/{CID}\n", CID),  # cgroup v1
        (f"0::/system.slice/docker-{CID}.scope\n", CID),  # v2, systemd driver
        (f"0::/../{CID}\n", CID),  # v2 seen from another container's cgroup namespace
        (f"0::/kubepods/besteffort/pod1/cri-containerd-{CID}.scope\n", CID),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),  # a process on the host
        ("0::/\n", None),
    ],
)
def test_container_id_from_cgroup(cgroup, expected):
    assert container_id_from_cgroup(cgroup) == expected


API = "http://docker-names:2375"


class FakeInspect:
    """What the inspect-only proxy answers: GET /containers/<id>/json, for known ids only."""

    def __init__(self, attrs):
        self.calls = 0
        self._attrs = attrs

    def __call__(self, api, container_id):
        self.calls += 1
        if container_id not in self._attrs:
            raise urllib.error.HTTPError(f"{api}/containers/{container_id}/json", 404, "No such container", {}, None)
        return self._attrs[container_id]


def test_without_a_docker_api_containers_are_named_by_hostname_and_docker_is_never_asked():
    names = ContainerNames(None, inspect=lambda api, cid: pytest.fail("must not ask Docker"))
    first = names.lookup(CID, lambda: "f00dcafe1234")
    assert (first.replica, first.hostname, first.named) == ("f00dcafe1234", "f00dcafe1234", False)
    assert names.lookup(CID, lambda: pytest.fail("read once per container")) is first
    assert names.lookup("b" * 64, lambda: None).replica == "b" * 12  # hostname unreadable: short id


def test_the_docker_api_gives_compose_names_once_per_container():
    inspect = FakeInspect({CID: {"Name": "/bouquet_client_3", "Config": {"Hostname": CID[:12], "Labels": {"com.docker.compose.service": "client", "com.docker.compose.container-number": "3"}}}})
    names = ContainerNames(API, inspect=inspect)
    first = names.lookup(CID, lambda: CID[:12])
    assert (first.replica, first.hostname, first.name) == ("client-3", CID[:12], "bouquet_client_3")
    assert names.lookup(CID, lambda: CID[:12]) is first and inspect.calls == 1
    assert names.lookup("a" * 64, lambda: "a" * 12).replica == "a" * 12  # unknown to Docker: its hostname


def test_an_unreachable_docker_api_is_said_once_and_asked_again_later(caplog):
    """The proxy may start after the monitor: hostnames meanwhile, compose names once it answers."""
    calls, now, up = [], [0.0], [False]
    attrs = {"Name": "/b_client_3", "Config": {"Labels": {"com.docker.compose.service": "client", "com.docker.compose.container-number": "3"}}}

    def inspect(api, container_id):
        calls.append(container_id)
        if not up[0]:
            raise urllib.error.URLError("connection refused")
        return attrs

    names = ContainerNames(API, inspect=inspect, clock=lambda: now[0])
    assert names.lookup(CID, lambda: "h1").replica == "h1"
    assert names.lookup("b" * 64, lambda: "h2").replica == "h2"
    assert names.lookup(CID, lambda: "h1").replica == "h1"
    assert len(calls) == 1  # not asked again before RETRY_S
    up[0], now[0] = True, ContainerNames.RETRY_S
    again = names.lookup(CID, lambda: pytest.fail("the hostname is kept"))
    assert (again.replica, again.hostname) == ("client-3", "h1")
    assert names.lookup(CID, lambda: "h1") is again and len(calls) == 2
    assert sum("does not answer" in r.getMessage() for r in caplog.records) == 1


# --- processes -----------------------------------------------------------------------------------

SPAWN = ("/venv/bin/python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)", "--multiprocessing-fork")
TRACKER = ("/venv/bin/python", "-c", "from multiprocessing.resource_tracker import main;main(4)")
FORKSERVER = ("/venv/bin/python", "-c", "from multiprocessing.forkserver import main; main(8, 9, ['__main__'], **{'sys_path': []})")
CLIENT = ("/venv/bin/python", "-m", "services.client", "--server-address", "127.0.0.1:5000")
SERVER = ("/venv/bin/python", "-m", "services.server", "--rounds", "2")
MONITOR = ("/venv/bin/python", "-m", "services.monitor", "--run-id", "x")


class FakeProbe:
    """A recorded process table: pid -> (ppid, started, cmdline, identity from env, container id)."""

    def __init__(self, table):
        self.table = dict(table)
        self.details_calls = 0
        self.volumes = {}  # pid -> whether it sees the run volume

    def listing(self):
        return {pid: (entry[0], entry[1]) for pid, entry in self.table.items()}

    def details(self, pid):
        self.details_calls += 1
        entry = self.table.get(pid)
        return (entry[2], entry[3]) if entry else ((), None)

    def container_id(self, pid):
        entry = self.table.get(pid)
        return entry[4] if entry else None

    def hostname(self, pid):
        """A container's hostname is its short id, as Docker sets it for a scaled replica."""
        container = self.container_id(pid)
        return container[:12] if container else None

    def sees(self, pid, folder):
        return self.volumes.get(pid, False)


def recorded_host():
    return {
        1: (0, T0 - 1000, ("/sbin/init",), None, None),
        100: (1, T0 - 60, ("/venv/bin/python", "scripts/run_local.py", "--monitor"), None, None),
        101: (100, T0 - 59, SERVER, None, None),
        102: (100, T0 - 58, CLIENT, "client-0", None),
        103: (100, T0 - 58, CLIENT, "client-1", None),
        104: (100, T0 - 58, MONITOR, None, None),
        110: (102, T0 - 30, TRACKER, None, None),
        111: (102, T0 - 30, SPAWN, None, None),
        112: (101, T0 - 20, SPAWN, None, None),
        120: (103, T0 - 30, FORKSERVER, None, None),
        121: (120, T0 - 29, FORKSERVER, None, None),  # forked by the forkserver: a worker
        130: (102, T0 - 10, ("/sbin/ldconfig", "-p"), None, None),
        199: (1, T0 - 70, ("bash",), None, None),
        200: (199, T0 - 69, CLIENT, "other-run", None),  # another federation on the same machine
        201: (200, T0 - 30, SPAWN, None, None),
        300: (1, T0 - 50, ("python", "train.py"), None, None),
    }


def table(scope, processes, names=None, now=T0):
    return ProcessTable(scope, names or ContainerNames(None), probe=FakeProbe(processes), self_pid=104, root_pid=100, clock=lambda: now)


def test_program_of_recognises_module_and_script_forms():
    assert program_of(CLIENT) == "client"
    assert program_of(("python", "/app/services/server/__main__.py")) == "server"
    assert program_of(SPAWN) is None


@pytest.mark.parametrize(
    "cmdline, program",
    [
        (("python3.11", "-u", "-X", "dev", "-W", "error", "-m", "services.client"), "client"),  # options before -m
        (("/usr/local/bin/python3", "-Im", "services.server"), "server"),  # -m inside a group of flags
        (("python", "-mservices.monitor"), "monitor"),
        (("python", "--check-hash-based-pycs", "never", "-m", "services.client"), "client"),
        (("python", "-B", "services/client/__main__.py", "--rounds", "2"), "client"),  # the script form
        (("python", "--", "/app/services/server/__main__.py"), "server"),
        (("/sbin/docker-init", "--", "bouquet-entrypoint", "python", "-m", "services.client"), None),  # compose init: true
        (("/sbin/tini", "--", "python", "-m", "services.server"), None),
        (("/bin/sh", "/usr/local/bin/bouquet-entrypoint", "python", "-m", "services.server"), None),
        (("sh", "-c", "python -m services.client"), None),
        (("setpriv", "--reuid=1000", "--regid=1000", "--", "python", "-m", "services.server"), None),
        (("sudo", "-u", "bouquet", "python", "-m", "services.client"), None),
        (("python", "train.py", "-m", "services.client"), None),  # an argument of another script
        (("python", "-c", "import runpy", "-m", "services.client"), None),  # an argument of -c code
        (("python", "/app/not_services/client/__main__.py"), None),
        (("pythonista", "-m", "services.client"), None),
        ((), None),
    ],
)
def test_only_the_interpreter_running_the_module_is_the_program(cmdline, program):
    assert program_of(cmdline) == program


def test_roles_and_replicas_from_a_recorded_process_table():
    processes = table("launcher", recorded_host())
    processes.refresh()
    seen = {pid: (processes.describe(pid).role, processes.describe(pid).replica) for pid in recorded_host()}
    assert seen[101] == ("server", "server")
    assert seen[102] == ("client", "client-0") and seen[103] == ("client", "client-1")
    assert seen[111] == ("worker", "client-0")
    assert seen[112] == ("server-worker", "server")
    assert seen[110] == ("helper", "client-0") and seen[120] == ("helper", "client-1") and seen[130] == ("helper", "client-0")
    assert seen[121] == ("worker", "client-1")
    assert seen[104][0] == "monitor" and seen[300] == ("other", "host")
    assert processes.describe(111).identity == "client-0"


POOL = ("/venv/bin/python", "-m", "services.pool")


class FakePoolProbe(FakeProbe):
    """FakeProbe plus the host pool's records: worker pid -> who asked (services.pool.wire.Request)."""

    def __init__(self, table, records):
        super().__init__(table)
        self.records = records

    def pool_record(self, pid, pool):
        return self.records.get(pid)


def test_a_worker_the_host_pool_forked_counts_for_the_replica_that_asked():
    """FL_WORKER_POOL=host: workers are children of the pool, not of their replica; the pool's
    records say whose they are. The pool is a line of its own; a child without a record (a
    worker whose record is not written yet) is the pool's helper."""
    processes = {
        1: (0, T0 - 1000, ("/sbin/init",), None, None),
        100: (1, T0 - 60, ("/venv/bin/python", "scripts/run_local.py"), None, None),
        101: (100, T0 - 59, SERVER, None, None),
        102: (100, T0 - 58, CLIENT, "client-0", None),
        103: (100, T0 - 58, CLIENT, "client-1", None),
        104: (100, T0 - 58, MONITOR, None, None),
        105: (100, T0 - 59, POOL, None, None),
        150: (105, T0 - 20, POOL, None, None),  # forked by the pool for client-1
        151: (105, T0 - 20, POOL, None, None),  # for the server
        152: (150, T0 - 19, ("/venv/bin/python", "-c", "dataloader"), None, None),  # started by 150
        153: (105, T0 - 20, POOL, None, None),  # no record (yet)
    }
    records = {150: {"role": "client", "identity": "client-1"}, 151: {"role": "server", "identity": ""}}
    host = ProcessTable("launcher", ContainerNames(None), probe=FakePoolProbe(processes, records), self_pid=104, root_pid=100, clock=lambda: T0)
    host.refresh()
    seen = {pid: (host.describe(pid).role, host.describe(pid).replica) for pid in processes}
    assert seen[105] == ("pool", "worker-pool")
    assert seen[150] == ("worker", "client-1") and host.describe(150).identity == "client-1"
    assert seen[152] == ("worker", "client-1")
    assert seen[151] == ("server-worker", "server")
    assert seen[153] == ("helper", "worker-pool")
    assert {105, 150, 151, 152, 153} <= set(host.tracked())


def test_launcher_scope_keeps_other_runs_out_and_host_scope_takes_them_in():
    launcher = table("launcher", recorded_host())
    launcher.refresh()
    assert launcher.tracked() == [101, 102, 103, 110, 111, 112, 120, 121, 130]
    host = table("host", recorded_host())
    host.refresh()
    assert {200, 201} <= set(host.tracked()) and 104 not in host.tracked() and 300 not in host.tracked()


def test_a_worker_that_outlives_its_client_stays_attributed():
    processes = recorded_host()
    live = table("launcher", processes)
    live.refresh()
    assert live.describe(111).replica == "client-0"
    del live.probe.table[102]
    live.probe.table[111] = (1, *processes[111][1:])  # reparented to init
    live.refresh()
    assert (live.describe(111).role, live.describe(111).replica) == ("worker", "client-0")
    assert 111 in live.tracked()


def test_a_young_fork_is_a_worker_and_is_looked_at_again_after_exec():
    processes = recorded_host()
    processes[140] = (103, T0 - 0.05, CLIENT, "client-1", None)  # forked, not exec'd yet
    now = [T0]
    live = ProcessTable("launcher", ContainerNames(None), probe=FakeProbe(processes), self_pid=104, root_pid=100, clock=lambda: now[0])
    live.refresh()
    assert (live.describe(140).role, live.describe(140).replica) == ("worker", "client-1")
    live.probe.table[140] = (103, T0 - 0.05, SPAWN, None, None)  # exec'd
    now[0] = T0 + 2
    live.refresh()
    assert (live.describe(140).role, live.describe(140).replica) == ("worker", "client-1")
    calls = live.probe.details_calls
    live.refresh()
    live.describe(140)
    assert live.probe.details_calls == calls  # settled: not read again


def test_containers_name_replicas_by_compose_service_and_keep_the_hostname_as_identity():
    server_id, client_id = "c" * 64, CID
    docker = FakeInspect(
        {
            client_id: {"Name": "/b_client_3", "Config": {"Hostname": client_id[:12], "Labels": {"com.docker.compose.service": "client", "com.docker.compose.container-number": "3"}}},
            server_id: {"Name": "/b_server_1", "Config": {"Hostname": "server", "Labels": {"com.docker.compose.service": "server", "com.docker.compose.container-number": "1"}}},
        }
    )
    processes = {
        1: (0, T0 - 999, ("/sbin/init",), None, None),
        500: (1, T0 - 60, SERVER, None, server_id),
        501: (500, T0 - 10, SPAWN, None, server_id),
        600: (1, T0 - 60, CLIENT, None, client_id),
        601: (600, T0 - 10, SPAWN, None, client_id),
    }
    host = table("host", processes, names=ContainerNames(API, inspect=docker))
    host.refresh()
    worker = host.describe(601)
    assert (worker.role, worker.replica, worker.identity, worker.container) == ("worker", "client-3", client_id[:12], client_id[:12])
    assert (host.describe(501).role, host.describe(501).replica) == ("server-worker", "server-1")


def test_with_a_run_volume_only_processes_that_see_it_are_the_runs():
    """pid: host shows every process of the host; another project's (or a local run's), which
    mount another data volume, stay out. No Docker API is needed to tell them apart."""
    mine, theirs, monitor_id = "a" * 64, "b" * 64, "m" * 64
    processes = {
        1: (0, T0 - 999, ("/sbin/init",), None, None),
        104: (1, T0 - 60, MONITOR, None, monitor_id),
        600: (1, T0 - 60, CLIENT, None, mine),
        601: (600, T0 - 10, SPAWN, None, mine),
        700: (1, T0 - 60, CLIENT, None, theirs),
        701: (700, T0 - 10, SPAWN, None, theirs),
        800: (1, T0 - 60, CLIENT, "client-0", None),  # a local run on the host
    }
    host = ProcessTable("host", ContainerNames(None), probe=FakeProbe(processes), self_pid=104, root_pid=100, clock=lambda: T0, run_volume="/data")
    host.probe.volumes = {600: True, 700: False, 800: False}
    host.refresh()
    assert host.tracked() == [600, 601]
    assert host.describe(601).replica == mine[:12]  # named by its hostname


def test_a_run_volume_that_cannot_be_looked_into_is_said_once(caplog):
    processes = {1: (0, T0 - 999, ("/sbin/init",), None, None), 600: (1, T0 - 60, CLIENT, None, "a" * 64), 700: (1, T0 - 60, CLIENT, None, "b" * 64)}
    host = ProcessTable("host", ContainerNames(None), probe=FakeProbe(processes), self_pid=104, root_pid=100, clock=lambda: T0, run_volume="/data")
    host.probe.volumes = {600: None, 700: None}  # no CAP_SYS_PTRACE
    host.refresh()
    assert host.tracked() == []
    assert sum("CAP_SYS_PTRACE" in r.getMessage() for r in caplog.records) == 1


# The process tree of a compose deployment, as /proc shows it with pid: host. Each container
# runs under `init: true`: PID 1 is docker-init, whose command line carries the entrypoint and
# the command; the entrypoint execs (through setpriv for the server) into python, so the
# program is docker-init's child. Under it: the resource tracker, the forkserver (forked
# workers keep its command line) and spawned workers.
VENV_PYTHON = "/opt/venv/bin/python"
C_TRACKER = (VENV_PYTHON, "-B", "-c", "from multiprocessing.resource_tracker import main;main(5)")
C_FORKSERVER = (VENV_PYTHON, "-B", "-c", "from multiprocessing.forkserver import main; main(9, 10, ['services.worker', 'torch'], **{'sys_path': ['/home/bouquet'], 'main_path': None})")
C_SPAWN = (VENV_PYTHON, "-B", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=6, pipe_handle=8)", "--multiprocessing-fork")
COMPOSE = {"server": "5" * 64, "client-1": "6" * 64, "client-2": "7" * 64, "gpu-monitor-1": "8" * 64}


def compose_docker():
    def attrs(replica):
        service, number = replica.rsplit("-", 1) if replica != "server" else ("server", "1")
        labels = {"com.docker.compose.project": "bouquet", "com.docker.compose.service": service, "com.docker.compose.container-number": number}
        return {"Name": f"/bouquet-{service}-{number}", "Config": {"Hostname": COMPOSE[replica][:12], "Labels": labels}}

    return FakeInspect({cid: attrs(replica) for replica, cid in COMPOSE.items()})


def compose_tree(init: bool, workers: tuple[int, ...] = ()):
    """pid -> (ppid, started, cmdline, identity, container id) for server, two clients (one
    forking its workers from the forkserver, one spawning them) and the monitor; ``workers``
    picks which round's workers are alive (1: pids 1004, 2004, 3003; 2: 1005, 2005, 3004)."""
    server, one, two, monitor = COMPOSE["server"], COMPOSE["client-1"], COMPOSE["client-2"], COMPOSE["gpu-monitor-1"]
    shim = ("/usr/bin/containerd-shim-runc-v2", "-namespace", "moby", "-address", "/run/containerd/containerd.sock")
    tree = {
        1: (0, T0 - 9999, ("/sbin/init",), None, None),
        900: (1, T0 - 100, shim, None, None),
        910: (1, T0 - 100, shim, None, None),
        920: (1, T0 - 100, shim, None, None),
        930: (1, T0 - 100, shim, None, None),
        1001: (1000 if init else 900, T0 - 99, ("python", "-m", "services.server"), None, server),
        1002: (1001, T0 - 98, C_TRACKER, None, server),
        1003: (1001, T0 - 98, C_FORKSERVER, None, server),
        2001: (2000 if init else 910, T0 - 99, ("python", "-m", "services.client"), None, one),  # environ unreadable: no identity
        2002: (2001, T0 - 98, C_TRACKER, None, one),
        2003: (2001, T0 - 98, C_FORKSERVER, None, one),
        3001: (3000 if init else 920, T0 - 99, ("python", "-m", "services.client"), None, two),
        3002: (3001, T0 - 50, C_TRACKER, None, two),
        4000: (930, T0 - 99, ("python", "-m", "services.monitor"), None, monitor),
        5000: (1, T0 - 500, ("python", "train.py"), None, None),  # not Bouquet
    }
    if init:
        tree[1000] = (900, T0 - 100, ("/sbin/docker-init", "--", "bouquet-entrypoint", "python", "-m", "services.server"), None, server)
        tree[2000] = (910, T0 - 100, ("/sbin/docker-init", "--", "bouquet-entrypoint", "python", "-m", "services.client"), None, one)
        tree[3000] = (920, T0 - 100, ("/sbin/docker-init", "--", "bouquet-entrypoint", "python", "-m", "services.client"), None, two)
    for number in workers:
        start = T0 + (11 if number == 1 else 21.5)
        tree[1003 + number] = (1003, start + 1, C_FORKSERVER, None, server)  # the server's evaluation, forked
        tree[2003 + number] = (2003, start, C_FORKSERVER, None, one)  # forked: the forkserver's command line
        tree[3002 + number] = (3001, start, C_SPAWN, None, two)
    return tree


COMPOSE_MEMORY_MIB = {1000: 0.7, 2000: 0.7, 3000: 0.7, 1001: 150, 2001: 120, 3001: 118, 1002: 9, 2002: 9, 3002: 9, 1003: 250, 2003: 250}


class TreeReader:
    """Host memory of whatever the table tracks: fixed per pid, workers 300 MiB."""

    source = "host"

    def __init__(self, table):
        self.table = table

    def read(self):
        processes = [ProcessReading(pid, "host", COMPOSE_MEMORY_MIB.get(pid, 300.0)) for pid in self.table.tracked()]
        return Reading([DeviceReading("host", "host memory", sum(p.memory_mib for p in processes), 64000.0)], processes)


def compose_table(tmp_path, now):
    names = ContainerNames(API, inspect=compose_docker())
    return ProcessTable("host", names, probe=FakeProbe({}), self_pid=4000, root_pid=930, clock=lambda: now[0])


@pytest.mark.parametrize("init", [True, False], ids=["init", "no-init"])
def test_compose_process_tree_roles_and_replicas(tmp_path, init):
    now = [T0 + 15]
    live = compose_table(tmp_path, now)
    live.probe.table = compose_tree(init, workers=(1,))
    live.refresh()
    seen = {pid: (live.describe(pid).role, live.describe(pid).replica) for pid in live.probe.table}
    assert seen[1001] == ("server", "server-1")
    assert seen[2001] == ("client", "client-1") and seen[3001] == ("client", "client-2")
    assert seen[2004] == ("worker", "client-1")  # forked by the forkserver
    assert seen[3003] == ("worker", "client-2")  # spawned
    assert seen[1004] == ("server-worker", "server-1")
    assert {seen[pid] for pid in (1002, 1003)} == {("helper", "server-1")}
    assert {seen[pid] for pid in (2002, 2003)} == {("helper", "client-1")} and seen[3002] == ("helper", "client-2")
    assert seen[4000][0] == "monitor" and seen[5000] == ("other", "host")
    if init:  # docker-init is in the container but is none of the run's programs
        assert seen[1000] == ("other", "server-1") and seen[2000] == ("other", "client-1") and seen[3000] == ("other", "client-2")
    assert live.describe(2004).identity == COMPOSE["client-1"][:12]  # the hostname the server knows
    assert live.tracked() == [1001, 1002, 1003, 1004, 2001, 2002, 2003, 2004, 3001, 3002, 3003]


@pytest.mark.parametrize("init", [True, False], ids=["init", "no-init"])
def test_compose_process_tree_memory_returns_after_every_round(tmp_path, init):
    """Samples of the compose tree through the real sampler, CSV and summary: workers come in
    each round and exit before it ends, so nothing is left and nothing is held."""
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": n, "started_at": iso(T0 + a), "ended_at": iso(T0 + b)}) + "\n" for n, a, b in ((1, 10, 20), (2, 20.5, 30)))
    )
    rounds = RoundLog(tmp_path / "metrics.jsonl")
    now = [T0]
    live = compose_table(tmp_path, now)
    out = csvlog.MemoryCsv(tmp_path / "memory.csv")
    sampler = Sampler(TreeReader(live), live, rounds, out.write, interval=0.2, clock=lambda: now[0])
    timeline = [(5, ()), (9, ()), (13, (1,)), (19, (1,)), (20.2, ()), (23, (2,)), (29, (2,)), (30.2, ()), (31, ())]
    for at, workers in timeline:
        now[0] = T0 + at
        live.probe.table = compose_tree(init, workers)
        sampler.sample_once()
    out.close()
    rows = csvlog.read_rows(tmp_path / "memory.csv")
    assert {(r["pid"], r["role"]) for r in rows if r["pid"] in (1000, 2000, 3000, 2001, 3001)} == {(2001, "client"), (3001, "client")}
    summary = summarize(rows, rounds.refresh(), tolerance_mib=64)
    assert [r["workers_left"] for r in summary["rounds"]] == [0, 0]
    assert [r["residual_mib"] for r in summary["rounds"]] == [0.0, 0.0]
    assert [r["residual_per_replica_mib"] for r in summary["rounds"]] == [{"client-1": 0.0, "client-2": 0.0, "server-1": 0.0}] * 2
    assert summary["baseline"]["per_replica_mib"] == {"client-1": 120.0, "client-2": 118.0, "server-1": 150.0}
    assert sorted(summary["replicas"]) == ["client-1", "client-2", "server-1"]
    assert {name: info["workers_seen"] for name, info in summary["replicas"].items()} == {"client-1": 2, "client-2": 2, "server-1": 2}
    assert summary["replicas"]["client-1"]["process_max_mib"] == 120.0  # the client itself, not docker-init
    assert summary["max_workers_alive"]["count"] == 3
    assert summary["verdict"]["ok"] is True, summary["verdict"]["text"]


def test_a_client_whose_environment_is_unreadable_is_still_a_client(monkeypatch):
    """Without CAP_SYS_PTRACE another user's environ is denied; the command line is not."""

    class Denied:
        def cmdline(self):
            return list(CLIENT)

        def environ(self):
            raise psutil.AccessDenied(600)

    monkeypatch.setattr(psutil, "Process", lambda pid: Denied())
    assert ProcProbe().details(600) == (CLIENT, None)


# --- NVML reader (recorded NVML) -------------------------------------------------------------------


class RecordedNvml:
    """Stands in for pynvml with values recorded from a GPU: two devices, one without utilisation."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.shut = False

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return [b"NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3 MIG 1g.10gb"][handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=[1210 * MIB, 300 * MIB][handle], total=[81559 * MIB, 9984 * MIB][handle])

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if handle == 0:
            return [SimpleNamespace(pid=4242, usedGpuMemory=512 * MIB), SimpleNamespace(pid=4243, usedGpuMemory=None)]
        return [SimpleNamespace(pid=4244, usedGpuMemory=100 * MIB), SimpleNamespace(pid=4244, usedGpuMemory=28 * MIB), SimpleNamespace(pid=4245, usedGpuMemory=nvml_module.NOT_AVAILABLE)]

    def nvmlShutdown(self):
        self.shut = True


def test_nvml_reader_turns_a_recorded_nvml_into_readings():
    recorded = RecordedNvml()
    reader = nvml_module.NvmlReader(recorded)
    reading = reader.read()
    assert reader.names == ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3 MIG 1g.10gb"]
    assert reading.devices == [
        DeviceReading("0", "NVIDIA H100 80GB HBM3", 1210.0, 81559.0, 37.0),
        DeviceReading("1", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", 300.0, 9984.0, None),
    ]
    assert sorted(reading.processes, key=lambda p: p.pid) == [
        ProcessReading(4242, "0", 512.0),
        ProcessReading(4243, "0", None),  # the driver withheld it
        ProcessReading(4244, "1", 128.0),  # one pid on two slices of a device: summed
        ProcessReading(4245, "1", None),
    ]
    assert reader.facts() == {"devices": [{"index": "0", "name": "NVIDIA H100 80GB HBM3"}, {"index": "1", "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb"}]}
    reader.close()
    assert recorded.shut


def test_without_a_gpu_open_nvml_says_why(monkeypatch):
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    except Exception:
        pass
    with pytest.raises(nvml_module.NvmlUnavailable, match="NVML"):
        nvml_module.open_nvml()


# --- rounds --------------------------------------------------------------------------------------


def make_round(number, started, ended, **record):
    return Round(number, T0 + started, T0 + ended, {"round": number, **record})


ROUNDS = [make_round(1, 10, 20, accuracy=0.5, loss=1.5, round_seconds=10), make_round(2, 20.01, 30, accuracy=0.7, loss=1.0, round_seconds=10)]


@pytest.mark.parametrize(
    "offset, final, expected",
    [(5, True, (0, "setup")), (15, True, (1, "round")), (20.005, True, (1, "between")), (25, True, (2, "round")), (40, True, (2, "after")), (40, False, (None, ""))],
)
def test_round_labels(offset, final, expected):
    assert label(ROUNDS, T0 + offset, final) == expected


def test_round_labels_before_any_round_is_known():
    assert label([], T0, final=False) == (None, "")
    assert label([], T0, final=True) == (0, "setup")


def test_round_log_reads_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first, second = (json.dumps({"round": n, "started_at": iso(T0), "ended_at": iso(T0 + 3), "accuracy": 0.5}) for n in (1, 2))
    path.write_text(first + "\n" + second[:20])  # the server is halfway through writing round 2
    log = RoundLog(path)
    assert [r.number for r in log.refresh()] == [1]
    with open(path, "a") as out:
        out.write(second[20:] + "\n")
    assert [r.number for r in log.refresh()] == [1, 2]
    assert log.rounds[0].ended - log.rounds[0].started == pytest.approx(3.0, abs=0.002)


# --- summary from recorded samples ---------------------------------------------------------------


class Recording:
    """Builds typed rows as csvlog.read_rows returns them."""

    def __init__(self, source="nvml"):
        self.rows, self.sample, self.source = [], 0, source

    def add(self, at, device_mib, processes=()):
        t = T0 + at
        common = {"t": t, "time": iso(t), "sample": self.sample, "source": self.source}
        self.rows.append({**common, "kind": "device", "device": "0", "memory_mib": device_mib, "role": None, "replica": None, "pid": None, "started_t": None})
        for pid, role, replica, started, memory in processes:
            self.rows.append({**common, "kind": "process", "device": "0", "pid": pid, "role": role, "replica": replica, "started_t": T0 + started, "memory_mib": memory})
        self.sample += 1


def worker_mode_recording():
    """Two clients on one GPU, workers come and go; memory returns to 500 MiB after each round."""
    rec = Recording()
    rec.add(8, 500)
    rec.add(9.9, 1100, [(50, "server-worker", "server", 8.5, 600)])  # initial evaluation ending
    for number, (start, end) in enumerate([(10, 20), (20.01, 30)], start=1):
        w1, w2 = 100 * number, 100 * number + 1
        rec.add(start + 2, 2500, [(w1, "worker", "client-0", start + 0.5, 1000), (w2, "worker", "client-1", start + 0.5, 1000)])
        rec.add(start + 5, 2500, [(w1, "worker", "client-0", start + 0.5, 1000), (w2, "worker", "client-1", start + 0.5, 1000)])
        rec.add(end - 0.5, 1100, [(90 + number, "server-worker", "server", end - 2, 600)])
        # first sample after the round: the next round's worker already started; it is not "held"
        rec.add(end + 0.1, 502 + 40, [(w1 + 50, "worker", "client-0", end + 0.05, 40)])
    return rec


def test_summary_of_a_clean_worker_mode_run():
    summary = summarize(worker_mode_recording().rows, ROUNDS, tolerance_mib=64)
    assert summary["baseline"]["overall_mib"] == 500.0  # the initial evaluation's worker is left out
    assert summary["peak"]["overall_mib"] == 2500.0 and summary["peak"]["round"] == 1
    assert summary["max_workers_alive"]["count"] == 2
    assert [r["residual_mib"] for r in summary["rounds"]] == [2.0, 2.0]
    assert [r["workers_left"] for r in summary["rounds"]] == [0, 0]
    assert summary["rounds"][0]["worker_pids_seen"] == [100, 101]
    assert summary["verdict"]["ok"] is True
    assert summary["verdict"]["text"] == (
        "memory returned to baseline after every round (2 rounds): at most 0 MiB left per replica, 2 MiB in all (tolerance 64 MiB per replica)"
    )


def round_record(number: int, overall: float, per_replica: dict[str, float]) -> dict:
    return {"round": number, "residual_mib": overall, "residual_per_replica_mib": per_replica, "workers_left": 0}


def test_the_tolerance_is_per_replica():
    """20 client replicas whose own heaps settle a few MiB higher after their first round (seen
    in compose: +3.4 MiB each, 68 MiB in all) returned their memory; one replica 89 MiB up did not."""
    settled = {f"client-{i}": 3.4 for i in range(1, 21)}
    assert verdict([round_record(1, 68.0, settled)], 64)["ok"] is True
    one_leak = verdict([round_record(1, 68.0 + 89, {**settled, "client-7": 89.0})], 64)
    assert one_leak["ok"] is False and "client-7 held 89 MiB" in one_leak["text"]
    device_leak = verdict([round_record(1, 64 * 20 + 1, settled)], 64)
    assert device_leak["ok"] is False and "the device held 1281 MiB above baseline (20 replica(s))" in device_leak["text"]


def test_summary_names_the_round_and_replica_that_kept_memory():
    """In-process mode: the client processes themselves hold CUDA memory after each round."""
    rec = Recording()
    rec.add(9, 500)
    held = {1: {"client-0": 600, "client-1": 300}, 2: {"client-0": 620, "client-1": 900}}
    for number, (start, end) in enumerate([(10, 20), (20.01, 30)], start=1):
        rec.add(start + 3, 500 + 1500, [(11, "client", "client-0", -50, 1000), (12, "client", "client-1", -50, 500)])
        after = held[number]
        rec.add(end + 0.1, 500 + sum(after.values()), [(11, "client", "client-0", -50, after["client-0"]), (12, "client", "client-1", -50, after["client-1"])])
    summary = summarize(rec.rows, ROUNDS, tolerance_mib=64)
    assert summary["rounds"][0]["residual_per_replica_mib"] == {"client-0": 600.0, "client-1": 300.0}
    assert summary["rounds"][1]["residual_mib"] == 1520.0
    verdict = summary["verdict"]
    assert verdict["ok"] is False and verdict["first_failed_round"] == 1
    assert verdict["text"].startswith("memory did not return to baseline after round 1: client-0 held 600 MiB above its baseline")
    assert verdict["text"].endswith("; also rounds 2")


def test_a_resumed_run_is_measured_against_the_baseline_of_its_own_stretch():
    """`down` / `up` mid-run: a new server and new replicas (other processes, other memory)
    continue from round 3. Measured against round 1's baseline, every new replica would "hold"
    its whole client process; each stretch has its own baseline, and a real leak after the
    restart is still caught. A replica Docker restarts later is measured from its own start."""
    rec = Recording(source="host")

    def owners(server, a, b, *workers):
        return [(10 if server else 30, "server", "server", 1 if server else 35, 200 if server else 210), *a, *b, *workers]

    old = ((11, "client", "client-a", 2, 100),), ((12, "client", "client-b", 2, 100),)
    new = ((31, "client", "client-c", 36, 150),), ((32, "client", "client-d", 36, 150),)
    rec.add(9, 400, owners(True, *old))
    rec.add(15, 900, owners(True, *old, (13, "worker", "client-a", 10.5, 250), (14, "worker", "client-b", 10.5, 250)))
    rec.add(20.1, 400, owners(True, *old))
    rec.add(39, 510, owners(False, *new))  # the resumed run: new server, new replicas
    rec.add(45, 1010, owners(False, *new, (33, "worker", "client-c", 40.5, 250), (34, "worker", "client-d", 40.5, 250)))
    rec.add(50.05, 510, owners(False, *new))
    restarted = ((31, "client", "client-c", 36, 150),), ((42, "client", "client-d", 52, 170),)  # Docker restarted client-d in round 4
    rec.add(55, 1030, owners(False, *restarted, (35, "worker", "client-c", 50.5, 250)))
    rec.add(60.1, 530, owners(False, *restarted))
    rec.add(61, 530, owners(False, *restarted))
    rec.add(65, 1030, owners(False, *restarted, (36, "worker", "client-c", 62, 250), (43, "worker", "client-d", 62, 250)))
    leaky = ((31, "client", "client-c", 36, 150),), ((42, "client", "client-d", 52, 270),)
    rec.add(70.1, 630, owners(False, *leaky))
    rounds = [make_round(1, 10, 20), make_round(3, 40, 50), make_round(4, 50.01, 60), make_round(5, 62, 70)]

    summary = summarize(rec.rows, rounds, tolerance_mib=64, restarted_at=[3])
    by_round = {r["round"]: r for r in summary["rounds"]}
    assert by_round[1]["residual_per_replica_mib"] == {"client-a": 0.0, "client-b": 0.0, "server": 0.0}
    assert by_round[3]["residual_mib"] == 0.0
    assert by_round[3]["residual_per_replica_mib"] == {"client-c": 0.0, "client-d": 0.0, "server": 0.0}
    assert "client-d" not in by_round[4]["residual_per_replica_mib"]  # restarted during round 4: nothing to compare with
    assert by_round[5]["residual_per_replica_mib"]["client-d"] == 100.0  # measured from before round 5, its first
    assert [s["from_round"] for s in summary["stretches"]] == [1, 3]
    assert summary["verdict"]["ok"] is False and summary["verdict"]["first_failed_round"] == 5
    assert "client-d held 100 MiB" in summary["verdict"]["text"]
    # Without the restart, the device as a whole is measured against round 1's processes.
    assert summarize(rec.rows, rounds, tolerance_mib=64)["rounds"][1]["residual_mib"] == 110.0


def test_a_worker_still_alive_after_its_round_fails_the_verdict():
    rec = Recording()
    rec.add(9, 500)
    rec.add(15, 1500, [(7, "worker", "client-0", 10.5, 1000)])
    rec.add(20.2, 500, [(7, "worker", "client-0", 10.5, 0.0)])  # hung worker holding nothing yet
    summary = summarize(rec.rows, ROUNDS[:1], tolerance_mib=64)
    assert summary["rounds"][0]["workers_left"] == 1
    assert "1 worker(s) of the round were still alive" in summary["verdict"]["text"]


def test_a_worker_still_exiting_as_its_round_ends_is_waited_for_not_counted_as_held():
    """App mode: Flower starts the next round once a reply is in, a moment before that message's
    worker has exited; what the round held is read once the round's workers are gone."""
    rec = Recording()
    rec.add(9, 500)
    rec.add(15, 1500, [(7, "worker", "client-0", 10.5, 1000)])
    rec.add(20.2, 1400, [(7, "worker", "client-0", 10.5, 900)])  # exiting, after the round's end
    rec.add(21.0, 600, [(8, "worker", "client-0", 20.5, 100)])  # gone; round 2's worker left out
    summary = summarize(rec.rows, ROUNDS[:1], tolerance_mib=64)
    assert summary["rounds"][0]["workers_left"] == 0
    assert summary["rounds"][0]["residual_mib"] == 0.0
    assert summary["verdict"]["ok"] is True, summary["verdict"]["text"]


def test_summary_without_rounds_or_samples_judges_nothing():
    assert summarize([], ROUNDS, 64)["verdict"]["ok"] is None
    rec = Recording()
    rec.add(1, 500)
    assert summarize(rec.rows, [], 64)["verdict"]["ok"] is None


def test_helpers_are_left_out_of_baseline_and_residual():
    rec = Recording(source="host")
    rec.add(9, 100, [(1, "client", "client-0", -50, 100)])
    rec.add(20.1, 113, [(1, "client", "client-0", -50, 101), (2, "helper", "client-0", 10.2, 12)])
    summary = summarize(rec.rows, ROUNDS[:1], tolerance_mib=0.5)
    assert summary["rounds"][0]["residual_per_replica_mib"] == {"client-0": 1.0}
    assert summary["rounds"][0]["residual_mib"] == 1.0


# --- host memory (PSS) ---------------------------------------------------------------------------


class Tracked:
    """Stands in for the process table: these pids are the run's, each with a start time."""

    def __init__(self, pids):
        self.pids = list(pids)

    def tracked(self):
        return list(self.pids)

    def describe(self, pid):
        return SimpleNamespace(started=T0 + pid)


class FakeHostProcesses:
    """psutil.Process for recorded processes: PSS and RSS in MiB; reading PSS costs READ_S on
    the reader's clock; pids in ``denied`` refuse smaps_rollup like another user's process."""

    READ_S = 0.02

    def __init__(self, memory, denied=()):
        self.memory = dict(memory)  # pid -> (pss, rss) in MiB
        self.denied = set(denied)
        self.now = 0.0
        self.pss_reads: list[int] = []

    def clock(self):
        return self.now

    def __call__(self, pid):
        def full():
            self.pss_reads.append(pid)
            self.now += self.READ_S
            if pid in self.denied:
                raise psutil.AccessDenied(pid)
            pss, rss = self.memory[pid]
            return SimpleNamespace(pss=pss * MIB, rss=rss * MIB)

        return SimpleNamespace(memory_full_info=full, memory_info=lambda: SimpleNamespace(rss=self.memory[pid][1] * MIB))


def host_reader(pids, memory, denied=()):
    from services.monitor.host import HostReader

    processes = FakeHostProcesses(memory, denied)
    return HostReader(Tracked(pids), interval=0.2, process=processes, clock=processes.clock), processes


def test_host_memory_is_pss_so_pages_shared_with_a_forkserver_count_once():
    # a forkserver (RSS 531, PSS 261) and the worker it forked (RSS 312, PSS 158), as measured
    reader, _ = host_reader([10, 11], {10: (261.0, 531.0), 11: (158.0, 312.0)})
    reading = reader.read()
    assert [(p.pid, p.memory_mib) for p in reading.processes] == [(10, 261.0), (11, 158.0)]
    assert reading.devices[0].used_mib == 419.0 and reading.devices[0].name == "host memory (PSS of the run's processes)"
    facts = reader.facts()
    assert facts["host_memory"]["measure"] == "pss" and facts["host_memory"]["readings"] == {"pss_read": 2, "pss_carried": 0, "rss": 0}
    assert facts["devices"] == [{"index": "host", "name": "host memory (PSS of the run's processes)"}]


def test_host_pss_reads_stay_within_a_budget_and_carry_rss_changes_between_reads():
    """smaps_rollup costs milliseconds per process: new processes are always read, known ones
    once their PSS is a second old and while a quarter of the interval lasts (oldest first);
    the rest move with their RSS."""
    from services.monitor.host import PSS_MAX_AGE_S

    pids = [1, 2, 3, 4, 5]
    reader, fake = host_reader(pids, {pid: (100.0, 200.0) for pid in pids})
    reader.read()
    assert fake.pss_reads == pids  # all new: all read, budget or not
    fake.pss_reads.clear()
    fake.memory[5] = (100.0, 210.0)  # 10 MiB more RSS: allocated privately since its PSS was read
    assert {p.pid: p.memory_mib for p in reader.read().processes}[5] == 110.0
    assert fake.pss_reads == []  # all read less than a second ago
    fake.now += PSS_MAX_AGE_S
    second = {p.pid: p.memory_mib for p in reader.read().processes}
    assert fake.pss_reads == [1, 2, 3]  # 0.05 s budget at 0.02 s a read: three reads
    assert second == {1: 100.0, 2: 100.0, 3: 100.0, 4: 100.0, 5: 110.0}  # 4 and 5 carried forward
    fake.pss_reads.clear()
    reader.read()
    assert fake.pss_reads == [4, 5]  # the stalest first; 1-3 were just read
    assert reader.facts()["host_memory"]["readings"] == {"pss_read": 10, "pss_carried": 10, "rss": 0}


def test_host_memory_falls_back_to_rss_where_pss_is_unreadable_and_says_so():
    reader, fake = host_reader([7, 8], {7: (50.0, 80.0), 8: (60.0, 90.0)}, denied={8})
    first = reader.read()
    reader.read()
    assert {p.pid: p.memory_mib for p in first.processes} == {7: 50.0, 8: 90.0}
    assert fake.pss_reads.count(8) == 1  # not asked again
    assert first.devices[0].name == "host memory (PSS of the run's processes; RSS for 1 whose PSS is unreadable)"
    facts = reader.facts()["host_memory"]
    assert facts["measure"] == "pss+rss" and facts["readings"]["rss"] == 2
    assert "pid 8" in facts["rss_because"] and "CAP_SYS_PTRACE" in facts["rss_because"]
    only_rss, _ = host_reader([8], {8: (60.0, 90.0)}, denied={8})
    only_rss.read()
    assert only_rss.facts()["host_memory"]["measure"] == "rss"


def _hold_until_told(ready, release):
    ready.set()
    release.wait(60)


def test_host_reader_on_this_machine_sums_pss_below_rss_for_a_fork():
    """The real thing: a forked child shares the parent's pages, so its RSS counts them again
    and its PSS does not."""
    import multiprocessing

    from services.monitor.host import HostReader

    ballast = bytearray(os.urandom(64 * MIB))  # resident in the parent, shared with the fork  # noqa: F841
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    child = context.Process(target=_hold_until_told, args=(ready, release), daemon=True)
    child.start()
    try:
        assert ready.wait(60)
        reader = HostReader(Tracked([os.getpid(), child.pid]), interval=0.2)
        reading = reader.read()
        rss = sum(psutil.Process(pid).memory_info().rss for pid in (os.getpid(), child.pid)) / MIB
    finally:
        release.set()
        child.join(60)
    assert reader.facts()["host_memory"]["measure"] == "pss"
    assert len(reading.processes) == 2
    assert reading.devices[0].used_mib < rss - 48  # the 64 MiB ballast counted once, not twice


# --- csv, sampler, exporter ----------------------------------------------------------------------


class RecordedReader:
    source = "nvml"

    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return self.readings.pop(0)

    def close(self):
        pass


def test_sampler_rows_reach_the_disk_before_close_and_relabel_fills_rounds(tmp_path):
    processes = recorded_host()
    live = table("launcher", processes)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "started_at": iso(T0 + 1), "ended_at": iso(T0 + 2)}) + "\n")
    rounds = RoundLog(tmp_path / "metrics.jsonl")
    out = csvlog.MemoryCsv(tmp_path / "memory.csv")
    clock = iter([T0 + 1.5, T0 + 3.0])
    readings = [Reading([DeviceReading("0", "gpu", 900.0, 81559.0, 50.0)], [ProcessReading(111, "0", 400.0)]), Reading([DeviceReading("0", "gpu", 500.0, 81559.0, 0.0)], [])]
    sampler = Sampler(RecordedReader(readings), live, rounds, out.write, interval=0.2, clock=lambda: next(clock))
    sampler.sample_once()
    sampler.sample_once()
    on_disk = csvlog.read_rows(tmp_path / "memory.csv")  # not closed yet
    assert [(r["sample"], r["kind"], r["round"], r["phase"]) for r in on_disk] == [(0, "device", 1, "round"), (0, "process", 1, "round"), (1, "device", None, None)]
    process = on_disk[1]
    assert (process["pid"], process["role"], process["replica"], process["identity"], process["memory_mib"]) == (111, "worker", "client-0", "client-0", 400.0)
    out.close()
    csvlog.relabel(tmp_path / "memory.csv", rounds.refresh())
    assert [(r["round"], r["phase"]) for r in csvlog.read_rows(tmp_path / "memory.csv")][-1] == (1, "after")


def test_a_second_monitor_continues_memory_csv_where_the_first_stopped_and_drops_its_cut_row(tmp_path):
    """A resumed run (or a restarted monitor) goes on in the same file: one header, sample
    numbers and elapsed time continuing, and a row the first monitor's death cut in half gone."""
    path = tmp_path / "memory.csv"
    first = csvlog.MemoryCsv(path)
    assert first.continuation is None
    first.write([{"time": iso(T0 + s), "elapsed_s": float(s), "sample": s, "kind": "device", "device": "host", "memory_mib": 100.0} for s in range(3)])
    first.close()
    with open(path, "a") as crashed:
        crashed.write(iso(T0 + 3) + ",3.000,3,,,dev")  # killed mid-row
    second = csvlog.MemoryCsv(path)
    assert second.continuation == csvlog.Continuation(next_sample=3, first_t=T0)
    live = table("launcher", recorded_host())
    clock = iter([T0 + 10])
    sampler = Sampler(RecordedReader([Reading([DeviceReading("host", "host", 90.0, 1000.0)], [])]), live, RoundLog(tmp_path / "metrics.jsonl"), second.write,
                      interval=0.2, clock=lambda: next(clock), first_sample=3, first_t=T0)
    sampler.sample_once()
    second.close()
    rows = csvlog.read_rows(path)
    assert [(r["sample"], r["elapsed_s"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 10.0)]
    assert path.read_text().count("time,elapsed_s") == 1


def test_prometheus_endpoint_serves_device_and_replica_memory():
    from services.monitor.exporter import Exporter

    port = free_port()
    exporter = Exporter(port, address="127.0.0.1")
    try:
        device = {"kind": "device", "source": "nvml", "device": "0", "memory_mib": 900.0, "total_mib": 81559.0, "utilization_pct": 40.0}
        worker = {"kind": "process", "source": "nvml", "replica": "client-0", "role": "worker", "memory_mib": 400.0}
        exporter.update([device, worker], rounds_finished=1)
        exporter.update([{**device, "memory_mib": 500.0}], rounds_finished=2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        exporter.close()
    assert 'bouquet_device_memory_used_mib{device="0",source="nvml"} 500.0' in text
    assert 'bouquet_replica_memory_mib{replica="client-0",role="worker",source="nvml"} 0.0' in text  # its worker is gone
    assert "bouquet_workers_alive 0.0" in text and "bouquet_rounds_finished 2.0" in text


# --- the program ---------------------------------------------------------------------------------


def monitor(*args, **env):
    return subprocess.Popen(
        [PYTHON, "-m", "services.monitor", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}
    )


@pytest.mark.parametrize(
    "args, named",
    [
        (["--monitor-interval", "0"], "--monitor-interval / FL_MONITOR_INTERVAL = '0'"),
        (["--metrics-port", "70000"], "--metrics-port / FL_METRICS_PORT = '70000'"),
        (["--monitor-source", "gpu"], "--monitor-source / FL_MONITOR_SOURCE = 'gpu'"),
        (["--monitor-scope", "everything"], "--monitor-scope / FL_MONITOR_SCOPE = 'everything'"),
        (["--residual-tolerance-mib", "-1"], "--residual-tolerance-mib / FL_RESIDUAL_TOLERANCE_MIB = '-1'"),
        (["--docker-api", "docker-names:2375"], "--docker-api / FL_DOCKER_API = 'docker-names:2375'"),
        (["--run-volume", " "], "--run-volume / FL_RUN_VOLUME = ' '"),
    ],
)
def test_bad_settings_exit_2_with_one_line(args, named):
    done = subprocess.run([PYTHON, "-m", "services.monitor", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and named in done.stderr


def test_forcing_nvml_without_a_gpu_exits_2(tmp_path):
    try:
        nvml_module.open_nvml().close()
        pytest.skip("this machine has a GPU")
    except nvml_module.NvmlUnavailable:
        pass
    done = subprocess.run([PYTHON, "-m", "services.monitor", "--monitor-source", "nvml", "--results-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--monitor-source / FL_MONITOR_SOURCE = 'nvml'" in done.stderr


def fake_run(folder: Path, rounds=1):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as out:
        for number in range(1, rounds + 1):
            out.write(json.dumps({"round": number, "started_at": iso(time.time() - 1), "ended_at": iso(time.time()), "accuracy": 0.5, "loss": 1.0, "round_seconds": 1.0}) + "\n")


def samples_in(run: Path) -> int:
    """Samples on disk so far (the monitor writes whole samples, flushed, as it goes)."""
    try:
        return len({row["sample"] for row in csvlog.read_rows(run / "memory.csv")})
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def wait_for_samples(run: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while samples_in(run) < count:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"fewer than {count} samples in {timeout:g} s"
        time.sleep(0.05)


def test_monitor_follows_a_new_run_folder_and_stops_when_the_run_ends(tmp_path):
    process = monitor("--results-dir", str(tmp_path), "--monitor-source", "host", "--monitor-interval", "0.05")
    fake_run(tmp_path / "run-a")  # appears after the monitor started: it finds it by itself
    wait_for_samples(tmp_path / "run-a", 5, process)
    (tmp_path / "run-a" / "summary.json").write_text(json.dumps({"status": "completed"}))
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    summary = json.loads((tmp_path / "run-a" / "memory_summary.json").read_text())
    assert summary["source"] == "host" and summary["run_status"] == "completed" and summary["samples"] >= 5
    assert summary["monitor"]["interval_s"] == 0.05 and "report_error" not in summary
    assert "Bouquet run run-a" in (tmp_path / "run-a" / "report.html").read_text()
    assert "stopped (the run ended)" in output


def test_monitor_writes_its_summary_on_sigterm(tmp_path):
    fake_run(tmp_path / "run-b")
    process = monitor("--results-dir", str(tmp_path), "--run-id", "run-b", "--monitor-source", "host", "--monitor-interval", "0.05")
    wait_for_samples(tmp_path / "run-b", 2, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert (tmp_path / "run-b" / "memory_summary.json").is_file()
    rows = csvlog.read_rows(tmp_path / "run-b" / "memory.csv")
    assert rows and all(row["phase"] == "after" for row in rows)  # relabelled: all after round 1


def test_following_picks_the_running_run_not_finished_or_recorded_ones(tmp_path):
    from services.monitor.follow import running_runs

    from services.monitor.follow import recording_lock

    for name in ("done", "recorded", "old", "running"):
        (tmp_path / name).mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    lock = recording_lock(tmp_path / "recorded")  # a live monitor records it
    assert lock.acquire()
    assert not recording_lock(tmp_path / "recorded").acquire()
    os.utime(tmp_path / "old", (time.time() - 3600, time.time() - 3600))  # a crashed run from an hour ago
    (tmp_path / ".hidden.logs").mkdir()
    try:
        assert running_runs(tmp_path, since=time.time() - 60) == [tmp_path / "running"]
    finally:
        lock.release()
    os.utime(tmp_path / "running", (time.time() - 30, time.time() - 30))
    (tmp_path / "recorded" / "memory.csv").write_text("time\n")  # its monitor is gone: a resumed run to follow again
    assert running_runs(tmp_path, since=time.time() - 60) == [tmp_path / "recorded", tmp_path / "running"]


def test_a_new_monitor_follows_a_resumed_run_into_the_same_records(tmp_path):
    """The server was stopped (summary "interrupted"): the monitor keeps recording. Then the
    monitor itself is stopped, and the server resumes the run (its summary removed, as
    RunFolder.reopen does): a monitor started again finds that folder, continues memory.csv and
    summarises both sessions and the server's restart."""
    run = tmp_path / "run-r"
    first = monitor("--results-dir", str(tmp_path), "--monitor-source", "host", "--monitor-interval", "0.05")
    fake_run(run)

    def last_sample() -> int:
        rows = csvlog.read_rows(run / "memory.csv") if (run / "memory.csv").exists() else []
        return max((row["sample"] for row in rows), default=-1)

    deadline = time.monotonic() + 30
    while last_sample() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    interrupted_at = last_sample()
    while last_sample() < interrupted_at + 10:  # 0.5 s of samples after the server stopped
        assert time.monotonic() < deadline and first.poll() is None, "the monitor ended with the server"
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=30)
    assert first.returncode == 0, output
    assert "still recording, for when the run resumes" in output
    samples_before = last_sample()

    (run / "summary.json").unlink()  # the server resumes the run
    (run / "state.json").write_text(json.dumps({"restarts": [{"at": iso(time.time()), "from_round": 2, "previous_status": "interrupted"}]}))
    second = monitor("--results-dir", str(tmp_path), "--monitor-source", "host", "--monitor-interval", "0.05")
    deadline = time.monotonic() + 30
    while last_sample() < samples_before + 3:
        assert time.monotonic() < deadline and second.poll() is None
        time.sleep(0.1)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    output, _ = second.communicate(timeout=30)
    assert second.returncode == 0, output
    assert "continuing the recording of run run-r" in output
    samples = [row["sample"] for row in csvlog.read_rows(run / "memory.csv")]
    assert samples == sorted(samples) and samples_before + 1 in samples
    summary = json.loads((run / "memory_summary.json").read_text())
    sessions = summary["monitor"]["sessions"]
    assert [s["first_sample"] for s in sessions] == [0, samples_before + 1]
    assert summary["run_status"] == "completed" and summary["run_restarts"][0]["from_round"] == 2


def test_monitor_gives_up_when_the_run_folder_never_appears(tmp_path):
    done = subprocess.run(
        [PYTHON, "-m", "services.monitor", "--results-dir", str(tmp_path), "--run-id", "nope", "--monitor-source", "host", "--run-wait", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1 and "did not appear within 0.5 s" in done.stderr


def recorded_run(run: Path) -> Path:
    """A run folder as the server and a monitor leave it (no memory_summary.json yet): two
    clients' workers coming and going over two rounds."""
    run.mkdir()
    out = csvlog.MemoryCsv(run / "memory.csv")
    rec = worker_mode_recording()
    out.write([{key: value for key, value in row.items() if key in csvlog.COLUMNS} | {"started": iso(row["started_t"]) if row["started_t"] else None} for row in rec.rows])
    out.close()
    with open(run / "metrics.jsonl", "w") as metrics:
        for current in ROUNDS:
            metrics.write(json.dumps({**current.record, "started_at": iso(current.started), "ended_at": iso(current.ended), "clients": [{"worker_start_seconds": 1.2}]}) + "\n")
    return run


def test_report_from_recorded_samples(tmp_path):
    from services.monitor.report import write_report

    run = recorded_run(tmp_path / "run-c")
    assert write_report(run, tolerance_mib=64) == run / "report.html"
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "memory returned to baseline after every round" in page
    assert "held after round 2" in page
    assert not list(run.glob(".*partial"))
    strict = write_report(run, tolerance_mib=1, out=tmp_path / "strict.html")  # judged here: no memory_summary.json
    assert "memory did not return to baseline after round 1" in strict.read_text()


@pytest.mark.parametrize("command", [["scripts/report.py"], ["-m", "services.monitor.report"]], ids=["script", "module"])
def test_report_command_line_says_what_is_missing(tmp_path, command):
    (tmp_path / "metrics.jsonl").write_text("")
    done = subprocess.run([PYTHON, *command, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "has no memory.csv" in done.stderr
    run = recorded_run(tmp_path / "run")
    done = subprocess.run([PYTHON, *command, str(run), "--out", str(tmp_path / "page.html")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "page.html"), done.stderr
    assert "held after round 2" in (tmp_path / "page.html").read_text()


def end_of_run(run: Path):
    """What finish() needs of a recording that just stopped: settings, reader, sampler, CSV."""
    from services.monitor.host import HostReader
    from services.settings import MonitorSettings

    settings = MonitorSettings(residual_tolerance_mib=64.0, monitor_scope="launcher", monitor_interval=0.2)
    reader = HostReader(Tracked([]), interval=0.2)
    sampler = SimpleNamespace(samples=9, first_sample=0, busy_s=0.01, max_busy_s=0.002, errors=0)
    csv_out = SimpleNamespace(path=run / "memory.csv", rows_written=20)
    return settings, run, reader, sampler, csv_out


def test_the_monitor_writes_report_html_at_the_end_of_the_run(tmp_path):
    from services.monitor.__main__ import finish

    run = recorded_run(tmp_path / "run-d")
    as_root = os.geteuid() == 0  # as in compose: then the run folder's owner gets the files
    if as_root:
        os.chown(run, 65534, 65534)
    summary = finish(*end_of_run(run))
    page = (run / "report.html").read_text()
    assert summary["verdict"]["text"] in page and page.count("data:image/png;base64,") == 3
    if as_root:
        assert {(run / name).stat().st_uid for name in ("report.html", "memory_summary.json", "memory.csv")} == {65534}
    on_disk = json.loads((run / "memory_summary.json").read_text())
    assert "report_error" not in on_disk and on_disk["host_memory"]["measure"] in ("pss", "rss", "pss+rss")
    assert on_disk["devices"] == [{"index": "host", "name": "host memory (PSS of the run's processes)"}]


def test_a_report_that_cannot_be_drawn_is_recorded_and_loses_nothing(tmp_path, monkeypatch, caplog):
    import services.monitor.report as report_module
    from services.monitor.__main__ import finish

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "write_report", broken)
    run = recorded_run(tmp_path / "run-e")
    summary = finish(*end_of_run(run))
    on_disk = json.loads((run / "memory_summary.json").read_text())
    assert on_disk["report_error"] == summary["report_error"] == "OSError: [Errno 28] No space left on device"
    assert on_disk["verdict"]["ok"] is True and on_disk["rounds"]  # the numbers are all there
    assert not (run / "report.html").exists()
    assert any("could not write" in r.getMessage() and "report.html" in r.getMessage() for r in caplog.records)


def test_gpu_check_puts_the_two_modes_side_by_side():
    from benchmarks import gpu_check
    clean = summarize(worker_mode_recording().rows, ROUNDS, 64)
    rec = Recording()
    rec.add(9, 500)
    rec.add(20.1, 1500, [(11, "client", "client-0", -50, 1000)])
    rec.add(30.1, 1700, [(11, "client", "client-0", -50, 1200)])
    leaky = summarize(rec.rows, ROUNDS, 64)
    results = [
        {"mode": "worker", "clients": 2, "run_id": "a", "exit_code": 0, "memory": clean, "run": {"status": "completed", "final_accuracy": 0.9}},
        {"mode": "inprocess", "clients": 2, "run_id": "b", "exit_code": 0, "memory": leaky, "run": {"status": "completed", "final_accuracy": 0.9}},
    ]
    lines = gpu_check.table(results, rounds=2)
    assert lines[0] == "| | worker ×2 | inprocess ×2 |"
    assert "| held after round 2 (MiB) | 2 | 1200 |" in lines
    assert lines[-1] == "| verdict | ok | not ok |"
    options, extra = gpu_check.parse(["--clients", "2,4", "--", "--seed", "1"])
    assert (options.clients, extra) == ([2, 4], ["--seed", "1"])


def test_gpu_check_without_a_gpu_says_so():
    try:
        nvml_module.open_nvml().close()
        pytest.skip("this machine has a GPU")
    except nvml_module.NvmlUnavailable:
        pass
    done = subprocess.run([PYTHON, "scripts/gpu_check.py", "--clients", "1", "--rounds", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no usable GPU here" in done.stderr


# --- a real local run ----------------------------------------------------------------------------

CLIENT_RSS_BOUND_MIB = 400  # a client never imports torch (~790 MB with it); flwr + grpc + numpy is ~70-130
CLIENT_RSS_DRIFT_MIB = 64


@pytest.mark.integration
def test_local_run_with_monitor_shows_workers_coming_and_going(tmp_path):
    # Spawned workers live over a second, so sampling every 0.2 s sees each one; a forkserver
    # worker on digits can come and go within one interval (attribution of forked workers is
    # covered with a recorded process table above).
    done = subprocess.run(
        [PYTHON, "scripts/run_local.py", "--clients", "3", "--rounds", "2", "--dataset", "digits", "--local-epochs", "1",
         "--worker-start", "spawn", "--results-dir", str(tmp_path), "--run-id", "it", "--monitor"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "it"
    rounds = RoundLog(run / "metrics.jsonl").refresh()
    rows = csvlog.read_rows(run / "memory.csv")
    summary = json.loads((run / "memory_summary.json").read_text())
    assert len(rounds) == 2 and summary["source"] in ("host", "nvml")
    processes = [r for r in rows if r["kind"] == "process"]
    for index, current in enumerate(rounds):
        following = rounds[index + 1].started if index + 1 < len(rounds) else None
        for client in current.record["clients"]:
            seen = [r for r in processes if r["pid"] == client["worker_pid"]]
            assert seen, f"round {current.number}: worker {client['worker_pid']} of {client['id']} never sampled"
            assert {(r["role"], r["replica"]) for r in seen} == {("worker", client["id"])}
            # a sample's time is when it began; its listing follows within milliseconds
            assert all(current.started - 0.1 <= r["t"] <= current.ended for r in seen), "a worker was sampled outside its round"
            if following is not None:
                assert max(r["t"] for r in seen) < following
            assert client["worker_pid"] != client["client_pid"]
    clients = [r for r in processes if r["role"] == "client" and r["t"] >= rounds[0].started]
    assert {r["replica"] for r in clients} == {"client-0", "client-1", "client-2"}
    for name in ("client-0", "client-1", "client-2"):
        rss = [r["memory_mib"] for r in clients if r["replica"] == name]
        if summary["source"] == "host":
            assert max(rss) < CLIENT_RSS_BOUND_MIB and max(rss) - min(rss) < CLIENT_RSS_DRIFT_MIB, (name, min(rss), max(rss))
    assert [r["workers_left"] for r in summary["rounds"]] == [0, 0]
    assert summary["max_workers_alive"]["count"] >= 2
    assert summary["verdict"]["ok"] is True, summary["verdict"]
    assert "report_error" not in summary and summary.get("host_memory", {"measure": "pss"})["measure"] == "pss"
    page = (run / "report.html").read_text()  # written by the monitor: no second step
    # memory, accuracy and loss, round time, and the workers holding a slot per device
    assert page.count("data:image/png;base64,") == 4 and "Workers per device" in page and summary["verdict"]["text"] in page

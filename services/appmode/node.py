"""``python -m services.appmode.node``: one client replica in app mode (a SuperNode, its SuperExec and its workers).

Every replica runs the same command. The agent announces itself on the shared data folder
(``services.roster``, as task mode's client does) the moment it starts, waits for the link to
settle the federation and name its partition (``assignment``), greets the host's worker pool
(or starts a warm forkserver of its own with FL_WORKER_POOL=replica: torch and flwr's ClientApp
runtime imported, CUDA never touched), serves launch requests on a Unix socket, and then runs
``flower-supernode --isolation process`` with the node config ``partition-id=i num-partitions=n``
and Flower's own ``flower-superexec`` as its children, sharing a secret of their own, with a
PATH whose first entry holds Bouquet's ``flwr-clientapp``. Both die with the agent
(parent-death signal); the agent exits with the SuperNode's code (failure if SuperExec ends
first) and passes SIGTERM / SIGINT on. Never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from services import lifetime, logs, roster, tls, worker
from services import settings as settings_module
from services.appmode import assignment, flower, node_keys, records, shim
from services.appmode.launches import Launches, NodePlace
from services.net import free_port
from services.client.identity import identity as node_identity
from services.pool import wire
from services.pool.use import PoolProblem, check_setting as check_pool_setting, start_workers
from services.settings import NodeSettings

log = logging.getLogger("bouquet.node")

WAIT_REPORT_S = 30.0
STOP_PATIENCE_S = 10.0
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}  # seconds between SuperExec's asks for a task (Flower's default 1.0 s is most of a short message)


def validate(values: NodeSettings) -> NodeSettings:
    if values.tls_dir is not None:
        tls.client_ca(values.tls_dir)
    if values.worker_start == "inprocess":
        raise settings_module.SettingError(
            "--worker-start / FL_WORKER_START = 'inprocess': app mode runs every ClientApp message in a fresh worker (forkserver or spawn)"
        )
    return check_pool_setting(values)


def wait_for_partition(data_dir: str, identity: str, patience: float) -> NodePlace:
    """Block until the link's assignment names this identity. Exits 1 when no assignment appears
    within ``patience`` seconds (no server); a replica turned away waits, idle, as in task mode."""
    started = last_report = time.monotonic()
    told_idle = False
    while True:
        current = assignment.read(data_dir)
        if current is not None and identity in current.partitions:
            return NodePlace(identity, current.partitions[identity], current.num_partitions)
        now = time.monotonic()
        if current is None and now - started > patience:
            log.error("no partition assignment from the server in %s within %g s (FL_CONNECT_TIMEOUT); is the server running in app mode?", assignment.path(data_dir), patience)
            raise SystemExit(1)
        if current is not None and identity in current.turned_away and not told_idle:
            told_idle = True
            log.warning("this replica (%s) started after the federation was settled on %d; it stays idle", identity, current.num_partitions)
        if now - last_report >= WAIT_REPORT_S:
            last_report = now
            log.info("waiting for the server to settle the federation and assign %s a partition", identity)
        time.sleep(0.5)


class _LaunchHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        code = self.server.launches.serve([str(item) for item in request["argv"]])  # type: ignore[attr-defined]
        self.wfile.write(json.dumps({"exit_code": code}).encode() + b"\n")


class _LaunchServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, launches: Launches) -> None:
        self.launches = launches
        super().__init__(path, _LaunchHandler)


def supernode_command(settings: NodeSettings, place: NodePlace, runtime: str, secret_file: Path, auth: list[str]) -> list[str]:
    """The SuperNode in process isolation: it launches nothing itself; its runtime API (at
    ``runtime``) hands tasks only to a SuperExec holding the node's secret."""
    security = ["--root-certificates", str(Path(settings.tls_dir) / "ca.crt")] if settings.tls_dir else ["--insecure"]
    host, _, port = runtime.rpartition(":")
    return [
        flower.program("flower-supernode"), *security, "--superlink", settings.server_address,
        "--isolation", "process", "--superexec-auth-secret-file", str(secret_file), "--host", host, "--port", port,
        "--node-config", f"partition-id={place.partition} num-partitions={place.num_partitions}", *auth,
    ]


def superexec_command(runtime: str, secret_file: Path) -> list[str]:
    """Flower's own SuperExec for this node: it takes the node's tasks (with the secret) and
    starts ``flwr-clientapp`` for each by bare name, so Bouquet's launcher (first on its PATH)."""
    return [flower.program("flower-superexec"), "--runtime-api-address", runtime, "--insecure", "--superexec-auth-secret-file", str(secret_file), "--parent-pid", str(os.getpid())]


def runtime_address(pool: wire.Facts | None) -> str:
    """Where this node's runtime API listens: loopback when its workers run on this host's network
    (its own warm process, or a pool beside it); else this replica's own address, which the pool's
    workers reach (and only holders of a task's token or the node's secret may use)."""
    host = "127.0.0.1" if pool is None or pool.hostname == socket.gethostname() else socket.gethostbyname(socket.gethostname())
    return f"{host}:{free_port(host)}"


def write_secret(folder: Path) -> Path:
    """The SuperExec secret: random, in this node's private folder, readable by this user only."""
    path = folder / "superexec.secret"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(secrets.token_hex(32).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    settings = settings_module.parse(NodeSettings, argv, program="services.appmode.node", description=__doc__, validate=validate)
    logs.setup()
    identity = node_identity(settings.client_id, settings.identity_source)
    announcement = roster.announce(settings.data_dir, identity)  # first, before any slow step
    try:
        return run(settings, identity)
    finally:
        if announcement is not None:
            announcement.close()


def run(settings: NodeSettings, identity: str) -> int:
    place = wait_for_partition(settings.data_dir, identity, settings.connect_timeout)
    log.info("node %s holds partition %d of %d", identity, place.partition, place.num_partitions)
    # FLWR_HOME (the apps this SuperNode installs and runs): private to this container (0700), not
    # in the data volume every replica can write to, where another replica could change the code.
    home = Path(tempfile.mkdtemp(prefix="bouquet-flwr-home-"))
    # The forkserver and its workers keep the environment they start with (flwr reads some of it
    # at import): offline and this node's FLWR_HOME, as the SuperNode has.
    os.environ.update({**flower.OFFLINE, "FLWR_HOME": str(home)})
    try:
        pool = start_workers(settings, "client", identity, extra_preload=flower.CLIENTAPP_PRELOAD)
    except PoolProblem as problem:
        log.error("%s", problem)
        return problem.exit_code
    if pool is None:
        log.info("warm process ready (forkserver pid %s)", worker.forkserver_pid())
    log_file = records.MessageLog(records.node_file(settings.data_dir, identity))
    launches = Launches(settings, place, log_file, flower.environment(home))
    shim_dir = launches.scratch / "bin"
    flower.install_program(shim_dir, "flwr-clientapp", shim.__file__)
    env = flower.environment(home, shim_dir=shim_dir, extra=SUPEREXEC_POLL)
    socket_path = str(launches.scratch / "launch.sock")
    server = _LaunchServer(socket_path, launches)
    threading.Thread(target=server.serve_forever, name="bouquet-launches", daemon=True).start()
    env = {**env, "BOUQUET_NODE_SOCKET": socket_path, "BOUQUET_PYTHON": sys.executable}
    runtime = runtime_address(pool)
    secret = write_secret(launches.scratch)
    supernode = lifetime.start(supernode_command(settings, place, runtime, secret, node_keys.supernode_arguments(settings.tls_dir, settings.data_dir, identity, home, settings.connect_timeout)), env=env)  # SIGTERM when this process dies, however it dies
    superexec = lifetime.start(superexec_command(runtime, secret), env=env)
    log.info("flower-supernode (pid %d, runtime API %s) and flower-superexec (pid %d) started for %s", supernode.pid, runtime, superexec.pid, settings.server_address)

    stopping = []

    def relay(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for process in (supernode, superexec):
            lifetime.send(process, signum)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    first = _first_to_end(supernode, superexec)
    code = first.returncode
    if first is superexec and not stopping:
        log.error("flower-superexec exited with code %d: this node can run no more messages; stopping its SuperNode", code)
        code = 1  # a node without its SuperExec has failed, however SuperExec ended (compose restarts the replica)
    lifetime.stop_all((supernode, superexec), STOP_PATIENCE_S)  # the other one: SIGTERM, SIGKILL after STOP_PATIENCE_S
    server.shutdown()
    server.server_close()
    shutil.rmtree(launches.scratch, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    log.info("flower-supernode exited with code %d", supernode.returncode)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


def _first_to_end(*processes: subprocess.Popen) -> subprocess.Popen:
    """The first of these children to exit (the others still run)."""
    handles = {os.pidfd_open(process.pid): process for process in processes}
    try:
        while True:
            try:
                ready, _, _ = select.select(list(handles), [], [])
            except InterruptedError:
                continue
            for handle in ready:
                handles[handle].wait()
                return handles[handle]
    finally:
        for handle in handles:
            os.close(handle)


if __name__ == "__main__":
    sys.exit(main())

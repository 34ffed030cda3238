"""``python -m services.appmode.node``: one client replica in app mode (a SuperNode and its warm process).

Every replica runs the same command. The agent announces itself on the shared data folder
(``services.roster``, as task mode's client does) the moment it starts, waits for the link to
settle the federation and name its partition (``assignment``), starts its warm forkserver
(torch and flwr's ClientApp runtime imported, CUDA never touched), serves launch requests on a
Unix socket, and then runs ``flower-supernode`` as its child with the node config
``partition-id=i num-partitions=n`` and a PATH whose first entry holds Bouquet's
``flwr-clientapp``. The SuperNode dies with the agent (parent-death signal); the agent exits
with the SuperNode's code and passes SIGTERM / SIGINT on. Never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from services import logs, roster, tls, worker
from services import settings as settings_module
from services.appmode import assignment, flower, node_keys, records, shim
from services.appmode.launches import Launches, NodePlace
from services.lifetime import die_with_parent
from services.net import free_port
from services.client.identity import identity as node_identity
from services.settings import NodeSettings

log = logging.getLogger("bouquet.node")

PRELOAD = ["services.appmode.clientapp"]  # flwr's ClientApp runtime, for the forked workers
WAIT_REPORT_S = 30.0


def validate(values: NodeSettings) -> NodeSettings:
    if values.tls_dir is not None:
        tls.client_ca(values.tls_dir)
    if values.worker_start == "inprocess":
        raise settings_module.SettingError(
            "--worker-start / FL_WORKER_START = 'inprocess': app mode runs every ClientApp message in a fresh worker (forkserver or spawn)"
        )
    return values


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


def supernode_command(settings: NodeSettings, place: NodePlace, runtime_port: int, auth: list[str]) -> list[str]:
    security = ["--root-certificates", str(Path(settings.tls_dir) / "ca.crt")] if settings.tls_dir else ["--insecure"]
    return [
        flower.program("flower-supernode"), *security, "--superlink", settings.server_address,
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--node-config", f"partition-id={place.partition} num-partitions={place.num_partitions}", *auth,
    ]


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
    worker.prestart(settings.worker_start, extra_preload=[*PRELOAD, *(settings.worker_preload or [])])
    log.info("warm process ready (forkserver pid %s)", worker.forkserver_pid())
    log_file = records.MessageLog(records.node_file(settings.data_dir, identity))
    launches = Launches(settings, place, log_file, flower.environment(home))
    shim_dir = launches.scratch / "bin"
    flower.install_program(shim_dir, "flwr-clientapp", shim.__file__)
    env = flower.environment(home, shim_dir=shim_dir)
    socket_path = str(launches.scratch / "launch.sock")
    server = _LaunchServer(socket_path, launches)
    threading.Thread(target=server.serve_forever, name="bouquet-launches", daemon=True).start()
    env = {**env, "BOUQUET_NODE_SOCKET": socket_path, "BOUQUET_PYTHON": sys.executable}
    supernode = subprocess.Popen(supernode_command(settings, place, free_port(), node_keys.supernode_arguments(settings.tls_dir, settings.data_dir, identity, home, settings.connect_timeout)), env=env, preexec_fn=die_with_parent)  # SIGTERM when this process dies, however it dies
    log.info("flower-supernode (pid %d) started for %s", supernode.pid, settings.server_address)

    def relay(signum: int, _frame: object) -> None:
        if supernode.poll() is None:
            supernode.send_signal(signum)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    code = supernode.wait()
    server.shutdown()
    server.server_close()
    shutil.rmtree(launches.scratch, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    log.info("flower-supernode exited with code %d", code)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


if __name__ == "__main__":
    sys.exit(main())

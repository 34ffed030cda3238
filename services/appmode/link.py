"""``python -m services.appmode.link``: the server in app mode (settle the federation, run the SuperLink).

The federation is settled as in task mode (``services.server.membership``): the replicas that
announced themselves on the shared data folder (``services.roster``) are counted until
FL_MIN_CLIENTS are there and none joined or left for FL_JOIN_GRACE seconds; their identities
get partitions 0..n-1 (``services.server.registry``), written atomically to the data folder
(``assignment``), where each node agent reads its node config. A replica that starts later is
turned away (idle), or takes a partition whose holder left. If the link restarts while replicas
it settled still run, their partitions are kept; otherwise it settles anew.

Then ``flower-superlink`` runs as this process's child on FL_LISTEN_ADDRESS (TLS with Bouquet's
certificates when FL_TLS_DIR is set), without installing app dependencies at run time. The
ServerApp runs in the ``flwr-serverapp`` process the SuperLink starts for each run, in that run's
folder (``serverapp_shim``: what it saves lands in ``<run folder>/serverapp/``), with every
ClientApp reply checked (``serverapp``; FL_MAX_UPDATE_NORM clips as in task mode); by default it
sees no GPU (FL_SERVERAPP_GPUS). Never imports torch.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from services import logs, roster, tls
from services import settings as settings_module
from services.appmode import assignment, flower, serverapp_shim
from services.lifetime import die_with_parent
from services.server.membership import Membership
from services.server.registry import PartitionRegistry
from services.settings import LinkSettings

log = logging.getLogger("bouquet.link")

WATCH_S = 1.0  # how often replicas that started after settling are looked for


def validate(values: LinkSettings) -> LinkSettings:
    if values.tls_dir is not None:
        tls.server_files(values.tls_dir)
    return values


def settle(settings: LinkSettings) -> PartitionRegistry:
    """The federation: a surviving assignment whose holders still run, else settled anew."""
    registry = PartitionRegistry()
    saved = assignment.read(settings.data_dir)
    alive = roster.live(settings.data_dir)
    if saved is not None and not set(saved.partitions) & alive:
        saved = None  # none of its holders runs: a new federation
    if saved is None:
        assignment.path(settings.data_dir).unlink(missing_ok=True)
    membership = Membership(
        registry, settings.min_clients, settings.join_grace, settings.join_timeout,
        announced=lambda: roster.live(settings.data_dir),
        saved=None if saved is None else (saved.num_partitions, saved.partitions),
    )
    membership.settle(lambda: roster.live(settings.data_dir))
    for identity in sorted(roster.live(settings.data_dir)):  # partitions in name order; later ones idle
        registry.assign(identity)
    return registry


def publish(settings: LinkSettings, registry: PartitionRegistry, turned_away: set[str]) -> None:
    assignment.write(settings.data_dir, assignment.Assignment(registry.num_partitions or 0, registry.assignments, tuple(sorted(turned_away))))


def watch_newcomers(settings: LinkSettings, registry: PartitionRegistry, stop: threading.Event) -> None:
    """Replicas that start after settling: a free partition if there is one, else idle (recorded)."""
    turned_away: set[str] = set()
    known = set(registry.assignments)
    while not stop.wait(WATCH_S):
        fresh = roster.live(settings.data_dir) - known - turned_away
        for identity in sorted(fresh):
            if registry.assign(identity) is None:
                turned_away.add(identity)
        if fresh:
            known = set(registry.assignments)
            publish(settings, registry, turned_away)


def superlink_command(settings: LinkSettings) -> list[str]:
    host, _, port = settings.listen_address.rpartition(":")
    if settings.tls_dir:
        folder = Path(settings.tls_dir)
        security = ["--ssl-ca-certfile", str(folder / "ca.crt"), "--ssl-certfile", str(folder / "server.crt"), "--ssl-keyfile", str(folder / "server.key")]
    else:
        security = ["--insecure"]
    return [flower.program("flower-superlink"), *security, "--disable-runtime-dependency-installation", "--host", host.strip("[]"), "--port", port]


def main(argv: list[str] | None = None) -> int:
    settings = settings_module.parse(LinkSettings, argv, program="services.appmode.link", description=__doc__, validate=validate)
    logs.setup()
    # FLWR_HOME and the bin/ of Bouquet's flwr-serverapp: private to the server (0700), not in the
    # data volume the replicas can write to, where one could change what the server runs.
    home = Path(tempfile.mkdtemp(prefix="bouquet-superlink-"))
    try:
        return serve(settings, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def serve(settings: LinkSettings, home: Path) -> int:
    """The SuperLink first: compose's health check (and the nodes' connection retries) wait for
    its port; the nodes start their SuperNodes only once they know their partition."""
    hidden = {} if settings.serverapp_gpus else {"CUDA_VISIBLE_DEVICES": ""}
    shim_dir = flower.install_program(home / "bin", "flwr-serverapp", serverapp_shim.__file__).parent
    in_run_folder = {
        serverapp_shim.RESULTS_VARIABLE: str(Path(settings.results_dir).resolve()),
        # -P: the run folder the ServerApp works in is not on its import path
        serverapp_shim.COMMAND_VARIABLE: json.dumps([sys.executable, "-P", "-m", "services.appmode.serverapp"]),
        serverapp_shim.MAX_NORM_VARIABLE: "" if settings.max_update_norm is None else repr(settings.max_update_norm),
    }
    env = flower.environment(home, shim_dir=shim_dir, extra={**hidden, **in_run_folder})
    superlink = subprocess.Popen(superlink_command(settings), env=env, preexec_fn=die_with_parent)  # SIGTERM when this process dies, however it dies
    log.info("flower-superlink (pid %d) on %s%s", superlink.pid, settings.listen_address, "" if settings.serverapp_gpus else "; the ServerApp sees no GPU (FL_SERVERAPP_GPUS)")
    log.warning("app mode: whoever reaches %s may join as a SuperNode and use the Control API (submit or stop runs): open-source Flower 1.42 "
                "has no account authentication for it (FLWR_OIDC_ENABLED is Flower's enterprise plugin), so SuperNode authentication could be "
                "bypassed too; the join token is task mode's. Keep the port inside the compose network or a private one (docs/security.md: \"Who may join\")",
                settings.listen_address)
    settled = threading.Event()

    def relay(signum: int, _frame: object) -> None:
        if superlink.poll() is None:
            superlink.send_signal(signum)
        if not settled.is_set():  # stopped while settling: nothing to wait for
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    registry = settle(settings)
    settled.set()
    publish(settings, registry, set())
    log.info("partitions: %s", ", ".join(f"{identity} -> {partition}" for identity, partition in sorted(registry.assignments.items(), key=lambda item: item[1])))
    stop = threading.Event()
    threading.Thread(target=watch_newcomers, args=(settings, registry, stop), name="bouquet-newcomers", daemon=True).start()
    code = superlink.wait()
    stop.set()
    log.info("flower-superlink exited with code %d", code)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


if __name__ == "__main__":
    sys.exit(main())

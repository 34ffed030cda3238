"""``python -m services.appmode.link``: the server in app mode (settle the federation, run the SuperLink).

The federation is settled as in task mode (``services.server.membership``): the replicas that
announced themselves on the shared data folder (``services.roster``) are counted until
FL_MIN_CLIENTS are there and none joined or left for FL_JOIN_GRACE seconds; their identities
get partitions 0..n-1 (``services.server.registry``), written atomically to the data folder
(``assignment``), where each node agent reads its node config. A replica that starts later is
turned away (idle), or takes a partition whose holder left. If the link restarts while replicas
it settled still run, their partitions are kept; otherwise it settles anew.

Then ``flower-superlink`` runs as this process's child on 127.0.0.1 only (TLS with Bouquet's
certificates when FL_TLS_DIR is set, and then ``--enable-supernode-auth``: ``node_keys``), without
installing app dependencies at run time, behind the ``front`` (nginx): FL_LISTEN_ADDRESS serves
only the SuperNodes' Fleet calls, FL_CONTROL_ADDRESS only Control, for whoever holds the submit
token (FL_SUBMIT_TOKEN_FILE; unset: no Control listener). The
ServerApp runs in the ``flwr-serverapp`` process the SuperLink starts for each run, in that run's
folder (``serverapp_shim``: what it saves lands in ``<run folder>/serverapp/``), with every
ClientApp reply checked (``serverapp``; FL_MAX_UPDATE_NORM clips as in task mode) and no reply
waited for beyond the job's time budget (``absences``); by default it sees no GPU
(FL_SERVERAPP_GPUS). With FL_SERVER_METRICS_PORT the link serves the round gauges (``gauges``).
Never imports torch.
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
from typing import Any, Callable

from services import joining, lifetime, logs, roster, tls
from services import settings as settings_module
from services.appmode import assignment, flower, front, node_keys, serverapp_shim
from services.appmode.gauges import RunFollower
from services.files import JOINS_REFUSED, append_json_line
from services.net import free_port, wait_until_listening
from services.server.membership import Membership
from services.server.registry import PartitionRegistry
from services.settings import LinkSettings
from services.tracking.prometheus import RoundGauges

log = logging.getLogger("bouquet.link")

WATCH_S = 1.0  # how often replicas that started after settling are looked for
SUBMIT_TOKEN_NAMES = "--submit-token-file / FL_SUBMIT_TOKEN_FILE"


def validate(values: LinkSettings) -> LinkSettings:
    if values.tls_dir is not None:
        tls.server_files(values.tls_dir)
    if values.submit_token_file is not None:
        joining.token_in_file(values.submit_token_file, SUBMIT_TOKEN_NAMES)
    if values.control_address == values.listen_address:
        raise settings_module.SettingError(f"--control-address / FL_CONTROL_ADDRESS = {values.control_address!r}: the same as FL_LISTEN_ADDRESS; Control needs a port of its own, never published")
    if front.nginx_program() is None:
        raise settings_module.SettingError(f"FL_MODE = 'app': {front.NOT_INSTALLED}")
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


def superlink_command(settings: LinkSettings, port: int) -> list[str]:
    """On 127.0.0.1 only: the front, the link and the ServerApp reach it there, nobody else."""
    if settings.tls_dir:
        folder = Path(settings.tls_dir)
        security = ["--ssl-ca-certfile", str(folder / "ca.crt"), "--ssl-certfile", str(folder / "server.crt"), "--ssl-keyfile", str(folder / "server.key"),
                    "--enable-supernode-auth"]
    else:
        security = ["--insecure"]  # Flower refuses SuperNode auth without TLS
    return [flower.program("flower-superlink"), *security, "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]


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
    """The SuperLink first, then the front once the SuperLink listens: compose's health check (and
    the nodes' connection retries) wait for the front's port; the nodes start their SuperNodes
    only once they know their partition (and, with TLS, once their key is registered). The
    SuperLink stops when the front dies: nothing could reach it any more."""
    try:  # first: a port in use is a bad setting, and nothing is started
        gauges = RoundGauges(settings.server_metrics_port) if settings.server_metrics_port is not None else None
    except OSError as problem:
        print(f"services.appmode.link: error: --server-metrics-port / FL_SERVER_METRICS_PORT = {settings.server_metrics_port}: {problem}", file=sys.stderr)
        return settings_module.EXIT_BAD_SETTING
    hidden = {} if settings.serverapp_gpus else {"CUDA_VISIBLE_DEVICES": ""}
    shim_dir = flower.install_program(home / "bin", "flwr-serverapp", serverapp_shim.__file__).parent
    in_run_folder = {
        serverapp_shim.RESULTS_VARIABLE: str(Path(settings.results_dir).resolve()),
        # -P: the run folder the ServerApp works in is not on its import path
        serverapp_shim.COMMAND_VARIABLE: json.dumps([sys.executable, "-P", "-m", "services.appmode.serverapp"]),
        serverapp_shim.MAX_NORM_VARIABLE: "" if settings.max_update_norm is None else repr(settings.max_update_norm),
        serverapp_shim.DATA_DIR_VARIABLE: str(Path(settings.data_dir).resolve()),
        serverapp_shim.WORKER_TIMEOUT_VARIABLE: repr(settings.worker_timeout),
    }
    env = flower.environment(home, shim_dir=shim_dir, extra={**hidden, **in_run_folder})
    port = free_port()
    superlink = lifetime.start(superlink_command(settings, port), env=env)  # SIGTERM when this process dies, however it dies
    log.info("flower-superlink (pid %d) on 127.0.0.1:%d%s", superlink.pid, port, "" if settings.serverapp_gpus else "; the ServerApp sees no GPU (FL_SERVERAPP_GPUS)")
    token = joining.token_in_file(settings.submit_token_file, SUBMIT_TOKEN_NAMES) if settings.submit_token_file else None
    plan = front.Plan(settings.listen_address, port, settings.tls_dir, settings.control_address if token else None, token)
    try:
        wait_until_listening(f"127.0.0.1:{port}", superlink, 300, "flower-superlink")  # a loaded host: tens of seconds
        nginx = front.start(plan, home / "front")
        wait_until_listening(_local(settings.listen_address), nginx, 30, "the front (nginx)")
    except RuntimeError as problem:
        log.error("%s", problem)
        lifetime.stop(superlink, grace=None)
        return 1
    log.info("front (nginx, pid %d): SuperNodes' Fleet calls only on %s%s", nginx.pid, settings.listen_address,
             f"; Control on {settings.control_address} for the submit token's holders" if token else "; no Control listener (FL_SUBMIT_TOKEN_FILE unset): runs start only from inside the server")
    if not settings.tls_dir:
        log.warning(node_keys.OFF)
    for stale in node_keys.folder(settings.data_dir).glob("*.registered"):  # registrations of an earlier SuperLink
        stale.unlink(missing_ok=True)
    stop = threading.Event()
    threading.Thread(target=_stop_with_the_front, args=(nginx, superlink, stop), name="bouquet-front", daemon=True).start()
    settled = threading.Event()

    def relay(signum: int, _frame: object) -> None:
        lifetime.send(superlink, signum)
        if not settled.is_set():  # stopped while settling: nothing to wait for
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    registry = settle(settings)
    settled.set()
    publish(settings, registry, set())
    log.info("partitions: %s", ", ".join(f"{identity} -> {partition}" for identity, partition in sorted(registry.assignments.items(), key=lambda item: item[1])))
    threading.Thread(target=watch_newcomers, args=(settings, registry, stop), name="bouquet-newcomers", daemon=True).start()
    threading.Thread(target=front.Refusals(home / "front").watch, args=(stop, 1.0, _noting_refusals(Path(settings.results_dir))), name="bouquet-refusals", daemon=True).start()
    if gauges is not None:
        threading.Thread(target=RunFollower(settings.results_dir, gauges).watch, args=(stop,), name="bouquet-gauges", daemon=True).start()
    if settings.tls_dir:
        def settled_identities() -> set[str]:
            current = assignment.read(settings.data_dir)
            return set() if current is None else set(current.partitions)

        registrar = node_keys.Registrar(settings.data_dir, node_keys.control_client(port, str(Path(settings.tls_dir) / "ca.crt")), settled_identities)
        threading.Thread(target=registrar.watch, args=(stop,), name="bouquet-node-keys", daemon=True).start()
    code = superlink.wait()
    stop.set()
    if gauges is not None:
        gauges.close()
    if code == -signal.SIGTERM and nginx.poll() is not None and nginx.returncode != 0:
        code = 1  # stopped because the front died: a failure, not a requested stop
    lifetime.stop(nginx, grace=None)
    log.info("flower-superlink exited with code %d", code)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


def _noting_refusals(results: Path) -> Callable[[dict[str, Any]], None]:
    """Each refused SuperNode, appended to the results folder's JOINS_REFUSED (submit counts
    those of its run: summary.json joins_refused); a folder that cannot take it is said, never fatal."""
    def note(line: dict[str, Any]) -> None:
        try:
            results.mkdir(parents=True, exist_ok=True)
            append_json_line(results / JOINS_REFUSED, line)
        except OSError as problem:
            log.warning("could not record the refused SuperNode in %s: %s", results / JOINS_REFUSED, problem)
    return note


def _stop_with_the_front(nginx: subprocess.Popen, superlink: subprocess.Popen, stop: threading.Event) -> None:
    code = nginx.wait()
    if not stop.is_set() and superlink.poll() is None:
        log.error("the front (nginx) exited with code %d: no SuperNode and no submission can reach the SuperLink any more; stopping it", code)
        lifetime.send(superlink)


def _local(address: str) -> str:
    """Where this container reaches its own listener at ``address`` (0.0.0.0 / :: mean loopback)."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host.strip("[]") in ("0.0.0.0", "::", "") else address


if __name__ == "__main__":
    sys.exit(main())

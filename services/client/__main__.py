"""``python -m services.client``: wait for the server, then train each round in a fresh worker."""

from __future__ import annotations

import dataclasses
import logging
import sys

from services import joining, logs, roster, tls
from services import settings as settings_module
from services.admission import config as admission_config
from services.client.connect import ServerUnreachable, wait_for_server
from services.client.identity import identity as client_identity
from services.pool.use import PoolProblem, check_setting as check_pool_setting, start_workers
from services.settings import ClientSettings
from services.taskspec import Placement

log = logging.getLogger("bouquet.client")


def main(argv: list[str] | None = None) -> int:
    if settings_module.peek(ClientSettings, "mode", argv, program="services.client") == "app":  # FL_MODE=app: the same replica runs a node
        from services.appmode import node

        return node.main(argv)
    settings = settings_module.parse(ClientSettings, argv, program="services.client", description=__doc__, validate=validate)
    logs.setup()
    identity = client_identity(settings.client_id, settings.identity_source)
    # First, before any slow import: the server settles the federation's size on the replicas
    # that announced themselves (services.roster).
    announcement = roster.announce(settings.data_dir, identity)
    try:
        return serve(settings, identity)
    finally:
        if announcement is not None:
            announcement.close()


def validate(values: ClientSettings) -> ClientSettings:
    if values.tls_dir is not None:
        tls.client_ca(values.tls_dir)
    check_pool_setting(values)
    return dataclasses.replace(values, join_token=joining.token_of(values.join_token, values.join_token_file))


def serve(settings: ClientSettings, identity: str) -> int:
    """Serve rounds until the server says the run is over. A lost server is waited for again
    (FL_CONNECT_TIMEOUT, with backoff): a restarted server resumes the run, and this client
    rejoins under the same identity, so with the same partition."""
    from services.client import flower  # imported late: validation comes first

    client = flower.WorkerClient(identity, Placement.from_settings(settings), settings.worker_start, admission=admission_config.worker_admission(settings), join_token=settings.join_token, host=settings.host_name)
    ca = tls.client_ca(settings.tls_dir) if settings.tls_dir else None
    prestarted = False
    while True:
        try:
            wait_for_server(settings.server_address, settings.connect_timeout)
        except ServerUnreachable as problem:
            log.error("%s", problem)
            return 1
        mismatch = tls.mismatch(settings.server_address, ca)
        if mismatch is not None:  # gRPC would retry this until the timeout and then say UNAVAILABLE
            log.error("%s", mismatch)
            return 1
        if not prestarted:  # the host's worker pool (waited for, checked), or this replica's own forkserver
            try:
                start_workers(settings, "client", identity)
            except PoolProblem as problem:
                log.error("%s", problem)
                return problem.exit_code
            prestarted = True
        log.info("client %s connecting to %s (%s, workers: %s)", identity, settings.server_address, "TLS" if ca else "plaintext", settings.worker_start)
        try:
            flower.run(settings.server_address, client, settings.connect_timeout, ca)
        except KeyboardInterrupt:
            return 130
        except Exception as problem:  # the connection broke: the server died or restarts
            if client.refused is not None:
                return refused(identity, client.refused)
            log.warning("client %s lost the server (%s); waiting for it to come back", identity, flower.describe_loss(problem))
            continue
        if client.refused is not None:
            return refused(identity, client.refused)
        log.info("client %s: server ended the run", identity)
        return 0


def refused(identity: str, reason: str) -> int:
    """The server would not let this client join: a setting of this deployment, so exit 2."""
    log.error(
        "client %s: the server refused to let it join: %s; give it the deployment's join token (--join-token / FL_JOIN_TOKEN or --join-token-file / FL_JOIN_TOKEN_FILE)",
        identity, reason,
    )
    return settings_module.EXIT_BAD_SETTING


if __name__ == "__main__":
    sys.exit(main())

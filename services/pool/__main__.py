"""``python -m services.pool``: the host's worker pool. Imports torch and FL_WORKER_PRELOAD once
(never CUDA), listens on FL_WORKER_POOL_SOCKET and forks a fresh worker for every job any
replica or the server of this deployment sends (FL_WORKER_POOL=host)."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from services import logs, worker
from services import settings as settings_module
from services.admission.config import slots_dir
from services.appmode import flower
from services.pool import wire
from services.pool.server import Pool
from services.pool.use import check_setting, socket_path
from services.settings import PoolSettings

log = logging.getLogger("bouquet.pool")


def main(argv: list[str] | None = None) -> int:
    settings = settings_module.parse(PoolSettings, argv, program="services.pool", description=__doc__, validate=check_setting)
    logs.setup()
    # App mode: the ClientApp workers install and run the Apps in a FLWR_HOME of the pool's own
    # (0700), not in a volume the replicas can write to; flwr reads these at import. Removed at exit.
    home = tempfile.mkdtemp(prefix="bouquet-pool-flwr-home-") if settings.mode == "app" else None
    if home is not None:
        os.environ.update({**flower.OFFLINE, "FLWR_HOME": home})
    try:
        return serve(settings)
    finally:
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)


def serve(settings: PoolSettings) -> int:
    """Import the preloads, claim the socket, fork workers until the pool's end."""
    path = socket_path(settings)
    started = time.monotonic()
    mode_preload = flower.CLIENTAPP_PRELOAD if settings.mode == "app" else []
    preload = list(dict.fromkeys([*worker.FORKSERVER_PRELOAD, *mode_preload, *(settings.worker_preload or [])]))
    for name in preload:  # what multiprocessing's forkserver would import: torch, never CUDA
        importlib.import_module(name)
    pool = Pool(path, slots_dir(settings), preload, until_askers_leave=settings.worker_pool_lifetime == "askers")
    try:
        listener = pool.bind()
    except (wire.PoolUnusable, OSError) as problem:
        log.error("--worker-pool-socket / FL_WORKER_POOL_SOCKET: %s", problem)
        return settings_module.EXIT_BAD_SETTING
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info("worker pool %s ready at %s in %.1f s (pid %d, preloaded %s; slots in %s)",
             pool.pool_id[:8], path, time.monotonic() - started, pool.pid, ", ".join(preload), pool.slots_dir)
    try:
        pool.serve(listener)
    except (KeyboardInterrupt, SystemExit):
        log.info("worker pool stopping: its running workers end with it")
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

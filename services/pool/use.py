"""How a replica or the server gets its workers started fast: from the host's worker pool
(FL_WORKER_POOL=host, checked once here) or from a warm process of its own."""

from __future__ import annotations

import logging

from services import worker
from services.admission.config import slots_dir
from services.pool import wire
from services.settings import EXIT_BAD_SETTING

log = logging.getLogger("bouquet.pool")


class PoolProblem(RuntimeError):
    """The pool cannot serve this process; ``exit_code`` is what the program should exit with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def socket_path(settings) -> str:
    """FL_WORKER_POOL_SOCKET, or its place in the slots folder: one rule for the pool and its askers."""
    return settings.worker_pool_socket or wire.default_socket(slots_dir(settings))


def uses_pool(settings) -> bool:
    """Forkserver workers with FL_WORKER_POOL=host (the pool program itself has no
    FL_WORKER_POOL: it is the pool)."""
    return getattr(settings, "worker_pool", "host") == "host" and getattr(settings, "worker_start", "forkserver") == "forkserver"


def start_workers(settings, role: str, identity: str = "", extra_preload: list[str] | None = None) -> wire.Facts | None:
    """Before round 1: point this process at the host pool (waiting for it, bounded; its facts
    come back), or start its own forkserver (it imports torch now, not in round 1; None comes
    back). Raises PoolProblem."""
    preload = [*(extra_preload or []), *(settings.worker_preload or [])]
    if not uses_pool(settings):
        worker.prestart(settings.worker_start, extra_preload=preload)
        return None
    path = socket_path(settings)
    use = worker.PoolUse(path, role, identity)
    try:
        try:
            facts = worker.use_pool(use, slots_dir(settings), preload, 0)
        except wire.PoolUnreachable:
            log.info("waiting up to %g s (FL_WORKER_POOL_WAIT) for the host worker pool at %s", settings.worker_pool_wait, path)
            facts = worker.use_pool(use, slots_dir(settings), preload, settings.worker_pool_wait)
    except wire.PoolUnusable as problem:
        raise PoolProblem(f"--worker-pool-socket / FL_WORKER_POOL_SOCKET: {problem}", EXIT_BAD_SETTING) from None
    except wire.PoolUnreachable as problem:
        raise PoolProblem(
            f"{problem} after {settings.worker_pool_wait:g} s (FL_WORKER_POOL_WAIT): start the pool "
            "(compose: the worker-pool service; python -m services.pool) or set FL_WORKER_POOL=replica", 1,
        ) from None
    log.info("workers: forked by the host worker pool (pid %d on %s, pool %s)", facts.pid, facts.hostname, facts.pool_id[:8])
    return facts


def check_setting(settings):
    """At parse time (nothing started yet): a socket path that can never work is a bad setting."""
    from services.settings import SettingError

    if not uses_pool(settings):
        return settings
    try:
        wire.check_socket_path(socket_path(settings))
    except wire.PoolUnusable as problem:
        raise SettingError(f"--worker-pool-socket / FL_WORKER_POOL_SOCKET: {problem}") from None
    return settings

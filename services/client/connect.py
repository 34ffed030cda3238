"""Wait for the server's port before starting Flower: with backoff, bounded by a deadline.

Replicas may start before the server listens (or while it restarts). Probing the TCP port
first turns gRPC's "failed to connect to all addresses" into a clear wait, and a deadline
into one clear error instead of a client that retries forever. The address parser and the
probes shared with the launcher and the benchmark live in ``services.net``.
"""

from __future__ import annotations

import logging
import socket
import time

from services.net import split_address

log = logging.getLogger("bouquet.client")


class ServerUnreachable(RuntimeError):
    pass


def wait_for_server(address: str, timeout: float, first_delay: float = 0.25, max_delay: float = 5.0) -> float:
    """Return the seconds waited once ``address`` accepts TCP connections; raise ServerUnreachable after ``timeout``."""
    host, port = split_address(address)
    started = time.monotonic()
    delay, attempts, last_error = first_delay, 0, None
    while True:
        attempts += 1
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                waited = time.monotonic() - started
                if attempts > 1:
                    log.info("server %s reachable after %.1f s (%d attempts)", address, waited, attempts)
                return waited
        except OSError as error:
            last_error = error
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise ServerUnreachable(
                f"server {address} not reachable within {timeout:g} s (FL_CONNECT_TIMEOUT), "
                f"{attempts} attempts; last error: {last_error}"
            )
        if attempts == 1:
            log.info("waiting for server %s (%s)", address, last_error)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)

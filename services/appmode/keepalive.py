"""Keep a launched task's token alive while its worker waits for a slot.

SuperExec's token for a launched ClientApp expires about 30 s after the launch unless the task
sends heartbeats; an expired starting task goes back to pending and is launched again with a
new token (a second worker waiting for a slot, the first one's token now useless). Flower's own
runtime sends heartbeats only once it runs, so while Bouquet's worker waits for its slot the node
sends them for it, with Flower's runtime client, every few seconds. Stopped when the worker ends:
if the worker died after Flower took the message, Flower's own expiry then fails that message.
"""

from __future__ import annotations

import logging
import threading

from services.appmode.launch_args import RuntimeEndpoint

log = logging.getLogger("bouquet.node")

INTERVAL_S = 10.0  # Flower gives a starting task 30 s (HEARTBEAT_DEFAULT_INTERVAL) per heartbeat


class KeepAlive:
    def __init__(self, endpoint: RuntimeEndpoint, interval: float = INTERVAL_S) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="bouquet-keepalive", daemon=True)

    def __enter__(self) -> "KeepAlive":
        if self.endpoint.token:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _beat(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # flwr, never torch
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        endpoint = self.endpoint
        client = RuntimeHttpClient.from_server_address(
            server_address=endpoint.address,
            insecure=endpoint.insecure,
            root_certificates=None if endpoint.insecure else endpoint.root_certificates,
            interceptors=[RuntimeTokenHttpInterceptor(endpoint.token)],
        )
        try:
            while not self._stop.wait(self.interval):
                try:
                    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception as error:  # the worker will find out itself; keep the node serving
                    log.warning("heartbeat for a waiting ClientApp failed: %s", type(error).__name__)
        finally:
            client.close()

"""Which clients a round trains: the partition holders connected (waited for when too few are),
a seeded sample of them, and the client manager a wrapped Flower strategy sees so that it
configures exactly those and chooses no one."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from services.server.connected import ConnectedClients
from services.server.membership import Holder, Membership

log = logging.getLogger("bouquet.server")

HOLDERS_POLL_S = 0.5  # how often a round short of partition holders looks again


class ChosenClients(ClientManager):
    """What a wrapped Flower strategy sees as the client manager in configure_fit: exactly the
    clients Bouquet chose. The strategy then adds its own per-round config (e.g. FedProx's
    proximal_mu) without choosing anyone itself."""

    def __init__(self, proxies: list[ClientProxy]) -> None:
        self.proxies = proxies

    def num_available(self) -> int:
        return len(self.proxies)

    def register(self, client: ClientProxy) -> bool:
        raise NotImplementedError("a fixed selection")

    def unregister(self, client: ClientProxy) -> None:
        raise NotImplementedError("a fixed selection")

    def all(self) -> dict[str, ClientProxy]:
        return {proxy.cid: proxy for proxy in self.proxies}

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return len(self.proxies) >= num_clients

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Any = None) -> list[ClientProxy]:
        return list(self.proxies)



def sample_for_round(holders: list[Holder], wanted: int, seed: int, server_round: int) -> list[Holder]:
    """The holders that train this round, by partition. Seeded by (seed, round) rather than by
    one stream begun at start, so a resumed run samples each round as the uninterrupted run
    would have (a stream would start again and repeat its first picks)."""
    by_partition = sorted(holders, key=lambda holder: holder.partition)
    return sorted(random.Random(f"{seed}:{server_round}").sample(by_partition, wanted), key=lambda holder: holder.partition)


def wait_for_holders(membership: Membership, clients: ConnectedClients, min_fit_clients: int, server_round: int) -> list[Holder]:
    """The partition holders connected now, after waiting (up to FL_JOIN_TIMEOUT) until at
    least FL_MIN_FIT_CLIENTS of them are: a replica restarting, or all of them stopping
    before the server does (`docker compose down`), must not burn rounds with nobody in them."""
    needed = min(min_fit_clients, membership.registry.num_partitions or 0)
    holders = membership.hand_out_partitions(clients.snapshot())
    if len(holders) >= needed:
        return holders
    log.warning(
        "round %d: only %d partition holder(s) connected; waiting up to %g s (FL_JOIN_TIMEOUT) for %d (FL_MIN_FIT_CLIENTS)",
        server_round, len(holders), membership.join_timeout, needed,
    )
    deadline = time.monotonic() + membership.join_timeout
    while len(holders) < needed and time.monotonic() < deadline:
        time.sleep(HOLDERS_POLL_S)
        holders = membership.hand_out_partitions(clients.snapshot())
    return holders

"""How many clients form the federation, and which connected client holds which partition.

Every replica runs the same command, so the server learns the federation's size itself: it
waits for FL_MIN_CLIENTS, then until (a) every replica that announced itself on the shared
data folder (``services.roster``) has connected, and (b) nothing changed for FL_JOIN_GRACE
seconds. A replica that announced but does not connect within FL_JOIN_TIMEOUT of the last
change is given up on, by name. That count is settled once, as the number of partitions.

Flower-free: ``services.server.connected`` asks the clients for their identities, and this
module is handed its plain snapshots ``{connection id: identity}``, so the rules are tested
without a network.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from services.server.registry import PartitionRegistry

log = logging.getLogger("bouquet.server")

PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Holder:
    cid: str  # Flower's connection id
    identity: str
    partition: int


class Membership:
    def __init__(
        self,
        registry: PartitionRegistry,
        min_clients: int,
        join_grace: float,
        join_timeout: float,
        announced: Callable[[], set[str]] = set,
        poll_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        saved: tuple[int, dict[str, int]] | None = None,
    ) -> None:
        self.registry = registry
        self.min_clients = min_clients
        self.join_grace = join_grace
        self.join_timeout = join_timeout
        self.announced = announced
        self.poll_s = poll_s
        self.clock = clock
        self.sleep = sleep
        self.saved = saved  # a resumed run's (size, identity -> partition): restored, not settled anew
        self.how_settled: str | None = None

    def settle(self, connected: Callable[[], set[str]]) -> int:
        """Block until the federation's size is known; return it (also settled in the registry).

        ``connected()`` gives the identities connected right now. Clients are counted by
        identity, not connection: a replica restarted while its old stream is still open is
        one client, and one that left is not counted."""
        last_change = last_report = self.clock()
        state: tuple[frozenset[str], frozenset[str]] | None = None
        while True:
            identities, announced = frozenset(connected()), frozenset(self.announced())
            now = self.clock()
            if (identities, announced) != state:
                state, last_change = (identities, announced), now
            pending = sorted(announced - identities)
            quiet = now - last_change
            if len(identities) >= self.min_clients:
                if self.join_grace == 0:
                    self.how_settled = f"{len(identities)} connected, FL_MIN_CLIENTS = {self.min_clients} and FL_JOIN_GRACE = 0"
                    break
                if quiet >= self.join_grace and (not pending or quiet >= self.join_timeout):
                    self.how_settled = self._explain(identities, announced, pending)
                    break
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                log.info(
                    "settling: %d connected (FL_MIN_CLIENTS = %d), %d started replica(s) not connected yet%s",
                    len(identities), self.min_clients, len(pending), f": {', '.join(pending[:5])}{' ...' if len(pending) > 5 else ''}" if pending else "",
                )
            self.sleep(self.poll_s)
        if self.saved is not None:
            size, assignments = self.saved
            handed = self.registry.restore(size, assignments, set(identities))
            back = len(set(assignments) & identities)
            self.how_settled = (
                f"resumed with its {size} partitions: {back} holder(s) came back, {len(handed)} partition(s) handed to new "
                f"replicas; waited as when settling ({self.how_settled})"
            )
            log.info("%s", self.how_settled)
            return size
        self.registry.settle(len(identities))
        log.info("settled on %d clients: %s", len(identities), self.how_settled)
        return len(identities)

    def _explain(self, identities: frozenset[str], announced: frozenset[str], pending: list[str]) -> str:
        grace = f"no client joined or left for {self.join_grace:g} s (FL_JOIN_GRACE)"
        if not announced:
            return f"{len(identities)} connected, {grace}; no replica announced itself on the shared data folder, so the grace alone decided"
        if pending:
            return (
                f"{len(identities)} connected, {grace}; gave up on {len(pending)} replica(s) that started but did not "
                f"connect within {self.join_timeout:g} s (FL_JOIN_TIMEOUT): {', '.join(pending)}"
            )
        return f"all {len(announced & identities)} replicas that started have connected ({len(identities)} connected in all), {grace}"

    def hand_out_partitions(self, connected: dict[str, str]) -> list[Holder]:
        """Give every connected client whose identity has none yet a free partition (while any is
        left), and return the connected clients that hold one, in partition order.

        ``connected`` maps connection ids to identities in order of connection, so partitions
        go out in order of first contact. When an identity is connected twice (a restarted
        client whose old stream has not closed yet), its newest connection wins."""
        newest: dict[str, str] = {}
        for cid, identity in connected.items():
            if self.registry.assign(identity) is not None:
                newest[identity] = cid
        return sorted(
            (Holder(cid, identity, self.registry.partition_of(identity)) for identity, cid in newest.items()),
            key=lambda holder: holder.partition,
        )

    def missing(self, holders: list[Holder]) -> list[dict[str, object]]:
        """Partitions with no connected holder right now: the client left, or none ever took it."""
        present = {holder.partition for holder in holders}
        by_partition = {partition: identity for identity, partition in self.registry.assignments.items()}
        out = []
        for partition in range(self.registry.num_partitions or 0):
            if partition in present:
                continue
            identity = by_partition.get(partition)
            reason = "no client has taken this partition yet" if identity is None else "not connected (left, or restarting)"
            out.append({"partition": partition, "id": identity, "reason": reason})
        return out

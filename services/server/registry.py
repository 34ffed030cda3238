"""Which client trains on which partition, without per-replica configuration.

Every replica runs the same command, so the server hands out partitions: each client
reports a stable identity (its hostname, or FL_CLIENT_ID), and identities get partition
ids 0, 1, 2, ... in order of first contact. The number of partitions is settled once,
before round 1, from the clients present then (see ``services.server.membership``). A client
that reconnects under the same identity keeps its partition; an identity that arrives
after all partitions are taken stays connected but idle.
"""

from __future__ import annotations

import logging

log = logging.getLogger("bouquet.server")


class PartitionRegistry:
    def __init__(self) -> None:
        self.num_partitions: int | None = None
        self._partition_of: dict[str, int] = {}
        self._turned_away: set[str] = set()

    def settle(self, num_partitions: int) -> None:
        if self.num_partitions is not None:
            raise RuntimeError("the number of partitions is settled once per run")
        if num_partitions < 1:
            raise ValueError("need at least one partition")
        self.num_partitions = num_partitions

    def restore(self, num_partitions: int, assignments: dict[str, int], present: set[str]) -> list[tuple[str, str, int]]:
        """A resumed run's federation: its size and map as saved. A saved holder that is back keeps
        its partition; a partition whose holder did not come back (after `down` / `up` every
        replica has a new hostname) goes to a newcomer, in order. Returns (old, new, partition)
        for each partition handed over."""
        if self.num_partitions is not None:
            raise RuntimeError("the number of partitions is settled once per run")
        self.num_partitions = num_partitions
        self._partition_of = dict(assignments)
        gone = sorted((partition, identity) for identity, partition in assignments.items() if identity not in present)
        newcomers = sorted(identity for identity in present if identity not in assignments)
        handed = []
        for (partition, old), new in zip(gone, newcomers):
            del self._partition_of[old]
            self._partition_of[new] = partition
            handed.append((old, new, partition))
            log.info("client %s -> partition %d of %d (its holder %s did not come back)", new, partition, num_partitions, old)
        return handed

    def assign(self, identity: str) -> int | None:
        """The identity's partition, handing out the next free one on first contact."""
        if self.num_partitions is None:
            raise RuntimeError("settle() the number of partitions before assigning them")
        if identity in self._partition_of:
            return self._partition_of[identity]
        taken = set(self._partition_of.values())
        free = [partition for partition in range(self.num_partitions) if partition not in taken]
        if free:
            self._partition_of[identity] = free[0]
            log.info("client %s -> partition %d of %d", identity, self._partition_of[identity], self.num_partitions)
            return self._partition_of[identity]
        if identity not in self._turned_away:
            self._turned_away.add(identity)
            log.warning(
                "client %s joined after all %d partitions were taken; it stays connected but idle for this run",
                identity,
                self.num_partitions,
            )
        return None

    def partition_of(self, identity: str) -> int | None:
        return self._partition_of.get(identity)

    @property
    def assignments(self) -> dict[str, int]:
        return dict(self._partition_of)

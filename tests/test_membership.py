"""Settling the federation and handing out partitions, on a fake clock (no network, no sleeps).

The scenario of issue 9: 20 replicas start together on a loaded host and connect seconds
apart, further apart than FL_JOIN_GRACE; each announced itself at process start, so the
server waits for all of them instead of settling on the first few.
"""

from __future__ import annotations

import pytest

from services.server.membership import Membership
from services.server.registry import PartitionRegistry


class Timeline:
    """A fake clock whose sleep advances time; ``connected`` and ``announced`` change on schedule."""

    def __init__(self, connect_at: dict[str, float], announce_at: dict[str, float], leave_at: dict[str, float] | None = None) -> None:
        self.now = 0.0
        self.connect_at, self.announce_at, self.leave_at = connect_at, announce_at, leave_at or {}

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def _present(self, schedule: dict[str, float]) -> set[str]:
        return {name for name, at in schedule.items() if at <= self.now and self.leave_at.get(name, float("inf")) > self.now}

    def connected(self) -> set[str]:
        return self._present(self.connect_at)

    def announced(self) -> set[str]:
        return self._present(self.announce_at)


def membership(timeline: Timeline, min_clients: int = 2, join_grace: float = 5.0, join_timeout: float = 180.0) -> Membership:
    return Membership(
        PartitionRegistry(), min_clients, join_grace, join_timeout,
        announced=timeline.announced, poll_s=0.1, clock=timeline.clock, sleep=timeline.sleep,
    )


def test_waits_for_every_started_replica_even_when_they_connect_further_apart_than_the_grace():
    replicas = [f"replica-{i}" for i in range(20)]
    # All announce within a second; they connect up to 40 s later, 2 s apart (grace is 5 s).
    timeline = Timeline(
        connect_at={name: 2.0 + 2.0 * i for i, name in enumerate(replicas)},
        announce_at={name: 0.05 * i for i, name in enumerate(replicas)},
    )
    timeline.connect_at["replica-19"] = 60.0  # one straggler, 22 s after the previous one
    members = membership(timeline)
    assert members.settle(timeline.connected) == 20
    assert members.registry.num_partitions == 20
    assert timeline.now >= 60.0 + 5.0  # settled only after the straggler plus the grace
    assert "all 20 replicas that started have connected" in members.how_settled


def test_gives_up_on_a_started_replica_that_never_connects_and_names_it():
    timeline = Timeline(connect_at={"a": 1.0, "b": 1.5}, announce_at={"a": 0.0, "b": 0.0, "stuck": 0.0})
    members = membership(timeline, join_timeout=30.0)
    assert members.settle(timeline.connected) == 2
    assert 1.5 + 30.0 <= timeline.now < 1.5 + 31.0
    assert "stuck" in members.how_settled and "FL_JOIN_TIMEOUT" in members.how_settled


def test_a_replica_that_dies_before_connecting_is_not_waited_for():
    """Its lock goes with it, so it drops out of the announced set."""
    timeline = Timeline(connect_at={"a": 1.0, "b": 1.0}, announce_at={"a": 0.0, "b": 0.0, "dead": 0.0}, leave_at={"dead": 3.0})
    members = membership(timeline)
    assert members.settle(timeline.connected) == 2
    assert timeline.now < 3.0 + 5.0 + 0.5


def test_without_announcements_the_grace_alone_decides():
    timeline = Timeline(connect_at={"a": 0.0, "b": 1.0, "c": 4.0, "late": 20.0}, announce_at={})
    members = membership(timeline)
    assert members.settle(timeline.connected) == 3
    assert "grace alone" in members.how_settled


def test_clients_that_leave_while_settling_are_not_counted():
    timeline = Timeline(connect_at={"a": 0.0, "b": 0.0, "c": 0.0}, announce_at={}, leave_at={"c": 2.0})
    members = membership(timeline)
    assert members.settle(timeline.connected) == 2


def test_join_grace_zero_settles_as_soon_as_min_clients_are_connected():
    timeline = Timeline(connect_at={"a": 0.0, "b": 3.0, "c": 9.0}, announce_at={"a": 0, "b": 0, "c": 0})
    members = membership(timeline, min_clients=2, join_grace=0.0)
    assert members.settle(timeline.connected) == 2
    assert timeline.now < 3.2


def test_newest_connection_of_an_identity_wins_and_late_joiners_stay_idle():
    registry = PartitionRegistry()
    registry.settle(2)
    members = Membership(registry, 2, 0.0, 1.0)
    holders = members.hand_out_partitions({"c1": "r1", "c2": "r2", "c3": "r1", "c4": "late"})
    assert [(h.cid, h.identity, h.partition) for h in holders] == [("c3", "r1", 0), ("c2", "r2", 1)]


def test_missing_partitions_name_who_left_and_what_was_never_taken():
    registry = PartitionRegistry()
    registry.settle(3)
    members = Membership(registry, 2, 0.0, 1.0)
    members.hand_out_partitions({"c1": "r1", "c2": "r2"})  # r1 -> 0, r2 -> 1; partition 2 never taken
    missing = members.missing(members.hand_out_partitions({"c2": "r2"}))
    assert [(m["partition"], m["id"]) for m in missing] == [(0, "r1"), (2, None)]
    assert "not connected" in missing[0]["reason"] and "no client" in missing[1]["reason"]


@pytest.mark.parametrize("grace", [0.0, 5.0])
def test_never_settles_below_min_clients(grace):
    timeline = Timeline(connect_at={"a": 0.0, "b": 50.0}, announce_at={})
    members = membership(timeline, min_clients=2, join_grace=grace)
    assert members.settle(timeline.connected) == 2
    assert timeline.now >= 50.0

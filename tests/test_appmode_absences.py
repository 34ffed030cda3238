"""App mode's absences without a federation: which sent messages the ServerApp stops waiting for
(a replica that stopped or started again, the job's time budget), how a message no node recorded
enters the run's records, and how rounds count failures and missing partitions as task mode does."""

from __future__ import annotations

import json
from pathlib import Path

from services import misses
from services.appmode import records
from services.appmode.absences import Absences, Replicas
from services.appmode.gauges import RunFollower
from services.appmode.rounds import NOT_RUNNING, RoundStart, round_lines
from services.appmode.serverapp_shim import CURRENT_RUN
from services.budget import JobBudget

BUDGET = JobBudget.for_round(worker_timeout=10.0, jobs=2)  # 2 x (20 + 10) + 30 = 90 s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node_records(data_dir: Path, identity: str, *node_ids: int) -> None:
    log = records.MessageLog(records.node_file(data_dir, identity))
    for node_id in node_ids:
        log.append({"node": identity, "partition": 0, "flwr_node_id": node_id, "outcome": "ok"})


def test_a_message_to_a_replica_that_stopped_is_given_up_at_once_with_the_replica_named(tmp_path):
    node_records(tmp_path, "client-a", 11)
    node_records(tmp_path, "client-b", 12)
    running = {"client-a", "client-b"}
    clock = Clock()
    absences = Absences(BUDGET, Replicas(tmp_path, live=lambda: set(running)), clock)
    absences.sent("m-a", 11)
    absences.sent("m-b", 12)
    assert absences.overdue(["m-a", "m-b"]) == {}
    running.discard("client-b")  # docker kill: its roster lock is released
    clock.now += 5
    overdue = absences.overdue(["m-a", "m-b"])
    assert list(overdue) == ["m-b"] and "replica client-b stopped (Flower node 12)" in overdue["m-b"]
    assert absences.overdue(["m-a", "m-b"]) == {}  # given up once; the other still awaited


def test_a_replica_that_started_again_has_a_new_node_so_the_old_ones_messages_are_given_up(tmp_path):
    node_records(tmp_path, "client-a", 11)
    clock = Clock()
    absences = Absences(BUDGET, Replicas(tmp_path, live=lambda: {"client-a"}), clock)
    absences.sent("m1", 11)
    assert absences.overdue(["m1"]) == {}
    node_records(tmp_path, "client-a", 21)  # compose restarted it: a new SuperNode served a message
    clock.now += 5
    assert "started again as Flower node 21" in absences.overdue(["m1"])["m1"]


def test_an_unknown_or_hanging_node_is_waited_for_exactly_the_jobs_time_budget(tmp_path):
    clock = Clock()
    absences = Absences(BUDGET, Replicas(tmp_path, live=set), clock)
    absences.sent("m1", 77)  # a node never seen in a record (it died in its first message, or runs elsewhere)
    clock.now += BUDGET.deadline_s
    assert absences.overdue(["m1"]) == {}
    clock.now += 0.5
    cause = absences.overdue(["m1"])["m1"]
    assert cause.startswith(f"no reply within {BUDGET.deadline_s:g} s, the job's time budget") and "FL_WORKER_TIMEOUT" in cause


def test_an_answered_message_is_never_given_up(tmp_path):
    clock = Clock()
    absences = Absences(BUDGET, Replicas(tmp_path, live=set), clock)
    absences.sent("m1", 77)
    absences.answered("m1")
    clock.now += 10 * BUDGET.deadline_s
    assert absences.overdue(["m1"]) == {}


def test_a_given_up_message_becomes_a_failed_message_of_the_replica_that_held_it():
    base = {"num_partitions": 3, "flwr_run_id": 7, "outcome": "ok", "cause": None, "message_type": "train"}
    messages = [{**base, "node": "client-c", "partition": 2, "flwr_node_id": 13, "message_id": "r1", "asked_at": 1.0, "ended_at": 2.0},
                {**base, "node": "client-a", "partition": 0, "flwr_node_id": 11, "message_id": "r2-a", "asked_at": 10.0, "ended_at": 12.0},
                {**base, "node": "client-b", "partition": 1, "flwr_node_id": 12, "message_id": "r2-b", "asked_at": 10.0, "ended_at": 12.0, "outcome": "app_error", "cause": "ValueError"}]
    checks = [{"message_id": "r2-c", "flwr_node_id": 13, "flwr_run_id": 7, "message_type": "train", "sent_at": 10.0, "checked_at": 14.0, "no_reply": "replica client-c stopped (Flower node 13): its reply will never come"},
              {"message_id": "r2-a", "flwr_node_id": 11, "flwr_run_id": 7, "message_type": "train", "sent_at": 10.0, "checked_at": 12.5, "error_reply": "Reply message objects are unavailable"},
              {"message_id": "r2-b", "flwr_node_id": 12, "flwr_run_id": 7, "message_type": "train", "sent_at": 10.0, "checked_at": 12.5, "error_reply": "ValueError"}]
    merged = {record["message_id"]: record for record in records.with_reply_checks(messages, checks)}
    given_up = merged["r2-c"]
    assert (given_up["node"], given_up["partition"], given_up["outcome"], given_up["asked_at"]) == ("client-c", 2, "failed", 14.0)  # in the round that waited for it
    assert "client-c stopped" in given_up["cause"] and given_up["recorded_by"] == "serverapp"
    assert merged["r2-a"]["outcome"] == "failed" and "Reply message objects are unavailable" in merged["r2-a"]["cause"]  # it never reached the ServerApp
    assert (merged["r2-b"]["outcome"], merged["r2-b"]["cause"]) == ("app_error", "ValueError")  # the node's own words stand


def test_rounds_record_the_failure_then_the_absence_as_task_mode_does():
    holders = {"client-a": 0, "client-b": 1, "client-c": 2}
    everyone, without_c = frozenset(holders), frozenset({"client-a", "client-b"})
    ok = {"outcome": "ok", "message_type": "train", "num_partitions": 3}
    messages = [
        *({**ok, "node": node, "partition": part, "asked_at": 1.0} for node, part in holders.items()),
        {**ok, "node": "client-a", "partition": 0, "asked_at": 11.0}, {**ok, "node": "client-b", "partition": 1, "asked_at": 11.0},
        {**ok, "node": "client-c", "partition": 2, "asked_at": 11.0, "outcome": "failed", "cause": "replica client-c stopped (Flower node 13): its reply will never come"},
        {**ok, "node": "client-a", "partition": 0, "asked_at": 21.0}, {**ok, "node": "client-b", "partition": 1, "asked_at": 21.0},
    ]
    lines = round_lines([RoundStart(1, 0.0, everyone), RoundStart(2, 10.0, everyone), RoundStart(3, 20.0, without_c)], messages, 30.0, holders=holders)
    assert [(line["clients_ok"], line["clients_failed"], len(line["missing"])) for line in lines] == [(3, 0, 0), (2, 1, 0), (2, 0, 1)]
    assert lines[1]["failures"] == [{"id": "client-c", "partition": 2, "cause": messages[5]["cause"], "message_type": "train"}]
    assert lines[2]["missing"] == [{"id": "client-c", "partition": 2, "reason": NOT_RUNNING}]
    assert misses.by_partition(lines) == {"2": {"missed": 2, "not_connected": 1, "failed": 1}}
    unknown = round_lines([RoundStart(1, 0.0)], messages[:2], 10.0, holders=holders)  # who ran is not known: nobody is called missing
    assert unknown[0]["missing"] == []


def test_the_link_feeds_the_gauges_each_round_of_the_current_run_once_even_after_the_run_ended(tmp_path):
    class Gauges:
        def __init__(self) -> None:
            self.rounds: list[int] = []

        def round_recorded(self, record: dict) -> None:
            self.rounds.append(record["round"])

    gauges = Gauges()
    follower = RunFollower(tmp_path, gauges)  # type: ignore[arg-type]
    follower.step()
    assert gauges.rounds == []  # no run yet
    run = tmp_path / "run-1"
    (run / "serverapp").mkdir(parents=True)
    (tmp_path / CURRENT_RUN).write_text(f"{run / 'serverapp'}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    follower.step()
    follower.step()
    (tmp_path / CURRENT_RUN).unlink()  # submit removes the marker, then writes the last round
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": n}) + "\n" for n in (1, 2)))
    follower.step()
    assert gauges.rounds == [1, 2]


def test_a_node_record_that_lost_its_message_takes_the_id_of_flowers_error_reply_for_it():
    """The node lost track of its worker (its warm process died), so its record names no message;
    Flower failed that message ("ClientApp stopped responding"): one message, one line."""
    lost = {"node": "client-0", "partition": 0, "outcome": "lost", "cause": "the node's warm process died", "message_id": None, "asked_at": 10.0, "ended_at": 11.0}
    later = {"node": "client-0", "partition": 0, "outcome": "ok", "flwr_node_id": 5, "message_id": "m2", "message_type": "train", "asked_at": 80.0, "ended_at": 82.0}
    check = {"message_id": "m1", "flwr_node_id": 5, "flwr_run_id": 7, "message_type": "train", "checked_at": 70.0, "error_reply": "ClientApp stopped responding."}
    merged = records.with_reply_checks([lost, later], [check])
    assert [(r["message_id"], r["outcome"], r["message_type"]) for r in merged] == [("m1", "lost", "train"), ("m2", "ok", "train")]
    assert merged[0]["cause"] == lost["cause"] and merged[0]["flower_error"] == "ClientApp stopped responding."

"""A run can complete while a partition trained 2 of 6 rounds (issue 20): summary.json's
rounds_missed_by_partition and the launcher's last lines say so plainly."""

from __future__ import annotations

from services.launcher import final_line, missed_rounds_lines
from services.server.results import RoundRecorder


def record(number: int, trained: list[int], missing: list[int] = (), failed: list[int] = (), rejected: list[int] = ()) -> dict:
    return {
        "round": number,
        "trained": bool(trained),
        "clients": [{"id": f"c{p}", "partition": p} for p in trained],
        "missing": [{"partition": p, "id": f"c{p}", "reason": "not connected (left, or restarting)"} for p in missing],
        "failures": [{"partition": p, "id": f"c{p}", "cause": "worker killed by SIGKILL"} for p in failed],
        **({"rejected": [{"partition": p, "id": f"c{p}", "reason": "update not finite"} for p in rejected]} if rejected else {}),
    }


def test_the_partitions_that_missed_rounds_are_counted_with_why():
    rounds = [
        record(1, [0, 1, 2]),
        record(2, [0, 1], missing=[2]),
        record(3, [0, 1], missing=[2]),
        record(4, [0, 1], failed=[2]),
        record(5, [0, 2], rejected=[1]),
        record(6, [0, 1, 2]),
    ]
    recorder = RoundRecorder(folder=None, rounds=rounds)
    assert recorder.rounds_trained_by_partition(3) == {"0": 6, "1": 5, "2": 3}
    assert recorder.rounds_missed_by_partition() == {
        "1": {"missed": 1, "rejected": 1},
        "2": {"missed": 3, "not_connected": 2, "failed": 1},
    }


def test_a_partition_missing_and_failing_in_one_round_missed_one_round():
    recorder = RoundRecorder(folder=None, rounds=[record(1, [0], missing=[1], failed=[1])])
    assert recorder.rounds_missed_by_partition() == {"1": {"missed": 1, "not_connected": 1, "failed": 1}}


def test_every_partition_trained_when_asked_is_an_empty_dict_even_when_not_all_were_sampled():
    recorder = RoundRecorder(folder=None, rounds=[record(1, [0, 1]), record(2, [2, 3])])  # FL_FRACTION_FIT=0.5
    assert recorder.rounds_missed_by_partition() == {}


SUMMARY = {
    "run_id": "20261206T045959Z-0123456789abcdef",
    "status": "completed",
    "rounds_requested": 6,
    "rounds_recorded": 6,
    "rounds_completed": 6,
    "final_accuracy": 0.9555555555555556,
    "rounds_missed_by_partition": {"3": {"missed": 4, "not_connected": 3, "failed": 1}},
}


def test_the_final_line_says_a_completed_run_had_a_partition_miss_rounds_in_80_columns():
    line = final_line(SUMMARY, 123456.78)
    assert line == "completed: 6/6 rounds, 1 partition missed rounds, accuracy 0.9556, 123456.8 s"
    assert len(line) <= 80
    assert missed_rounds_lines(SUMMARY) == ["partition 3 missed 4 of 6 rounds (not connected 3, failed 1)"]


def test_the_final_line_of_a_clean_run_and_of_one_without_accuracy():
    clean = {**SUMMARY, "rounds_missed_by_partition": {}}
    assert final_line(clean, 41.23) == "completed: 6/6 rounds, accuracy 0.9556, 41.2 s"
    assert missed_rounds_lines(clean) == []
    failed = {**SUMMARY, "status": "incomplete", "rounds_completed": 0, "final_accuracy": None, "rounds_missed_by_partition": {str(p): {"missed": 6, "failed": 6} for p in range(12)}}
    assert final_line(failed, 9.0) == "incomplete: 0/6 rounds, 12 partitions missed rounds, no accuracy, 9.0 s"
    lines = missed_rounds_lines(failed)
    assert len(lines) == 6 and lines[-1] == "... and 7 more: summary.json rounds_missed_by_partition"
    assert all(len(line) <= 80 for line in lines)

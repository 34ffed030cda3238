"""scripts/bench_front.py (benchmarks/front_overhead.py): the pairing and the figures it reports.
The benchmark itself runs real federations (minutes); docs/benchmarks.md has its committed run."""

from __future__ import annotations

import pytest

from benchmarks.front_overhead import order, summarize


@pytest.mark.parametrize("pairs", [1, 2, 3, 4])
def test_each_variant_runs_as_often_and_goes_first_as_often_as_it_can(pairs):
    runs = order(pairs)
    assert runs.count("front") == runs.count("direct") == pairs
    firsts = [runs[2 * pair] for pair in range(pairs)]
    assert abs(firsts.count("front") - firsts.count("direct")) <= 1


def test_the_ratio_is_of_the_medians_of_every_middle_round():
    runs = [{"label": "front", "round_seconds": [10.0, 12.0]}, {"label": "direct", "round_seconds": [10.0, 9.0]},
            {"label": "direct", "round_seconds": [11.0]}, {"label": "front", "round_seconds": [11.0]}]
    summary = summarize(runs)
    assert summary["rounds"] == {"front": [10.0, 12.0, 11.0], "direct": [10.0, 9.0, 11.0]}
    assert summary["median_round_seconds"] == {"front": 11.0, "direct": 10.0}
    assert summary["front_over_direct"] == pytest.approx(1.1)

"""Partitions: disjoint, complete, seeded; Dirichlet skews labels; the cache is built once per host."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from services.cache import build_once
from services.partitioning import cached_partition, split

LABELS = np.random.RandomState(0).randint(0, 10, 1000)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_everything(scheme):
    parts = split(LABELS, 5, scheme, alpha=0.5, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) == len(np.unique(joined))


def test_iid_is_balanced_and_shuffled():
    parts = split(LABELS, 4, "iid", alpha=0.5, seed=0)
    assert [len(p) for p in parts] == [250] * 4
    assert not np.array_equal(parts[0], np.arange(250))  # not just the first rows in order
    for part in parts:  # every class shows up in every iid shard
        assert len(np.unique(LABELS[part])) == 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_partitions_other_seed_other_partitions(scheme):
    first, again, other = (split(LABELS, 5, scheme, 0.5, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_small_alpha_skews_labels_more_than_iid():
    def skew(parts):  # mean share of each partition's most common label
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])

    assert skew(split(LABELS, 5, "dirichlet", 0.1, 0)) > skew(split(LABELS, 5, "iid", 0.1, 0)) + 0.2


def test_too_many_partitions_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot split 10 examples into 11"):
        split(LABELS[:10], 11, "iid", 0.5, 0)


def test_cached_partition_matches_split_and_rejects_bad_id(tmp_path):
    parts = split(LABELS, 3, "dirichlet", 0.5, 2)
    for pid in range(3):
        assert np.array_equal(cached_partition(tmp_path, "t", LABELS, 3, pid, "dirichlet", 0.5, 2), parts[pid])
    with pytest.raises(ValueError, match="partition_id 3 outside 0..2"):
        cached_partition(tmp_path, "t", LABELS, 3, 3, "dirichlet", 0.5, 2)


def _build_marker(args):
    target, log = args

    def build(scratch: Path) -> None:
        with open(log, "a") as out:
            out.write("built\n")
        scratch.write_text("ready")

    return build_once(Path(target), build).read_text()


def test_build_once_under_concurrency(tmp_path):
    """Many processes asking at once: one build, everyone reads the finished entry."""
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        seen = pool.map(_build_marker, [(str(target), str(log))] * 12)
    assert seen == ["ready"] * 12
    assert log.read_text() == "built\n"


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken(scratch: Path) -> None:
        scratch.write_text("half")
        raise OSError("download interrupted")

    with pytest.raises(OSError):
        build_once(tmp_path / "entry", broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

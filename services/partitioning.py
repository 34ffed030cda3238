"""Split a training set among clients with flwr-datasets' partitioners, seeded and cached.

The partitioners work on Hugging Face datasets; we hand them a two-column table (label,
row index) and read back row indices, so any data set with a label array can be split.
All partitions are computed together once per host and cached, because importing
flwr-datasets costs seconds and every round starts a fresh worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.cache import build_once


def split(labels: np.ndarray, num_partitions: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Row indices of every partition: iid (shuffled, equal shards) or Dirichlet label skew."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(f"cannot split {len(labels)} examples into {num_partitions} partitions")
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = Dataset.from_dict({"label": np.asarray(labels).tolist(), "row": list(range(len(labels)))})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        table = table.shuffle(seed=seed)  # IidPartitioner takes contiguous shards
    elif scheme == "dirichlet":
        min_size = max(1, min(10, len(labels) // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, min_partition_size=min_size, seed=seed
        )
    else:
        raise ValueError(f"unknown partitioning {scheme!r}")
    partitioner.dataset = table
    return [np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64) for pid in range(num_partitions)]


def cached_partition(
    cache_dir: Path, key: str, labels: np.ndarray, num_partitions: int, partition_id: int, scheme: str, alpha: float, seed: int
) -> np.ndarray:
    """Row indices of one partition, computing and caching all of them on first use."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} outside 0..{num_partitions - 1}")
    name = f"{key}-{scheme}-a{alpha:g}-s{seed}-n{num_partitions}.npz"

    def build(scratch: Path) -> None:
        parts = split(labels, num_partitions, scheme, alpha, seed)
        with open(scratch, "wb") as out:
            np.savez(out, **{f"p{i}": part for i, part in enumerate(parts)})

    target = build_once(Path(cache_dir) / "partitions" / name, build)
    with np.load(target) as parts:
        return parts[f"p{partition_id}"]

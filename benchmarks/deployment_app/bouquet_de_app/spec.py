"""Read the TaskSpec and Placement from the run config, so both apps do what Bouquet does."""

from __future__ import annotations

from typing import Any, Mapping

from services.taskspec import Placement, TaskSpec


def task_spec(run_config: Mapping[str, Any]) -> TaskSpec:
    return TaskSpec(
        dataset=str(run_config["dataset"]),
        model=str(run_config["model"]),
        local_epochs=int(run_config["local-epochs"]),
        batch_size=int(run_config["batch-size"]),
        learning_rate=float(run_config["learning-rate"]),
        partitioning=str(run_config["partitioning"]),
        dirichlet_alpha=float(run_config["dirichlet-alpha"]),
        seed=int(run_config["seed"]),
        synthetic_samples=int(run_config["synthetic-samples"]),
        worker_timeout=float(run_config["worker-timeout"]),
    )


def placement(run_config: Mapping[str, Any]) -> Placement:
    return Placement(str(run_config["data-dir"]), str(run_config["device"]))

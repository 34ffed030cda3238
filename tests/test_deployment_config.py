"""The Deployment Engine baseline trains what Bouquet trains: the benchmark gives both engines the
same TaskSpec and placement (torch threads included), and the app declares no task setting of
its own that could drift."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from benchmarks import bouquet, deployment_config
from benchmarks.bench import local_for, parse as parse_bench, task_for
from services.launcher import parse as parse_launcher, torch_threads_per_worker
from services.settings import LocalSettings, TaskSettings
from services.taskspec import Placement, TaskSpec

APP = Path(__file__).resolve().parent.parent / "benchmarks" / "deployment_app"


def app_config() -> dict:
    return tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_app_declares_exactly_the_keys_the_benchmark_gives_it(tmp_path):
    """The SuperLink refuses a run-config key the app does not declare, and a key the benchmark
    does not give would keep the pyproject's value."""
    written = deployment_config.run_config(2, 3, TaskSpec(), Placement("data", "cpu"), tmp_path / "rounds.jsonl")
    assert set(app_config()) == set(written)


def test_task_and_placement_reach_the_app_as_the_benchmark_built_them(tmp_path):
    spec = TaskSpec(task="tests/tasks/x.py", dataset="synthetic", model="resnet18", local_epochs=3, batch_size=8, learning_rate=0.01,
                    partitioning="dirichlet", dirichlet_alpha=0.3, seed=7, synthetic_samples=123, worker_timeout=61.5, task_sha256="ab" * 32)
    placement = Placement(str(tmp_path / "data"), "cpu", 3)
    path = tmp_path / "run-config.toml"
    deployment_config.write(path, deployment_config.run_config(4, 5, spec, placement, tmp_path / "rounds.jsonl"))
    read = tomllib.loads(path.read_text())  # what flwr run reads
    assert deployment_config.task_spec(read) == spec
    assert deployment_config.placement(read) == placement
    assert (read["num-server-rounds"], read["num-clients"]) == (5, 4)


def test_the_app_run_by_hand_trains_bouquets_defaults():
    config = app_config()
    assert deployment_config.task_spec(config) == TaskSpec.from_settings(TaskSettings())
    assert deployment_config.placement(config) == Placement.from_settings(LocalSettings())


def test_both_engines_of_a_benchmark_run_get_the_same_task_and_threads(tmp_path):
    """What the launcher parses from the benchmark's flags equals what the app decodes from its run config."""
    options = parse_bench(["--quick", "--local-epochs", "2", "--learning-rate", "0.02", "--seed", "4"])
    for clients in (1, 2, 5):
        spec, local = task_for(options, "digits"), local_for(options, clients)
        launched = parse_launcher(bouquet.launcher_flags(tmp_path, clients, 2, spec, dataclasses.replace(local, worker_start="spawn")))
        path = tmp_path / f"run-config-{clients}.toml"
        deployment_config.write(path, deployment_config.run_config(clients, 2, spec, Placement.from_settings(local), tmp_path / "rounds.jsonl"))
        app = tomllib.loads(path.read_text())
        assert TaskSpec.from_settings(launched) == deployment_config.task_spec(app) == spec
        assert Placement.from_settings(launched) == deployment_config.placement(app)
        assert launched.torch_threads == deployment_config.placement(app).torch_threads == torch_threads_per_worker(clients)
        assert (spec.local_epochs, spec.learning_rate, spec.seed, spec.batch_size) == (2, 0.02, 4, 32)


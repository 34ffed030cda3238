"""Weights travel as numpy arrays: model -> arrays -> model is exact, and so is a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services import builtin_task, task
from services.server.results import RunFolder, load_checkpoint
from services.taskspec import TaskSpec


def spec(model: str, dataset: str = "digits") -> TaskSpec:
    return TaskSpec(dataset=dataset, model=model, local_epochs=1, batch_size=16, synthetic_samples=100, worker_timeout=60.0)


def build_model(spec: TaskSpec) -> torch.nn.Module:
    """The built-in task's Net, as a worker builds it."""
    builtin_task.configure(**spec.knobs("data"))
    return builtin_task.Net()


@pytest.mark.parametrize("model, dataset", [("digits-cnn", "digits"), ("cifar-cnn", "synthetic"), ("resnet18", "digits")])
def test_model_weights_round_trip(model, dataset):
    source = build_model(spec(model, dataset))
    arrays = task.get_weights(source)
    assert all(isinstance(a, np.ndarray) for a in arrays)
    target = build_model(spec(model, dataset))
    task.set_weights(target, arrays)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_initial_weights_are_seeded():
    first, again = task.initial_weights(spec("digits-cnn")), task.initial_weights(spec("digits-cnn"))
    other = task.initial_weights(TaskSpec(dataset="digits", model="digits-cnn", local_epochs=1, batch_size=16, seed=1, synthetic_samples=100, worker_timeout=60.0))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_wrong_shapes_are_refused_by_name():
    model = build_model(spec("digits-cnn"))
    arrays = task.get_weights(model)
    arrays[0] = np.zeros((1, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"features\.0\.weight have shape \(1, 2, 3\)"):
        task.set_weights(model, arrays)
    with pytest.raises(ValueError, match="got 2 weight arrays"):
        task.set_weights(model, arrays[:2])


def test_checkpoint_round_trip(tmp_path):
    folder = RunFolder(tmp_path, "run-1")
    arrays = task.get_weights(build_model(spec("resnet18")))
    path = folder.save_checkpoint(3, arrays)
    assert path.name == "round-0003.npz"
    loaded = load_checkpoint(path)
    assert len(loaded) == len(arrays)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, loaded))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


def test_a_run_folder_is_never_reused(tmp_path):
    RunFolder(tmp_path, "run-1")
    with pytest.raises(FileExistsError, match="FL_RUN_ID"):
        RunFolder(tmp_path, "run-1")
    assert RunFolder(tmp_path, None).path != RunFolder(tmp_path, None).path

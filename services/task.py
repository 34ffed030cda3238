"""The work a worker process does: build the model, load its data, train or evaluate.

Every function here is a worker job: it takes plain values, returns plain values (numpy
weights, counts, metrics) and is run by ``services.worker`` in a fresh process, so the
CUDA context it creates dies with that process. Client and server processes never import
this module (it imports torch).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from services import data, models
from services.partitioning import cached_partition
from services.taskspec import INPUT_SHAPES, NUM_CLASSES, Placement, TaskSpec


def prepare(placement: Placement) -> torch.device:
    """Apply the placement's thread limit and pick the device for this worker."""
    if placement.torch_threads:
        torch.set_num_threads(placement.torch_threads)
    return pick_device(placement.device)


def pick_device(setting: str) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise RuntimeError("FL_DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cpu")


def build_model(spec: TaskSpec) -> nn.Module:
    return models.build(spec.model, in_channels=INPUT_SHAPES[spec.dataset][0], num_classes=NUM_CLASSES)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [tensor.detach().cpu().numpy() for tensor in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"got {len(weights)} weight arrays for a model with {len(state)} tensors")
    for (name, current), array in zip(state.items(), weights):
        if tuple(current.shape) != tuple(array.shape):
            raise ValueError(f"weights for {name} have shape {tuple(array.shape)}, model needs {tuple(current.shape)}")
    model.load_state_dict({name: torch.as_tensor(array) for name, array in zip(state, weights)}, strict=True)


def initial_weights(spec: TaskSpec) -> list[np.ndarray]:
    """The seeded starting point of the global model."""
    torch.manual_seed(spec.seed)
    return get_weights(build_model(spec))


def _partition(spec: TaskSpec, placement: Placement, labels: np.ndarray, split: str, partition_id: int, num_partitions: int) -> np.ndarray:
    key = f"{spec.dataset}-{split}" + (f"-{spec.synthetic_samples}" if spec.dataset == "synthetic" else "")
    return cached_partition(
        placement.data_dir, key, labels, num_partitions, partition_id, spec.partitioning, spec.dirichlet_alpha, spec.seed
    )


def _memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def train(
    spec: TaskSpec, placement: Placement, weights: list[np.ndarray], partition_id: int, num_partitions: int, server_round: int
) -> dict[str, Any]:
    """Local SGD on one partition. Returns new weights, the number of EXAMPLES and metrics."""
    started = time.monotonic()
    device = prepare(placement)
    splits = data.load(spec.dataset, placement.data_dir, spec.seed, spec.synthetic_samples)
    rows = _partition(spec, placement, splits.train_labels, "train", partition_id, num_partitions)
    generator = torch.Generator().manual_seed(spec.seed * 100_003 + server_round * 1_009 + partition_id)
    loader = DataLoader(Subset(splits.train, rows.tolist()), batch_size=spec.batch_size, shuffle=True, generator=generator)

    model = build_model(spec)
    set_weights(model, weights)
    model.to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    loss_sum, seen = 0.0, 0
    for _ in range(spec.local_epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimiser.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimiser.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
    train_loss = loss_sum / seen if seen else math.nan
    return {
        "weights": get_weights(model),
        "num_examples": len(rows),
        "metrics": {
            "train_loss": train_loss,
            "worker_pid": os.getpid(),
            "device": device.type,
            "train_seconds": time.monotonic() - started,
            **_memory_metrics(device),
        },
    }


def evaluate(
    spec: TaskSpec, placement: Placement, weights: list[np.ndarray], partition_id: int | None = None, num_partitions: int | None = None
) -> dict[str, Any]:
    """Loss and accuracy on the test split, or on one client's share of it."""
    device = prepare(placement)
    splits = data.load(spec.dataset, placement.data_dir, spec.seed, spec.synthetic_samples)
    test = splits.test
    if partition_id is not None and num_partitions is not None:
        rows = _partition(spec, placement, splits.test_labels, "test", partition_id, num_partitions)
        test = Subset(test, rows.tolist())
    model = build_model(spec)
    set_weights(model, weights)
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in DataLoader(test, batch_size=256):
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            loss_sum += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
    return {
        "loss": loss_sum / seen if seen else math.nan,
        "accuracy": correct / seen if seen else math.nan,
        "num_examples": seen,
        "metrics": {"worker_pid": os.getpid(), "device": device.type, **_memory_metrics(device)},
    }

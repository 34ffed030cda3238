"""Bouquet's built-in task (FL_TASK=builtin), written to the same interface as a user's task.py:
``Net``, ``load_data``, ``train``, ``test``, ``load_centralized_dataset``, plus the optional
``configure`` hook through which the runner hands it the knobs a user's task would hard-code
(data set, model, partitioning, seed, data dir). Imported only inside workers (torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from services import data, models
from services.partitioning import cached_partition
from services.taskspec import INPUT_SHAPES, NUM_CLASSES

EVAL_BATCH_SIZE = 256
_knobs: dict[str, Any] = {}


def configure(*, data_dir: str, seed: int, dataset: str, model: str, partitioning: str, dirichlet_alpha: float, synthetic_samples: int) -> None:
    _knobs.update(data_dir=data_dir, seed=seed, dataset=dataset, model=model, partitioning=partitioning,
                  dirichlet_alpha=dirichlet_alpha, synthetic_samples=synthetic_samples)


def _splits() -> data.Splits:
    return data.load(_knobs["dataset"], _knobs["data_dir"], _knobs["seed"], _knobs["synthetic_samples"])


def Net() -> nn.Module:  # noqa: N802 - the task interface's name for "build the model"
    return models.build(_knobs["model"], in_channels=INPUT_SHAPES[_knobs["dataset"]][0], num_classes=NUM_CLASSES)


def _partition(labels: np.ndarray, split: str, partition_id: int, num_partitions: int) -> list[int]:
    dataset = _knobs["dataset"]
    key = f"{dataset}-{split}" + (f"-{_knobs['synthetic_samples']}" if dataset == "synthetic" else "")
    rows = cached_partition(
        _knobs["data_dir"], key, labels, num_partitions, partition_id, _knobs["partitioning"], _knobs["dirichlet_alpha"], _knobs["seed"]
    )
    return rows.tolist()


def load_data(partition_id: int, num_partitions: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """This partition's share of the training split (shuffled) and of the test split."""
    splits = _splits()
    train = Subset(splits.train, _partition(splits.train_labels, "train", partition_id, num_partitions))
    val = Subset(splits.test, _partition(splits.test_labels, "test", partition_id, num_partitions))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=EVAL_BATCH_SIZE)


def load_centralized_dataset() -> DataLoader:
    return DataLoader(_splits().test, batch_size=EVAL_BATCH_SIZE)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device, proximal_mu: float = 0.0) -> float:
    """Local SGD (momentum 0.9); with ``proximal_mu`` > 0 FedProx's proximal term keeps the
    weights near the round's global model. Returns the mean training loss per example."""
    net.to(device).train()
    optimiser = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    anchor = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimiser.zero_grad()
            loss = criterion(net(images), labels)
            if anchor:
                loss = loss + proximal_mu / 2 * sum(torch.sum((p - a) ** 2) for p, a in zip(net.parameters(), anchor))
            loss.backward()
            optimiser.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
    return loss_sum / seen if seen else float("nan")


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, dict[str, float]]:
    net.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss_sum += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
    if not seen:
        return float("nan"), {"accuracy": float("nan")}
    return loss_sum / seen, {"accuracy": correct / seen}

"""A Flower quickstart-shaped task on local data: the model, the data and the training code.

Shaped like Flower's quickstart-pytorch ``task.py`` (Net, load_data, train, test,
load_centralized_dataset); Bouquet runs it unchanged with FL_TASK=<path to this file>. The data
are parquet files made by prepare_data.py, read offline with Hugging Face ``datasets`` and split
among the clients with flwr-datasets' IidPartitioner.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import load_dataset
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from torch.utils.data import DataLoader

DATA = Path(os.environ.get("DIGITS_PARQUET_DIR", Path(__file__).resolve().parent / "data"))


class Net(nn.Module):
    """A small CNN for 1x8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def apply_transforms(batch: dict) -> dict:
    """Rows of 64 pixel values become 1x8x8 image tensors."""
    batch["img"] = [torch.tensor(pixels, dtype=torch.float32).reshape(1, 8, 8) for pixels in batch.pop("pixels")]
    return batch


fds = None  # cache the FederatedDataset, as the quickstart does


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """This client's partition of the training data, split 80/20 into train and validation."""
    global fds
    if fds is None:
        fds = FederatedDataset(
            dataset="parquet",
            data_files={"train": str(DATA / "train.parquet")},
            partitioners={"train": IidPartitioner(num_partitions=num_partitions)},
        )
    partition = fds.load_partition(partition_id).train_test_split(test_size=0.2, seed=42)
    partition = partition.with_transform(apply_transforms)
    trainloader = DataLoader(partition["train"], batch_size=batch_size, shuffle=True)
    valloader = DataLoader(partition["test"], batch_size=batch_size)
    return trainloader, valloader


def load_centralized_dataset():
    """The held-out test split, for the server's evaluation."""
    test = load_dataset("parquet", data_files={"test": str(DATA / "test.parquet")})["test"]
    return DataLoader(test.with_transform(apply_transforms), batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set; return the mean loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images, labels = batch["img"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set; return (loss, metrics)."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images, labels = batch["img"].to(device), batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    return loss / len(testloader), {"accuracy": accuracy}

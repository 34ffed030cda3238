"""The models Bouquet trains. Imported only inside worker processes (it imports torch)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits: two 3x3 convolutions, one pooling, two dense layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarCNN(nn.Module):
    """The original recipe's CIFAR-10 CNN: conv 3->6->16 (5x5), dense 400->120->84->10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18(in_channels: int, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18, untrained, with its stem adapted to the input channels."""
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def build(name: str, in_channels: int, num_classes: int = 10) -> nn.Module:
    if name == "digits-cnn":
        return DigitsCNN(num_classes)
    if name == "cifar-cnn":
        return CifarCNN(num_classes)
    if name == "resnet18":
        return resnet18(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}")

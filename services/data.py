"""The data sets, as torch datasets with their label arrays. Imported only inside workers.

digits: scikit-learn's bundled 8x8 digits (offline), split 80/20 once and cached as arrays.
cifar10: torchvision's CIFAR-10, downloaded once per host into the shared data dir.
synthetic: seeded random images with a learnable class signal, generated in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from services.cache import build_once


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray


def load(name: str, data_dir: str | Path, seed: int, synthetic_samples: int) -> Splits:
    if name == "digits":
        return _digits(Path(data_dir))
    if name == "cifar10":
        return _cifar10(Path(data_dir))
    if name == "synthetic":
        return _synthetic(Path(data_dir), seed, synthetic_samples)
    raise ValueError(f"unknown dataset {name!r}")


def _digits(data_dir: Path) -> Splits:
    def build(scratch: Path) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=0.2, stratify=labels, random_state=0
        )
        with open(scratch, "wb") as out:
            np.savez(out, x_train=x_train, x_test=x_test, y_train=y_train, y_test=y_test)

    with np.load(build_once(data_dir / "digits-v1.npz", build)) as arrays:
        x_train, x_test, y_train, y_test = (arrays[k] for k in ("x_train", "x_test", "y_train", "y_test"))

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(y, dtype=torch.long))

    return Splits(tensors(x_train, y_train), tensors(x_test, y_test), y_train.astype(np.int64), y_test.astype(np.int64))


def _cifar10(data_dir: Path) -> Splits:
    from torchvision import transforms
    from torchvision.datasets import CIFAR10

    def download(scratch: Path) -> None:
        CIFAR10(root=str(scratch), train=True, download=True)
        CIFAR10(root=str(scratch), train=False, download=True)

    root = str(build_once(data_dir / "cifar10", download))
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    train = CIFAR10(root=root, train=True, download=False, transform=normalise)
    test = CIFAR10(root=root, train=False, download=False, transform=normalise)
    return Splits(train, test, np.asarray(train.targets, dtype=np.int64), np.asarray(test.targets, dtype=np.int64))


def _synthetic(data_dir: Path, seed: int, samples: int) -> Splits:
    """Generated once per host and seed, then read back: every round's worker would otherwise
    spend longer drawing the random images than a small model spends training on them."""

    def build(scratch: Path) -> None:
        generator = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(10, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (samples,), generator=generator)
        images = torch.randn(samples, 3, 32, 32, generator=generator) + 0.5 * prototypes[labels]
        with open(scratch, "wb") as out:
            np.save(out, images.numpy())
            np.save(out, labels.numpy())

    with open(build_once(data_dir / f"synthetic-s{seed}-n{samples}.npy", build), "rb") as arrays:
        images, labels = torch.from_numpy(np.load(arrays)), torch.from_numpy(np.load(arrays))
    cut = max(1, samples // 5)
    test, train = TensorDataset(images[:cut], labels[:cut]), TensorDataset(images[cut:], labels[cut:])
    return Splits(train, test, labels[cut:].numpy(), labels[:cut].numpy())

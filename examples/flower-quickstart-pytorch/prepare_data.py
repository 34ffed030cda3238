"""Data in CIFAR-10's shape, built offline, for running Flower's own quickstart-pytorch App unchanged
but for its data source: its ``task.py`` reads ``uoft-cs/cifar10`` from the Hugging Face Hub
(``img``: a 32x32 RGB image, ``label``: one of 10 classes), which a machine without internet
cannot download. This writes ``train.parquet`` and ``test.parquet`` with those two columns, made
from scikit-learn's bundled 8x8 digits (each scaled up to 32x32 and repeated over 3 channels), so
Flower's ``Net``, transforms and training loop run as written. See README.md beside this file.

    python examples/flower-quickstart-pytorch/prepare_data.py --out /data/cifar-shaped
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PilImage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SIDE = 32  # CIFAR-10's image side


def as_cifar_image(digit: np.ndarray) -> PilImage.Image:
    """An 8x8 digit (values 0-16) as a 32x32 RGB image: CIFAR-10's size, mode and value range."""
    grey = PilImage.fromarray((digit.reshape(8, 8) * (255 / 16)).astype(np.uint8), mode="L")
    return grey.resize((SIDE, SIDE), PilImage.Resampling.BILINEAR).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for train.parquet and test.parquet")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    features = Features({"img": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        rows = {"img": [as_cifar_image(digit) for digit in x], "label": y.tolist()}
        Dataset.from_dict(rows, features=features).to_parquet(out / f"{name}.parquet")
        print(f"{out / name}.parquet: {len(y)} examples")


if __name__ == "__main__":
    main()

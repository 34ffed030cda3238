"""Build this example's data set offline: scikit-learn's bundled 8x8 digits as two parquet files
(data/train.parquet, data/test.parquet) that Hugging Face `datasets` reads with no internet.

    python examples/quickstart-digits/prepare_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        Dataset.from_dict({"pixels": (x / 16.0).astype("float32").tolist(), "label": y.tolist()}).to_parquet(out / f"{name}.parquet")
        print(f"{out / name}.parquet: {len(y)} examples")


if __name__ == "__main__":
    main()

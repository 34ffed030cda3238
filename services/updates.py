"""Is a client's update fit to be averaged into the global model? (pure numpy, no Flower)

A Flower strategy averages whatever it is given: arrays of the wrong shape end the run in the
middle of its arithmetic, NaN or Inf poison the model silently, and a zero or negative number of
examples turns a weighted mean upside down. So every update is checked here first, against the
layout of the model it was sent (its arrays, each one's shape and dtype), and a failing one is
left out with a reason that names the array. The aggregate is checked too: the strategy's own
arithmetic can overflow to Inf from finite updates.

The rules of both modes: task mode's server checks a list of arrays against the run's model
(``update_problem``); app mode's ServerApp process checks the named arrays of a ClientApp's
reply against those its ServerApp sent (``keyed_problem``, ``examples_problem``,
``metrics_problem``, ``clip_update``: services.appmode.replies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ArrayLayout:
    shape: tuple[int, ...]
    dtype: np.dtype


Layout = list[ArrayLayout]


def layout_of(weights: Sequence[np.ndarray]) -> Layout:
    """The model's structure, which every update must have."""
    return [ArrayLayout(tuple(array.shape), array.dtype) for array in weights]


def structure_problem(layout: Layout, weights: Sequence[np.ndarray]) -> str | None:
    """Number of arrays, then each array's shape, dtype and values; the first problem found."""
    if len(weights) != len(layout):
        return f"{len(weights)} arrays, expected {len(layout)}"
    for index, (array, expected) in enumerate(zip(weights, layout)):
        problem = array_problem(f"array {index}", array, expected)
        if problem is not None:
            return problem
    return None


def keyed_problem(layout: Mapping[str, ArrayLayout], arrays: Mapping[str, np.ndarray]) -> str | None:
    """Named arrays (a Flower ArrayRecord's) against the named layout they were sent with: the
    same names, then each one's shape, dtype and values; the first problem found."""
    missing, extra = [key for key in layout if key not in arrays], [key for key in arrays if key not in layout]
    if missing or extra:
        said = [f"{label} {', '.join(map(repr, keys[:5]))}{' ...' if len(keys) > 5 else ''}" for label, keys in (("missing", missing), ("not sent", extra)) if keys]
        return f"arrays {'; '.join(said)}"
    for key, expected in layout.items():
        problem = array_problem(f"array {key!r}", arrays[key], expected)
        if problem is not None:
            return problem
    return None


def array_problem(label: str, array: np.ndarray, expected: ArrayLayout) -> str | None:
    """One array's shape, dtype and values against what it must be."""
    if tuple(array.shape) != expected.shape:
        return f"{label}: shape {_shape(array.shape)}, expected {_shape(expected.shape)}"
    if array.dtype != expected.dtype:
        return f"{label}: dtype {array.dtype}, expected {expected.dtype}"
    return finite_problem(label, array)


def finite_problem(label: str, array: np.ndarray) -> str | None:
    """NaN or Inf in a floating-point (or complex) array."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = array.size - int(np.isfinite(array).sum())
        kinds = "/".join(name for name, found in (("NaN", np.isnan(array).any()), ("Inf", np.isinf(array).any())) if found)
        return f"{label}: {bad} of {array.size} values are not finite ({kinds})"
    return None


def examples_problem(num_examples: Any, name: str = "num_examples") -> str | None:
    """The number of examples an update is weighed by: a positive integer (not a bool, not a float)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        return f"{name} {num_examples!r} is not an integer"
    if num_examples <= 0:
        return f"{name} {num_examples}, expected a positive integer"
    return None


def update_problem(layout: Layout, weights: Sequence[np.ndarray], num_examples: Any, metrics: Mapping[str, Any]) -> str | None:
    """Why this update must not be aggregated, or None when it may be."""
    problem = examples_problem(num_examples)
    if problem is not None:
        return problem
    problem = structure_problem(layout, weights)
    if problem is not None:
        return problem
    return metrics_problem(metrics)


MAX_EXAMPLES_OVER_MEDIAN = 10


def examples_cap(claims: Sequence[int]) -> int | None:
    """The most examples one update of a round may be weighed by: MAX_EXAMPLES_OVER_MEDIAN times
    the round's lower median claim (None for a round of one, which has nothing to outweigh).

    The server cannot know a partition's size (a task's load_data decides it, in a worker the
    server never runs), and FedAvg weighs each update by the number its client claims: one
    client claiming 2**62 would take all the weight. Capping (rather than refusing) keeps an
    honest client with a large partition in the round, at most that many times a typical one.
    The lower median is an honest client's claim whenever honest clients are at least half."""
    if len(claims) < 2:
        return None
    return MAX_EXAMPLES_OVER_MEDIAN * sorted(claims)[(len(claims) - 1) // 2]


def metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    """Numeric metrics must be finite (they are averaged and plotted); text is left alone."""
    for key, value in metrics.items():
        for item in value if isinstance(value, list) else [value]:  # Flower metrics may be lists of scalars
            if isinstance(item, float) and not math.isfinite(item):
                return f"metric {key!r} is {value}"
    return None


def evaluation_problem(loss: Any, num_examples: Any, metrics: Mapping[str, Any]) -> str | None:
    """A client's evaluation result: a finite loss, a positive number of examples, finite
    metrics and, when it reports one, a numeric accuracy (it is averaged)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        return f"num_examples {num_examples!r}, expected a positive integer"
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"loss {loss!r} is not a finite number"
    accuracy = metrics.get("accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
        return f"metric 'accuracy' is {accuracy!r}, expected a number"
    if accuracy is not None and math.isfinite(accuracy) and not 0 <= accuracy <= 1:
        return f"metric 'accuracy' is {accuracy!r}, expected a fraction in [0, 1]"
    return metrics_problem(metrics)


def _moving(reference: Sequence[np.ndarray]) -> list[int]:
    """The arrays an update moves by learning: the floating-point ones. Integer buffers (a
    BatchNorm's step counter) count steps, not distance, and stay out of the norm."""
    return [index for index, array in enumerate(reference) if np.asarray(array).dtype.kind == "f"]


def update_norm(reference: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> float:
    """L2 distance (all floating-point arrays together) between an update and the global model."""
    total = 0.0
    for index in _moving(reference):
        delta = np.asarray(weights[index], dtype=np.float64) - np.asarray(reference[index], dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def clip_update(reference: Sequence[np.ndarray], weights: Sequence[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    """The update moved back towards the global model until its distance is ``max_norm``
    (unchanged when already within it), and its distance before clipping."""
    norm = update_norm(reference, weights)
    if norm <= max_norm:
        return list(weights), norm
    scale = max_norm / norm
    out = list(weights)
    for index in _moving(reference):
        base = np.asarray(reference[index], dtype=np.float64)
        out[index] = (base + (np.asarray(weights[index], dtype=np.float64) - base) * scale).astype(weights[index].dtype)
    return out, norm


def aggregate_problem(layout: Layout, weights: Sequence[np.ndarray]) -> str | None:
    """Why the strategy's result must not become the global model: it lost the model's
    structure, or its arithmetic made values that are not finite."""
    if len(weights) != len(layout):
        return f"the aggregate has {len(weights)} arrays, expected {len(layout)}"
    for index, (array, expected) in enumerate(zip(weights, layout)):
        if tuple(array.shape) != expected.shape:
            return f"aggregate array {index}: shape {_shape(array.shape)}, expected {_shape(expected.shape)}"
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = array.size - int(np.isfinite(array).sum())
            return f"aggregate array {index}: {bad} of {array.size} values are not finite"
    return None


def checked_aggregate(layout: Layout, weights: Sequence[np.ndarray]) -> list[np.ndarray] | str:
    """The aggregate as it would become the global model (in the model's dtypes), or why it may
    not: checked before the cast (a non-finite value would be rounded into an integer buffer)
    and after it (a finite float64 mean can overflow float32)."""
    problem = aggregate_problem(layout, weights)
    if problem is not None:
        return problem
    with np.errstate(over="ignore", invalid="ignore"):
        kept = in_layout(layout, weights)
    problem = aggregate_problem(layout, kept)
    return f"{problem} in the model's dtypes" if problem is not None else kept


def in_layout(layout: Layout, weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The aggregate in the model's own dtypes: a weighted mean turns integer buffers into
    floats, and the next round's updates (and a resumed run's checks) expect the model's."""
    return [array if array.dtype == expected.dtype else np.rint(array).astype(expected.dtype) if expected.dtype.kind in "iu" else array.astype(expected.dtype)
            for array, expected in zip(weights, layout)]


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(shape)).replace(" ", "")

"""The work a worker process does, for any task module: build ``Net``, load the partition's
data, ``train`` or ``test``, and hand back plain values (numpy weights, counts, metrics).

A task module is shaped like Flower's quickstart-pytorch ``task.py`` (docs/tasks.md):
``Net``, ``load_data(partition_id, num_partitions[, batch_size])`` (with batch_size
when it takes one, as in quickstart-pytorch; without, as in advanced-pytorch), ``train(net,
trainloader, epochs, lr, device)``, ``test(net, testloader, device)`` and optionally
``load_centralized_dataset()`` and ``configure(**knobs)``. Bouquet's built-in task is one such
module (``services.builtin_task``), so every task takes this one path.

Every function here is a worker job, run by ``services.worker`` in a fresh process: the task
module is imported there afresh each round and its CUDA context dies with the process. Client
and server processes never import this module (it imports torch); only FL_WORKER_START=inprocess
runs it in the caller, which is the memory problem kept for comparison.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from services.failures import is_out_of_memory
from services.taskspec import Placement, TaskSpec

BUILTIN = "services.builtin_task"
REQUIRED = {  # function -> the ways Bouquet may call it (positional arguments), the first that fits
    "load_data": (("partition_id", "num_partitions", "batch_size"), ("partition_id", "num_partitions")),
    "train": (("net", "trainloader", "epochs", "lr", "device"),),
    "test": (("net", "testloader", "device"),),
}


class TaskError(RuntimeError):
    """The task module is not usable as given (FL_TASK), or one of its functions failed."""


# --- loading and checking a task module ---------------------------------------------------------


def load(reference: str) -> ModuleType:
    """Import the task: builtin, a .py file, or a module (a task file that imports modules beside
    it: put its folder on PYTHONPATH and name it as a module)."""
    if reference == "builtin":
        return importlib.import_module(BUILTIN)
    if reference.endswith(".py"):
        path = Path(reference).resolve()
        if not path.is_file():
            raise TaskError(f"no such file {path}")
        name = f"bouquet_task_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise TaskError(f"fails to import: {_located(error, str(path))}") from error
        return module
    try:
        return importlib.import_module(reference)
    except ModuleNotFoundError as error:
        if error.name and reference.startswith(error.name):
            raise TaskError(f"no module named {error.name!r} (not a builtin, not a .py path)") from error
        raise TaskError(f"fails to import: {_located(error, None)}") from error
    except Exception as error:
        raise TaskError(f"fails to import: {_located(error, None)}") from error


def source_path(module: ModuleType) -> str | None:
    return getattr(module, "__file__", None)


def sha256_of(module: ModuleType) -> str:
    path = source_path(module)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def check_task(task: str) -> dict[str, Any]:
    """Worker job run once by the server at start: everything that can be wrong with FL_TASK,
    found before any client trains. Returns what the server records and needs to know."""
    module = load(task)
    problems = [problem for name, calls in REQUIRED.items() if (problem := _mismatch(module, name, calls))]
    if not callable(getattr(module, "Net", None)):
        problems.append("defines no Net (the torch.nn.Module class, built with no arguments)")
    if problems:  # every one at once: a user fixes them in one go, not one per start
        raise TaskError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(f"({n}) {p}" for n, p in enumerate(problems, 1)))
    central = getattr(module, "load_centralized_dataset", None)
    return {
        "task": task,
        "path": source_path(module),
        "sha256": sha256_of(module),
        "central_evaluation": callable(central),
        "train_takes_proximal_mu": _accepts(module.train, "proximal_mu"),
        "has_configure": callable(getattr(module, "configure", None)),
    }


def _shown(name: str, positional: tuple[str, ...]) -> str:
    return f"{name}({', '.join(positional)})"


def _mismatch(module: ModuleType, name: str, calls: tuple[tuple[str, ...], ...]) -> str | None:
    """Why ``module.name`` cannot be called any of the ways in ``calls``, or None when it can."""
    function = getattr(module, name, None)
    if not callable(function):
        return f"defines no function {' or '.join(_shown(name, call) for call in calls)}"
    try:
        signature = inspect.signature(function)
    except ValueError:  # a builtin without a signature: trust it
        return None
    errors = []
    for positional in calls:
        try:
            signature.bind(*positional)
            return None
        except TypeError as error:
            errors.append(str(error))
    return f"{name}{signature} cannot be called as {' or as '.join(_shown(name, call) for call in calls)}: {errors[0]}"


def load_data_arguments(load_data: Any, partition_id: int, num_partitions: int, batch_size: int) -> tuple[Any, ...]:
    """What this task's ``load_data`` is called with: the batch size too when it takes a third argument."""
    try:
        inspect.signature(load_data).bind(partition_id, num_partitions, batch_size)
    except TypeError:
        return (partition_id, num_partitions)
    except ValueError:  # no signature to read: the documented shape
        pass
    return (partition_id, num_partitions, batch_size)


def _accepts(function: Any, keyword: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


def _located(error: BaseException, path: str | None) -> str:
    """'Type: message (file:line in function)', the frame being the task's own when known."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if path and os.path.realpath(f.filename) == os.path.realpath(path)]
    frame = (own or frames or [None])[-1]
    message = str(error).splitlines()[0] if str(error) else ""
    where = f" ({frame.filename}:{frame.lineno} in {frame.name})" if frame else ""
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


def _ready(spec: TaskSpec, placement: Placement) -> tuple[ModuleType, torch.device]:
    """The task module as the server inspected it, configured, and the device to compute on."""
    if placement.torch_threads:
        torch.set_num_threads(placement.torch_threads)
    module = load(spec.task)
    if spec.task_sha256 and sha256_of(module) != spec.task_sha256:
        raise TaskError(f"{source_path(module)} changed since the server started the run (FL_TASK = {spec.task!r}); every round must train the same task")
    configure = getattr(module, "configure", None)
    if callable(configure):
        wanted = inspect.signature(configure).parameters
        knobs = spec.knobs(placement.data_dir)
        takes_all = any(p.kind is p.VAR_KEYWORD for p in wanted.values())
        configure(**{k: v for k, v in knobs.items() if takes_all or k in wanted})
    return module, pick_device(placement.device)


def _call(module: ModuleType, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call a task function; its failure names itself and the task's line that raised."""
    try:
        return getattr(module, name)(*args, **kwargs)
    except Exception as error:
        if is_out_of_memory(error):  # the worker classifies it (and admission retries it), not a task error
            raise
        raise TaskError(f"{name} raised {_located(error, source_path(module))}") from error


# --- the jobs -------------------------------------------------------------------------------------


def pick_device(setting: str) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise RuntimeError("FL_DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cpu")


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


def _net(module: ModuleType, weights: list[np.ndarray] | None = None) -> nn.Module:
    net = _call(module, "Net")
    if not isinstance(net, nn.Module):
        raise TaskError(f"Net() returned {type(net).__name__}, not a torch.nn.Module")
    if weights is not None:
        set_weights(net, weights)
    return net


def initial_weights(spec: TaskSpec, placement: Placement | None = None) -> list[np.ndarray]:
    """The seeded starting point of the global model."""
    module, _ = _ready(spec, placement or Placement(data_dir="data", device="cpu"))
    torch.manual_seed(spec.seed)
    return get_weights(_net(module))


def _memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def train(
    spec: TaskSpec, placement: Placement, weights: list[np.ndarray], partition_id: int, num_partitions: int,
    server_round: int, proximal_mu: float | None = None,
) -> dict[str, Any]:
    """Local training on one partition. Returns new weights, the number of training EXAMPLES
    (``len(trainloader.dataset)``) and metrics."""
    started = time.monotonic()
    module, device = _ready(spec, placement)
    torch.manual_seed(spec.seed * 100_003 + server_round * 1_009 + partition_id)  # the loaders' shuffles
    trainloader, _ = _call(module, "load_data", *load_data_arguments(module.load_data, partition_id, num_partitions, spec.batch_size))
    net = _net(module, weights)
    extra = {"proximal_mu": proximal_mu} if proximal_mu is not None else {}
    loss = _call(module, "train", net, trainloader, spec.local_epochs, spec.learning_rate, device, **extra)
    return {
        "weights": get_weights(net),
        "num_examples": len(trainloader.dataset),
        "metrics": {
            "train_loss": float(loss) if isinstance(loss, numbers.Real) else math.nan,
            "worker_pid": os.getpid(),
            "device": device.type,
            "train_seconds": time.monotonic() - started,
            **extra,  # FedProx's mu, as train() received it
            **_memory_metrics(device),
        },
    }


def evaluate(
    spec: TaskSpec, placement: Placement, weights: list[np.ndarray], partition_id: int | None = None, num_partitions: int | None = None
) -> dict[str, Any]:
    """``test`` on the task's held-out data (the server's ``load_centralized_dataset``), or on a
    client's validation loader. Accepts ``(loss, accuracy)`` and ``(loss, metrics)``."""
    module, device = _ready(spec, placement)
    if partition_id is None:
        loader = _call(module, "load_centralized_dataset")
    else:
        torch.manual_seed(spec.seed * 100_003 + partition_id)
        _, loader = _call(module, "load_data", *load_data_arguments(module.load_data, partition_id, num_partitions, spec.batch_size))
    net = _net(module, weights)
    loss, metrics = normalise_test_result(_call(module, "test", net, loader, device))
    return {
        "loss": loss,
        "accuracy": metrics["accuracy"],
        "num_examples": len(loader.dataset),
        "metrics": metrics,
        "job": {"worker_pid": os.getpid(), "device": device.type, **_memory_metrics(device)},
    }


def normalise_test_result(result: Any) -> tuple[float, dict[str, Any]]:
    """(loss, accuracy) or (loss, {"accuracy": ..., ...}) -> (loss, metrics as plain values)."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TaskError(f"test returned {type(result).__name__}; it must return (loss, accuracy) or (loss, metrics dict)")
    loss, second = result
    if isinstance(second, dict):
        if "accuracy" not in second:
            raise TaskError(f"test's metrics have no 'accuracy' (keys: {', '.join(map(str, second)) or 'none'})")
        metrics = {str(key): _plain(value) for key, value in second.items()}
    else:
        metrics = {"accuracy": _plain(second)}
    return float(loss), metrics


def _plain(value: Any) -> Any:
    """numpy and torch numbers and arrays as JSON-ready Python values."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value

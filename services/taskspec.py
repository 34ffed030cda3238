"""What a worker needs to know to train or evaluate: the task, free of torch.

The server builds a TaskSpec from its settings and sends it in every round's config, so
clients need no training configuration of their own (all replicas run the same command).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from services.settings import LocalSettings, SettingError, TaskSettings, values_of

INPUT_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "synthetic": (3, 32, 32)}
NUM_CLASSES = 10
# Input shape a model is built for; None means any image shape.
MODEL_INPUTS = {"digits-cnn": (1, 8, 8), "cifar-cnn": (3, 32, 32), "resnet18": None}


def resolve_model(dataset: str, model: str) -> str:
    if model == "auto":
        return "digits-cnn" if dataset == "digits" else "cifar-cnn"
    return model


def check_model_fits(dataset: str, model: str) -> None:
    """Raise SettingError when the model cannot take the data set's images."""
    resolved = resolve_model(dataset, model)
    wanted = MODEL_INPUTS[resolved]
    if wanted is not None and wanted != INPUT_SHAPES[dataset]:
        fitting = [name for name, shape in MODEL_INPUTS.items() if shape in (None, INPUT_SHAPES[dataset])]
        shape = "x".join(map(str, INPUT_SHAPES[dataset]))
        raise SettingError(
            f"--model / FL_MODEL = {model!r}: needs {'x'.join(map(str, wanted))} inputs but dataset "
            f"{dataset!r} has {shape}; use one of: auto, {', '.join(fitting)}"
        )


@dataclass(frozen=True, kw_only=True)
class TaskSpec(TaskSettings):
    """The task settings as the server resolved them (the model named, the task file hashed):
    its fields are ``TaskSettings``'s, declared once in services/settings.py."""

    task_sha256: str = ""  # of the task's file, as the server inspected it: every round must train the same code

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", resolve_model(self.dataset, self.model))

    @classmethod
    def from_settings(cls, settings: TaskSettings) -> "TaskSpec":
        """From any program's settings that include the task (the server's, the benchmark's)."""
        return cls(**values_of(settings, TaskSettings))

    def knobs(self, data_dir: str) -> dict[str, Any]:
        """What a task module's optional ``configure`` hook may ask for (the builtin task needs all)."""
        return {
            "data_dir": data_dir,
            "seed": self.seed,
            "dataset": self.dataset,
            "model": self.model,
            "partitioning": self.partitioning,
            "dirichlet_alpha": self.dirichlet_alpha,
            "synthetic_samples": self.synthetic_samples,
        }

    def to_config(self) -> dict[str, Any]:
        """Flower config values (str/int/float/bool only)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TaskSpec":
        missing = [f.name for f in fields(cls) if f.name not in config]
        if missing:
            raise ValueError(f"round config lacks {', '.join(missing)}: server and client versions differ?")
        return cls(**{f.name: config[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Placement:
    """Where a worker runs and where it finds its data: local to the process that starts it."""

    data_dir: str
    device: str
    torch_threads: int = 0  # 0: torch's default (one thread per core)

    @classmethod
    def from_settings(cls, settings: LocalSettings) -> "Placement":
        return cls(settings.data_dir, settings.device, settings.torch_threads)

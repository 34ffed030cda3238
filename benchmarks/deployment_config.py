"""What the Deployment Engine app is told, written by the benchmark and read by the app.

The task and the placement travel whole, as the JSON of the same ``TaskSpec`` and ``Placement``
that Bouquet's server sends and Bouquet's workers use (``TaskSpec.to_config()``), so the app
never declares a task setting of its own and cannot drift from Bouquet's. The keys below are
the app's run config; ``deployment_app/pyproject.toml`` must declare exactly these (the
SuperLink refuses a key the app does not declare; a test compares them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from services.settings import LocalSettings, TaskSettings
from services.taskspec import Placement, TaskSpec


def run_config(clients: int, rounds: int, spec: TaskSpec, placement: Placement, rounds_file: Path) -> dict[str, Any]:
    return {
        "num-server-rounds": rounds,
        "num-clients": clients,
        "task": json.dumps(spec.to_config(), sort_keys=True),
        "placement": json.dumps(dataclasses.asdict(placement), sort_keys=True),
        "rounds-file": str(rounds_file),
    }


def write(path: Path, values: Mapping[str, Any]) -> None:
    """As TOML for ``flwr run --run-config``: JSON's string, number and boolean literals are TOML's."""
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))


def task_spec(config: Mapping[str, Any]) -> TaskSpec:
    """The benchmark's TaskSpec; an empty ``task`` (the app run by hand) is Bouquet's defaults."""
    text = str(config["task"])
    return TaskSpec.from_config(json.loads(text)) if text else TaskSpec.from_settings(TaskSettings())


def placement(config: Mapping[str, Any]) -> Placement:
    text = str(config["placement"])
    return Placement(**json.loads(text)) if text else Placement.from_settings(LocalSettings())

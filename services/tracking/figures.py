"""The figures of a round and the parameters of a run, as trackers want them: flat names to
numbers (metrics) and to short strings (parameters). Declared once here, so MLflow, TensorBoard
and Prometheus show the same figures under the same names.

Standard library only: the server never imports torch, and reads torch's version from the
installed package's metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any, Mapping

# The metrics.jsonl fields taken as they are (a number, or absent / null: not sent).
PLAIN = ("accuracy", "loss", "round_seconds", "aggregate_seconds", "clients_ok", "clients_failed", "messages_ok", "messages_failed")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def round_figures(record: Mapping[str, Any], memory: Mapping[str, Any] | None = None) -> dict[str, float]:
    """A metrics.jsonl record's figures: server accuracy and loss, every metric the task returned
    (``task.<name>``), round and aggregation seconds, clients ok / failed / missing / rejected,
    peak concurrent workers (all devices, and ``workers_peak.<device>``), the clients' slot wait
    (max and mean), client-side evaluation when on, and, given the monitor's record of the round
    (memory_summary.json), the memory held after it (``memory_residual_mib``)."""
    figures: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            figures[name] = number

    for name in PLAIN:
        put(name, record.get(name))
    put("clients_missing", len(record.get("missing") or []))
    if "rejected" in record:  # updates the server refused (a list of them, or a count)
        rejected = record["rejected"]
        put("clients_rejected", len(rejected) if isinstance(rejected, list) else rejected)
    put("trained", bool(record.get("trained")))
    for name, value in (record.get("metrics") or {}).items():
        if name != "accuracy":
            put(f"task.{name}", value)
    peaks = record.get("concurrent_workers_peak") or {}
    if peaks:
        put("workers_peak", max(peaks.values()))
        for device, value in peaks.items():
            put(f"workers_peak.{device}", value)
    waits = [c["slot_wait_seconds"] for c in record.get("clients") or [] if _number(c.get("slot_wait_seconds")) is not None]
    if waits:
        put("slot_wait_seconds_max", max(waits))
        put("slot_wait_seconds_mean", sum(waits) / len(waits))
    evaluated = record.get("client_eval") or {}
    put("client_eval.accuracy", evaluated.get("accuracy"))
    put("client_eval.loss", evaluated.get("loss"))
    if memory:
        put("memory_residual_mib", memory.get("residual_mib"))
        put("memory_peak_mib", memory.get("peak_mib"))
    return figures


def initial_figures(folder: Path) -> dict[str, float]:
    """The seeded model's evaluation before round 1 (state.json's ``initial``), shown as step 0."""
    try:
        initial = json.loads((Path(folder) / "state.json").read_text()).get("initial") or {}
    except (OSError, ValueError):
        return {}
    return {key: float(initial[key]) for key in ("accuracy", "loss") if _number(initial.get(key)) is not None}


def version_of(package: str) -> str:
    """An installed package's version from its metadata (without importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_params(settings: Mapping[str, Any], task: Mapping[str, Any], engine_mode: str) -> dict[str, str]:
    """A run's parameters: every setting of the server (task, strategy, its arguments, training
    settings, ...), the task's resolved file and hash, the engine mode and the versions of flwr
    and torch. Values as text (MLflow's parameters are text), dicts as JSON."""
    params = {
        key: json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        for key, value in settings.items()
    }
    params.update(
        {
            "task.path": str(task.get("path")),
            "task.sha256": str(task.get("sha256")),
            "engine_mode": engine_mode,
            "version.flwr": version_of("flwr"),
            "version.torch": version_of("torch"),
            "version.bouquet": version_of("bouquet"),
        }
    )
    return params

"""Describe the machine a benchmark ran on, so a table is never read without its context."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil


def describe(label: str | None, gpu_name: str | None) -> dict[str, Any]:
    cpus = os.cpu_count() or 0
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = psutil.virtual_memory().total / 2**30
    default_label = f"{cpus}-core CPU machine, " + (f"GPU {gpu_name}" if gpu_name else "no GPU")
    return {
        "label": label or default_label,
        "cpus": cpus,
        "cpu_model": model,
        "memory_gib": memory_gib,
        "gpu": gpu_name,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_start": load(),
    }


def load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("flwr", "torch", "numpy", "psutil"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found

"""Settings for every Bouquet entry point, from CLI flags and ``FL_*`` environment variables.

Each setting is declared once (name, parser, default, help); its flag and environment
variable derive from the name. Everything is parsed and validated before any process,
socket or folder is created, and a bad value ends the program with exit code 2 and one
line naming the setting, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

from services.admission.slots import MAX_SLOTS

EXIT_BAD_SETTING = 2

DATASETS = ("digits", "cifar10", "synthetic")
MODELS = ("auto", "digits-cnn", "cifar-cnn", "resnet18")
PARTITIONINGS = ("iid", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")
WORKER_STARTS = ("spawn", "forkserver", "inprocess")


class SettingError(ValueError):
    """A setting has a value the program cannot run with."""


# --- parsers: each takes the raw string and returns the value or raises ValueError("allowed") --


def _number(raw: str, convert: Callable[[str], Any], acceptable: Callable[[Any], bool], allowed: str) -> Any:
    try:
        value = convert(raw)
    except ValueError:
        raise ValueError(allowed) from None
    if not acceptable(value):  # also refuses nan (every comparison with nan is false) and inf
        raise ValueError(allowed)
    return value


def positive_int(raw: str) -> int:
    return _number(raw, int, lambda v: v >= 1, "must be an integer >= 1")


def non_negative_int(raw: str) -> int:
    return _number(raw, int, lambda v: v >= 0, "must be an integer >= 0")


def positive_float(raw: str) -> float:
    return _number(raw, float, lambda v: 0 < v < float("inf"), "must be a number > 0")


def non_negative_float(raw: str) -> float:
    return _number(raw, float, lambda v: 0 <= v < float("inf"), "must be a number >= 0")


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        return _number(raw, int, lambda v: v >= minimum, f"must be an integer >= {minimum}")

    return parse


def fraction(raw: str) -> float:
    return _number(raw, float, lambda v: 0 < v <= 1, "must be a number in (0, 1]")


def comma_list(parse: Callable[[str], Any], allowed: str) -> Callable[[str], list]:
    """'2,5,10' -> [2, 5, 10], each item parsed and checked, repeats dropped (script options)."""

    def parse_list(raw: str) -> list:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items:
            raise ValueError(f"must be a comma-separated list of {allowed}")
        try:
            values = [parse(item) for item in items]
        except ValueError as problem:
            raise ValueError(f"must be a comma-separated list of {allowed} ({problem})") from None
        return list(dict.fromkeys(values))

    return parse_list


def worker_slots(raw: str) -> str | int:
    """auto, unlimited, or a number of slots per device."""
    if raw in ("auto", "unlimited"):
        return raw
    return _number(raw, int, lambda v: 1 <= v <= MAX_SLOTS, f"must be auto, unlimited or an integer in 1-{MAX_SLOTS}")


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of true/false, 1/0, yes/no, on/off")


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of: {', '.join(allowed)}")
        return raw

    return parse


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def address(raw: str) -> str:
    """host:port, [ipv6]:port; the host is an IP address or a DNS name."""
    allowed = "must be HOST:PORT (e.g. 0.0.0.0:8080, server:8080, [::]:8080) with PORT in 1-65535"
    match = re.fullmatch(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]+):(?P<port2>\d+)", raw)
    if not match:
        raise ValueError(allowed)
    port = int(match.group("port") or match.group("port2"))
    if not 1 <= port <= 65535:
        raise ValueError(allowed)
    if match.group("v6"):
        try:
            ipaddress.IPv6Address(match.group("v6"))
        except ValueError:
            raise ValueError(allowed) from None
    elif not _HOSTNAME.match(match.group("host")):
        raise ValueError(allowed)
    return raw


def identifier(raw: str) -> str:
    """A name that is safe as a folder name and in logs (run ids, client ids)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", raw):
        raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
    return raw


def path(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must be a non-empty path")
    return raw


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An empty string means 'not set' (lets .env files leave a value blank)."""

    def parse_optional(raw: str) -> Any:
        return None if raw == "" else parse(raw)

    return parse_optional


# --- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "FL_" + self.name.upper()


def task_reference(raw: str) -> str:
    """builtin, a path to a .py file, or an importable module name (checked in a worker at start)."""
    if raw == "builtin" or raw.endswith(".py") or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", raw):
        return raw
    raise ValueError("must be builtin, a path to a .py file, or an importable module name (e.g. mypackage.task)")


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")


def key_values(raw: str) -> dict[str, str]:
    """'a=1,b=0.5' -> {'a': '1', 'b': '0.5'}; the values are checked against the strategy later."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals or not re.fullmatch(r"[a-z_][a-z0-9_]*", key.strip()) or not value.strip():
            raise ValueError(f"must be key=value pairs separated by commas (e.g. proximal_mu=0.1), not {item!r}")
        out[key.strip()] = value.strip()
    return out


# Training settings the server sends to every client in each round's config.
TASK = [
    Setting("task", task_reference, "builtin", "what to train: builtin (--dataset / --model), a path to a Flower-style task.py (Net, load_data, train, test, optionally load_centralized_dataset), or an importable module name; imported only in workers"),
    Setting("dataset", choice(*DATASETS), "digits", "(builtin task) data set: digits (offline, 8x8), cifar10 (downloaded once into the data dir), synthetic (random tensors)"),
    Setting("model", choice(*MODELS), "auto", "(builtin task) model: auto picks digits-cnn for digits and cifar-cnn otherwise; resnet18 (untrained) for heavier GPU work"),
    Setting("local_epochs", positive_int, 2, "local epochs per round"),
    Setting("batch_size", positive_int, 16, "training batch size"),
    Setting("learning_rate", positive_float, 0.05, "SGD learning rate (momentum 0.9)"),
    Setting("partitioning", choice(*PARTITIONINGS), "iid", "(builtin task) how the training split is divided among clients"),
    Setting("dirichlet_alpha", positive_float, 0.5, "(builtin task) Dirichlet concentration for --partitioning dirichlet (smaller = more label skew)"),
    Setting("seed", non_negative_int, 0, "seed for model initialisation, partitioning and synthetic data"),
    Setting("synthetic_samples", at_least(10), 5000, "(builtin task) number of samples (3x32x32 images, 10 classes) of the synthetic data set, train + test"),
    Setting("worker_timeout", positive_float, 600.0, "seconds a training or evaluation worker may run before it is killed"),
]

# Settings of the process itself, shared by server and client.
LOCAL = [
    Setting("data_dir", path, "data", "folder for data caches (CIFAR-10 download, prepared arrays, partition indices), shared by all clients of a host"),
    Setting("device", choice(*DEVICES), "auto", "where workers compute: auto uses CUDA when available, else CPU"),
    Setting("torch_threads", non_negative_int, 0, "CPU threads per worker for torch (0: torch's default, one per core); with many replicas on a CPU host, 1 avoids oversubscription"),
    # forkserver by default: a fresh worker per round in ~0.1 s instead of seconds, with the same
    # per-round process and CUDA context; costs ~400 MiB host memory per idle client (docs/benchmarks.md).
    Setting("worker_start", choice(*WORKER_STARTS), "forkserver", "how workers start: forkserver (forked from this process's forkserver, spawned once with torch preloaded, never touching CUDA), spawn (a fresh interpreter per job: slower, least idle host memory), inprocess (no worker and no timeout: the memory problem, for comparison only)"),
    Setting("worker_slots", worker_slots, "auto", "workers that may run at once per device, counted over every replica and the server on this host (a shared slots folder): auto (GPU: free memory / one worker's measured need, at least 1; CPU: the cores the host gives the container), a number, or unlimited (no admission)"),
    Setting("worker_memory_mib", optional(positive_float), None, "GPU memory one worker needs (CUDA context + peak), in MiB; overrides what workers measured (unset: measured and remembered in the slots folder)"),
    Setting("slots_dir", optional(path), None, "folder of the slot lock files, shared by the server and every replica of a host (compose: the slots volume; unset: <data dir>/slots)"),
]

SERVER = [
    Setting("listen_address", address, "0.0.0.0:8080", "address the Flower gRPC server listens on"),
    Setting("rounds", positive_int, 5, "number of federated rounds"),
    Setting("min_clients", positive_int, 2, "clients that must be connected before round 1 starts"),
    Setting("join_grace", non_negative_float, 5.0, "after --min-clients are connected, keep admitting clients until every replica that started (announced on the shared data dir) has connected and none joined or left for this many seconds; their count becomes num-partitions (0: exactly the clients connected once --min-clients are)"),
    Setting("join_timeout", positive_float, 180.0, "seconds to wait for a replica that started but has not connected yet (while settling), and for --min-fit-clients partition holders to be connected before a round (e.g. while replicas restart)"),
    Setting("fraction_fit", fraction, 1.0, "fraction of partition-holding clients sampled for training each round"),
    Setting("min_fit_clients", positive_int, 2, "minimum clients sampled for training each round"),
    Setting("client_eval", boolean, False, "also evaluate on the clients after each round (off: server-side evaluation only; on by itself for a task without load_centralized_dataset)"),
    Setting("strategy", choice(*STRATEGIES), "fedavg", "Flower aggregation strategy"),
    Setting("strategy_args", key_values, {}, "the strategy's own hyper-parameters as key=value,... (e.g. proximal_mu=0.1 for fedprox), checked against its constructor"),
    Setting("results_dir", path, "results", "folder under which each run gets its own <run-id>/ folder"),
    Setting("run_id", optional(identifier), None, "name of this run's results folder (default: UTC timestamp + random suffix); with --resume auto an unfinished run of that name is continued, a completed one is never touched"),
    Setting("resume", choice("auto", "never"), "auto", "auto: continue an unfinished run (the one named by --run-id, else the newest in --results-dir with the same task settings) from its last checkpoint; never: always start a new run"),
    *TASK,
    *LOCAL,
]

CLIENT = [
    Setting("server_address", address, "server:8080", "address of the Flower server"),
    Setting("client_id", optional(identifier), None, "stable identity the server maps to a partition (default: the hostname)"),
    Setting("connect_timeout", positive_float, 120.0, "seconds to keep retrying (with backoff) until the server accepts connections"),
    *LOCAL,
]


def _report_and_exit(program: str, message: str) -> None:
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_SETTING)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on unknown flags already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _report_and_exit(self.prog, message)


def parse(
    settings: Sequence[Setting],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    program: str = "bouquet",
    description: str = "",
    validate: Callable[[SimpleNamespace], None] | None = None,
) -> SimpleNamespace:
    """Flags override environment variables, which override defaults. Exits 2 on a bad value."""
    environ = os.environ if environ is None else environ
    parser = _ArgumentParser(prog=program, description=description)
    for setting in settings:
        default = "" if setting.default is None else setting.default
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            metavar=setting.name.upper(),
            help=f"{setting.help} [env {setting.env}, default {default!s}]",
        )
    raw = parser.parse_args(argv)
    values = {}
    for setting in settings:
        from_flag = getattr(raw, setting.name)
        source, text = (setting.flag, from_flag) if from_flag is not None else (setting.env, environ.get(setting.env))
        if text is None:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(text)
        except ValueError as allowed:
            label = f"{setting.flag} / {setting.env}"
            _report_and_exit(program, f"{label} = {text!r} (from {source}): {allowed}")
    namespace = SimpleNamespace(**values)
    if validate is not None:
        try:
            validate(namespace)
        except SettingError as problem:
            _report_and_exit(program, str(problem))
    return namespace


def as_text(value: Any) -> str:
    """A parsed value back as the text its parser accepts (to pass settings on as flags)."""
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_dict(values: SimpleNamespace) -> dict[str, Any]:
    return dict(vars(values))


# --- the memory monitor (services.monitor) ------------------------------------------------------

MONITOR_SOURCES = ("auto", "nvml", "host")
MONITOR_SCOPES = ("host", "launcher")


def port(raw: str) -> int:
    return _number(raw, int, lambda v: 1 <= v <= 65535, "must be a TCP port, an integer in 1-65535")


def sample_interval(raw: str) -> float:
    """Rounds of small models last seconds; a sample every minute would miss whole rounds."""
    return _number(raw, float, lambda v: 0.01 <= v <= 60, "must be a number of seconds in [0.01, 60]")


MONITOR = [
    Setting("results_dir", path, "results", "folder that holds the run folders (the server's --results-dir)"),
    Setting("run_id", optional(identifier), None, "run folder to record; unset: the newest run under --results-dir that is still running and not yet recorded"),
    Setting("monitor_interval", sample_interval, 0.2, "seconds between samples"),
    Setting("monitor_source", choice(*MONITOR_SOURCES), "auto", "what to sample: nvml (GPU memory; fails without a GPU), host (PSS of the run's processes, RSS where PSS is unreadable), auto (nvml when a GPU is visible, else host)"),
    Setting("monitor_scope", choice(*MONITOR_SCOPES), "host", "which processes are the run's: host (every services.server/services.client process on the host and their children; containers with pid: host) or launcher (only those started by the monitor's parent, as scripts/run_local.py does)"),
    Setting("docker_socket", optional(path), "/var/run/docker.sock", "Docker API socket used read-only to name containers (empty: do not ask Docker)"),
    Setting("metrics_port", optional(port), None, "serve Prometheus metrics on this port (unset: off)"),
    Setting("residual_tolerance_mib", non_negative_float, 64.0, "memory a round may leave held above baseline (MiB per replica) and still count as returned"),
    Setting("run_wait", positive_float, 600.0, "seconds to wait for the run folder to appear before giving up"),
]

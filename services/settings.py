"""Settings for every Bouquet program, from CLI flags and ``FL_*`` environment variables.

Each program's settings are a frozen dataclass (``ServerSettings``, ``ClientSettings``,
``MonitorSettings``; the launcher, preflight and benchmark scripts declare theirs next to
them) composed from shared groups (``TaskSettings``, ``LocalSettings``). Every field is
declared once, with its type, parser, default and help; its flag and environment variable
derive from the field's name. ``parse`` returns that program's object, checked before any
process, socket or folder is created: a bad value ends the program with exit code 2 and one
line naming the setting, the value and what is allowed.

How to add a setting
--------------------
1. Add a field to the group or program class whose programs read it::

       worker_memory_mib: float | None = setting(optional(positive_float), None, "GPU memory one worker needs, in MiB (unset: measured)")

   ``--worker-memory-mib`` and ``FL_WORKER_MEMORY_MIB`` derive from the name. The parser takes
   the raw text and returns the field's type or raises ``ValueError("what is allowed")``: use the
   parsers below (``positive_int``, ``optional(...)``, ``choice(...)``, ...) or add one next to
   them. A default of ``None`` shows as "(unset)". For server and client both, put it on
   ``LocalSettings`` (or on a new group class that both program classes list as a base); on
   ``TaskSettings`` only what the server sends to the clients each round (``TaskSpec``).
2. Checks across several settings go in the program's ``validate`` (it returns the values,
   changed with ``dataclasses.replace`` where it converts one) and raise ``SettingError``.
3. Regenerate the settings table in ``docs/settings.md``: ``.venv/bin/python scripts/settings_table.py``
   prints it; paste it over the old one (a test checks that the file holds exactly this table).
   Compose passes ``FL_*`` variables to the services that declare them (``tests/test_compose.py``).

A script's options (``benchmarks/bench.py``) are a class too, based on ``CommandLineOnly`` (flags
only); it takes a setting of the services with ``reuse(Group, "name", default=...)``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

from services.net import split_address

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # a dotted Python module name
MAX_SLOTS = 64  # per device (FL_WORKER_SLOTS at most): the lock files services.admission.slots keeps per device

EXIT_BAD_SETTING = 2

DATASETS = ("digits", "cifar10", "synthetic")
MODELS = ("auto", "digits-cnn", "cifar-cnn", "resnet18")
PARTITIONINGS = ("iid", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")
WORKER_STARTS = ("spawn", "forkserver", "inprocess")
WORKER_POOLS = ("host", "replica")
IDENTITY_SOURCES = ("hostname", "container")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")
MONITOR_SOURCES = ("auto", "nvml", "host")
MONITOR_SCOPES = ("host", "launcher")
MODES = ("task", "app")

T = TypeVar("T")
P = TypeVar("P")


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


def comma_list(parse: Callable[[str], T], allowed: str) -> Callable[[str], list[T]]:
    """'2,5,10' -> [2, 5, 10], each item parsed and checked, repeats dropped (script options)."""

    def parse_list(raw: str) -> list[T]:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items:
            raise ValueError(f"must be a comma-separated list of {allowed}")
        try:
            values = [parse(item) for item in items]
        except ValueError as problem:
            raise ValueError(f"must be a comma-separated list of {allowed} ({problem})") from None
        return list(dict.fromkeys(values))

    return parse_list


def module_name(raw: str) -> str:
    """A Python module that this environment has (its top-level package found without importing it)."""
    if not MODULE_NAME.fullmatch(raw):
        raise ValueError(f"{raw!r} is not a module name")
    if importlib.util.find_spec(raw.split(".")[0]) is None:
        raise ValueError(f"no module named {raw.split('.')[0]!r} in this Python environment")
    return raw


def slot_count(raw: str) -> str | int:
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


def address(raw: str) -> str:
    """host:port, [ipv6]:port; the host is an IP address or a DNS name (services.net parses it)."""
    split_address(raw)
    return raw


def ip_address(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None


def identifier(raw: str) -> str:
    """A name that is safe as a folder name and in logs (run ids, client ids)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", raw):
        raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
    return raw


def path(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must be a non-empty path")
    return raw


def experiment_name(raw: str) -> str:
    """An MLflow experiment name: any text, but not blank (MLflow refuses an empty name)."""
    if not raw.strip():
        raise ValueError("must be a non-empty name")
    return raw


def optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    """An empty string means 'not set' (lets .env files leave a value blank)."""

    def parse_optional(raw: str) -> T | None:
        return None if raw == "" else parse(raw)

    return parse_optional


def task_reference(raw: str) -> str:
    """builtin, a path to a .py file, or an importable module name (checked in a worker at start)."""
    if raw == "builtin" or raw.endswith(".py") or MODULE_NAME.fullmatch(raw):
        return raw
    raise ValueError("must be builtin, a path to a .py file, or an importable module name (e.g. mypackage.task)")


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


def secret(raw: str) -> str:
    """A shared secret (the join token): long enough not to be guessed; never shown back
    (``as_dict`` writes it as "(set)")."""
    if len(raw.strip()) < 16 or raw != raw.strip():
        raise ValueError("must be at least 16 characters without surrounding whitespace (e.g. python -c 'import secrets; print(secrets.token_hex(32))'); value not shown")
    return raw


optional_secret = optional(secret)


def is_secret(item: "Setting") -> bool:
    return item.parse in (secret, optional_secret)


def port(raw: str) -> int:
    return _number(raw, int, lambda v: 1 <= v <= 65535, "must be a TCP port, an integer in 1-65535")


def http_url(raw: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", raw):
        raise ValueError("must be an http://HOST:PORT URL")
    return raw


def sample_interval(raw: str) -> float:
    """Rounds of small models last seconds; a sample every minute would miss whole rounds."""
    return _number(raw, float, lambda v: 0.01 <= v <= 60, "must be a number of seconds in [0.01, 60]")


# --- the declaration mechanism -------------------------------------------------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Setting:
    """One declared setting as the parser, the help and the settings table (docs/settings.md) see it."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    repeat: bool = False  # the flag may be given several times; the value is the list

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def env(self) -> str:
        return "FL_" + self.name.upper()


_META = "bouquet.setting"


def _field(parse: Callable[[str], Any], default: Any, help: str, repeat: bool) -> Any:
    meta = {_META: (parse, help, repeat)}
    shown = parse not in (secret, optional_secret)  # a secret stays out of repr(settings), hence out of any log or traceback that prints them
    if isinstance(default, (list, dict)):  # a fresh copy per object, as dataclasses require
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=meta, repr=shown)
    return dataclasses.field(default=default, metadata=meta, repr=shown)


def setting(parse: Callable[[str], T], default: T, help: str) -> T:
    """A field of a settings class: its flag and FL_ variable derive from the field's name; the
    parser returns the field's type (a type checker compares it with the annotation)."""
    return _field(parse, default, help, repeat=False)


def repeated(parse: Callable[[str], T], default: list[T], help: str) -> list[T]:
    """A flag that may be given several times (``--set a --set b``): the list of its values,
    replacing ``default`` (scripts only: no environment variable)."""
    return _field(parse, default, help, repeat=True)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def reuse(group: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """``group``'s setting ``name`` (parser and help declared there) on another class, with
    another default if given: how scripts take a setting of the services with their own default."""
    original = next(f for f in dataclasses.fields(group) if f.name == name and _META in f.metadata)
    parse, help, repeat = original.metadata[_META]
    return _field(parse, _default(original) if default is dataclasses.MISSING else default, help, repeat)


def declared(kind: type, defaults: Mapping[str, Any] | None = None) -> list[Setting]:
    """The settings of a program or group class: its own first, then each base's in the order
    the class lists them (the order of ``--help`` and of the settings table in docs/settings.md)."""
    fields = {f.name: f for f in dataclasses.fields(kind) if _META in f.metadata}
    unknown = set(defaults or {}) - set(fields)
    if unknown:
        raise KeyError(f"{kind.__name__} has no setting {', '.join(sorted(unknown))}")
    order: list[str] = []

    def walk(cls: type) -> None:
        order.extend(name for name in vars(cls).get("__annotations__", {}) if name in fields and name not in order)
        for base in cls.__bases__:
            walk(base)

    walk(kind)
    out = []
    for name in order:
        parse, help, repeat = fields[name].metadata[_META]
        out.append(Setting(name, parse, (defaults or {}).get(name, _default(fields[name])), help, repeat))
    return out


def values_of(values: Any, group: type) -> dict[str, Any]:
    """The values of ``group``'s settings, read from any object that has them."""
    return {s.name: getattr(values, s.name) for s in declared(group)}


def as_text(value: Any) -> str:
    """A parsed value back as the text its parser accepts (to pass settings on as flags)."""
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def as_flags(values: Any, names: Sequence[str] | None = None) -> list[str]:
    """The flags that give another program these values (unset ones left out)."""
    out = []
    for item in declared(type(values)):
        value = getattr(values, item.name)
        if (names is None or item.name in names) and value is not None:
            out += [item.flag, as_text(value)]
    return out


def as_dict(values: Any) -> dict[str, Any]:
    """The values as recorded (summary.json): a secret only as "(set)"."""
    return {item.name: _shown(item, getattr(values, item.name)) for item in declared(type(values))}


def _shown(item: Setting, value: Any) -> Any:
    return "(set)" if is_secret(item) and value is not None else value


def _report_and_exit(program: str, message: str) -> None:
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_SETTING)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on unknown flags already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _report_and_exit(self.prog, message)


class CommandLineOnly:
    """Base of a script's options class: flags only, no FL_ variables (a benchmark's --rounds
    must not pick up the FL_ROUNDS meant for the server)."""

    FROM_ENVIRONMENT: ClassVar[bool] = False


def _environment(kind: type, environ: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """The variables ``kind`` reads (None: a script's, it reads none)."""
    if not getattr(kind, "FROM_ENVIRONMENT", True):
        return None
    return os.environ if environ is None else environ


def _value(item: Setting, from_flag: Any, environ: Mapping[str, str] | None, program: str) -> Any:
    """Flag, else environment variable (``environ`` None: the program reads none), else default."""
    label = item.flag if environ is None or item.repeat else f"{item.flag} / {item.env}"
    if from_flag is not None:
        texts, source = (from_flag if item.repeat else [from_flag]), item.flag
    elif environ is not None and item.env in environ and not item.repeat:
        texts, source = [environ[item.env]], item.env
    else:
        return item.default
    values = []
    for text in texts:
        try:
            values.append(item.parse(text))
        except ValueError as allowed:
            where = "" if environ is None else f" (from {source})"
            shown = "(hidden)" if is_secret(item) else repr(text)
            _report_and_exit(program, f"{label} = {shown}{where}: {allowed}")
    return values if item.repeat else values[0]


def _add(parser: argparse.ArgumentParser, item: Setting, help: str) -> None:
    options: dict[str, Any] = {"dest": item.name, "default": None, "metavar": item.name.upper(), "help": help}
    if item.repeat:
        options["action"] = "append"
    elif item.parse is boolean:  # a bare --flag means true
        options.update(nargs="?", const="true")
    parser.add_argument(item.flag, **options)


def parse(
    kind: type[P],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    program: str = "bouquet",
    description: str = "",
    validate: Callable[[P], P] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> P:
    """The program's settings object: flags override environment variables (where ``kind``
    reads them), which override ``defaults``, then the declared defaults. Exits 2 on a bad value."""
    environ = _environment(kind, environ)
    items = declared(kind, defaults)
    parser = _ArgumentParser(prog=program, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for item in items:
        told = [] if environ is None or item.repeat else [f"env {item.env}"]
        if item.default not in (None, []):  # unset: the help says what that means
            told.append(f"default {as_text(item.default) if isinstance(item.default, list) else item.default}")
        _add(parser, item, item.help + (f" [{', '.join(told)}]" if told else ""))
    raw = parser.parse_args(argv)
    values = kind(**{item.name: _value(item, getattr(raw, item.name), environ, program) for item in items})
    if validate is not None:
        try:
            values = validate(values)
        except SettingError as problem:
            _report_and_exit(program, str(problem))
    return values


def peek(kind: type, name: str, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, program: str = "bouquet") -> Any:
    """One setting's value before the others are parsed (a program whose defaults depend on it)."""
    item = next(s for s in declared(kind) if s.name == name)
    environ = _environment(kind, environ)
    parser = _ArgumentParser(prog=program, add_help=False, allow_abbrev=False)
    _add(parser, item, item.help)
    known, _ = parser.parse_known_args(argv)
    return _value(item, getattr(known, name), environ, program)


# --- the groups and the services' programs ----------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TaskSource:
    """Which task is trained."""

    task: str = setting(task_reference, "builtin", "what to train: builtin (--dataset / --model), a path to a Flower-style task.py (Net, load_data, train, test, optionally load_centralized_dataset), or an importable module name; imported only in workers")
    dataset: str = setting(choice(*DATASETS), "digits", "(builtin task) data set: digits (offline, 8x8), cifar10 (downloaded once into the data dir), synthetic (random tensors)")
    model: str = setting(choice(*MODELS), "auto", "(builtin task) model: auto picks digits-cnn for digits and cifar-cnn otherwise; resnet18 (untrained) for heavier GPU work")


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """How it is trained (the benchmark takes these with its own defaults)."""

    local_epochs: int = setting(positive_int, 2, "local epochs per round")
    batch_size: int = setting(positive_int, 16, "training batch size")
    learning_rate: float = setting(positive_float, 0.05, "SGD learning rate (momentum 0.9)")
    partitioning: str = setting(choice(*PARTITIONINGS), "iid", "(builtin task) how the training split is divided among clients")
    dirichlet_alpha: float = setting(positive_float, 0.5, "(builtin task) Dirichlet concentration for --partitioning dirichlet (smaller = more label skew)")
    seed: int = setting(non_negative_int, 0, "seed for model initialisation, partitioning and synthetic data")
    synthetic_samples: int = setting(at_least(10), 5000, "(builtin task) number of samples (3x32x32 images, 10 classes) of the synthetic data set, train + test")
    worker_timeout: float = setting(positive_float, 600.0, "seconds a training or evaluation worker may run before it is killed")


@dataclass(frozen=True, kw_only=True)
class TaskSettings(TaskSource, TrainingSettings):
    """The task: what the server sends to every client in each round's config
    (``services.taskspec.TaskSpec`` is this, resolved), and what the benchmark's engines all get."""


@dataclass(frozen=True, kw_only=True)
class LocalSettings:
    """Settings of the process itself, shared by server and client."""

    data_dir: str = setting(path, "data", "folder for data caches (CIFAR-10 download, prepared arrays, partition indices), shared by all clients of a host")
    device: str = setting(choice(*DEVICES), "auto", "where workers compute: auto uses CUDA when available, else CPU")
    torch_threads: int = setting(non_negative_int, 0, "CPU threads per worker for torch (0: torch's default, one per core); with many replicas on a CPU host, 1 avoids oversubscription")
    tls_dir: str | None = setting(optional(path), None, "folder of TLS files for the gRPC connection (scripts/make_certs.py makes one): the server reads ca.crt, server.crt and server.key, a client ca.crt; unset: plaintext (fine inside one compose network, not across hosts)")
    # forkserver by default: a fresh worker per round in ~0.1 s instead of seconds, with the same
    # per-round process and CUDA context; costs ~400 MiB host memory per idle client (docs/benchmarks.md).
    worker_start: str = setting(choice(*WORKER_STARTS), "forkserver", "how workers start: forkserver (forked from this process's forkserver, spawned once with torch preloaded, never touching CUDA), spawn (a fresh interpreter per job: slower, least idle host memory), inprocess (no worker and no timeout: the memory problem, for comparison only)")
    worker_preload: list[str] | None = setting(optional(comma_list(module_name, "module names")), None, "more modules the warm process imports once, before it forks any worker (e.g. torchvision,datasets): a worker then starts without importing them; the messages' records (imported_after_fork) and the node's log name what a ClientApp imported after the fork; never a module that touches CUDA at import")
    worker_slots: str | int = setting(slot_count, "auto", "workers that may run at once per device, counted over every replica and the server on this host (a shared slots folder): auto (GPU: free memory / one worker's measured need, at least 1; CPU: the cores the host gives the container), a number, or unlimited (no admission)")
    worker_memory_mib: float | None = setting(optional(positive_float), None, "GPU memory one worker needs (CUDA context + peak), in MiB; overrides what workers measured (unset: measured and remembered in the slots folder)")
    slots_dir: str | None = setting(optional(path), None, "folder of the slot lock files, shared by the server and every replica of a host (compose: the slots volume; unset: <data dir>/slots)")
    worker_pool: str = setting(choice(*WORKER_POOLS), "replica", "who forks the forkserver workers (FL_WORKER_START=forkserver): host (the host's one worker pool, python -m services.pool, imported torch once for every replica; compose and scripts/run_local.py start it) or replica (a warm process of this replica's own: for a replica with a host of its own)")
    worker_pool_socket: str | None = setting(optional(path), None, "(FL_WORKER_POOL=host) the host worker pool's Unix socket, in a folder only this deployment's services mount (unset: <slots folder>/pool/pool.sock)")
    worker_pool_wait: float = setting(positive_float, 120.0, "(FL_WORKER_POOL=host) seconds a starting replica or server waits for the worker pool to answer before it gives up")


@dataclass(frozen=True, kw_only=True)
class JoinSettings:
    """Who may join: a secret the server and every client hold (services.joining)."""

    join_token: str | None = setting(optional_secret, None, "secret a client must hold to join (the server checks it by challenge-response; it never travels); the same on the server and every client; unset on the server: any client that reaches the port may join")
    join_token_file: str | None = setting(optional(path), None, "file holding the join token (first line), instead of --join-token: keeps it out of the environment that `docker inspect` shows (compose: written once per deployment into the secrets volume; Kubernetes: a Secret)")


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Which engine runs the federation; the server and client commands hand over to app mode's
    programs (``services.appmode``) when it says so, so compose keeps one command per service."""

    mode: str = setting(choice(*MODES), "task", "task: Bouquet's own server trains FL_TASK (Flower's gRPC runtime on :8080); app: a Flower App on Flower's Deployment Engine (the server runs the SuperLink on :8080, every client replica one SuperNode, every ClientApp message in a fresh admitted worker)")


@dataclass(frozen=True, kw_only=True)
class ServerSettings(EngineSettings, TaskSettings, LocalSettings, JoinSettings):
    """``python -m services.server``."""

    listen_address: str = setting(address, "0.0.0.0:8080", "address the Flower gRPC server listens on")
    rounds: int = setting(positive_int, 5, "number of federated rounds")
    min_clients: int = setting(positive_int, 2, "clients that must be connected before round 1 starts")
    join_grace: float = setting(non_negative_float, 5.0, "after --min-clients are connected, keep admitting clients until every replica that started (announced on the shared data dir) has connected and none joined or left for this many seconds; their count becomes num-partitions (0: exactly the clients connected once --min-clients are)")
    join_timeout: float = setting(positive_float, 180.0, "seconds to wait for a replica that started but has not connected yet (while settling), and for --min-fit-clients partition holders to be connected before a round (e.g. while replicas restart)")
    fraction_fit: float = setting(fraction, 1.0, "fraction of partition-holding clients sampled for training each round")
    min_fit_clients: int = setting(positive_int, 2, "minimum clients sampled for training each round")
    client_eval: bool = setting(boolean, False, "also evaluate on the clients after each round (off: server-side evaluation only; on by itself for a task without load_centralized_dataset)")
    strategy: str = setting(choice(*STRATEGIES), "fedavg", "Flower aggregation strategy")
    # key=value text as parsed; the server's validate converts the values to the strategy's types
    strategy_args: dict[str, Any] = setting(key_values, {}, "the strategy's own hyper-parameters as key=value,... (e.g. proximal_mu=0.1 for fedprox), checked against its constructor")
    results_dir: str = setting(path, "results", "folder under which each run gets its own <run-id>/ folder")
    run_id: str | None = setting(optional(identifier), None, "name of this run's results folder (default: UTC timestamp + random suffix); with --resume auto an unfinished run of that name is continued, a completed one is never touched")
    max_update_norm: float | None = setting(optional(positive_float), None, "largest L2 distance (over the model's floating-point arrays) a client's update may move the model; a farther update is clipped to it and recorded (unset: no bound)")
    resume: str = setting(choice("auto", "never"), "auto", "auto: continue an unfinished run (the one named by --run-id, else the newest in --results-dir with the same task settings) from its last checkpoint; never: always start a new run")
    mlflow_experiment: str = setting(experiment_name, "bouquet", "MLflow experiment each run is recorded in as one MLflow run, when MLflow's own MLFLOW_TRACKING_URI is set (unset: no MLflow)")
    mlflow_optional: bool = setting(boolean, False, "with MLFLOW_TRACKING_URI set: true records the run in MLflow only when the URI's host name resolves at start (compose sets it, so that its tracking profile turns MLflow on and off), false always records it")
    tensorboard: bool = setting(boolean, True, "write TensorBoard event files into the run folder's tensorboard/ (tensorboard --logdir <results dir> shows every run)")
    server_metrics_port: int | None = setting(optional(port), None, "serve the server's round figures (round, accuracy, loss, round seconds, clients by outcome) to Prometheus on this port (unset: off)")
    tracking_flush_timeout: float = setting(non_negative_float, 60.0, "seconds the server waits at the end for MLflow to take what it has not sent yet; what is left stays in the run folder and python -m services.tracking <run folder> sends it later")


@dataclass(frozen=True, kw_only=True)
class ClientSettings(EngineSettings, LocalSettings, JoinSettings):
    """``python -m services.client``: no training settings, the server sends them."""

    server_address: str = setting(address, "server:8080", "address of the Flower server")
    client_id: str | None = setting(optional(identifier), None, "stable identity the server maps to a partition (default: from --identity-source)")
    identity_source: str = setting(choice(*IDENTITY_SOURCES), "hostname", "where the identity comes from when --client-id is unset: hostname (a compose replica's container id, a Kubernetes pod's name), or container (the hostname plus a random id kept in the container's own files: stable across restarts of that container, new for a new one; for replicas that share a hostname, e.g. network_mode: host)")
    connect_timeout: float = setting(positive_float, 120.0, "seconds to keep retrying (with backoff) until the server accepts connections")
    host_name: str | None = setting(optional(identifier), None, "(task mode) name of the machine (Docker host) this replica runs on, recorded with every round it trains (metrics.jsonl, summary.json's partitions_by_host); Swarm sets it to {{.Node.Hostname}}; unset: not recorded")


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """``python -m services.pool``: the host's one warm process that forks every replica's workers."""

    mode: str = reuse(EngineSettings, "mode")

    data_dir: str = reuse(LocalSettings, "data_dir")
    slots_dir: str | None = reuse(LocalSettings, "slots_dir")
    worker_pool_socket: str | None = reuse(LocalSettings, "worker_pool_socket")
    worker_preload: list[str] | None = reuse(LocalSettings, "worker_preload")
    worker_pool_lifetime: str = setting(choice("askers", "forever"), "askers", "askers: the pool exits (code 0) once every server and replica that used it has gone and no worker runs, so compose's up ends with the run; forever: until it is stopped")


@dataclass(frozen=True, kw_only=True)
class MonitorSettings:
    """``python -m services.monitor``: the memory recorder."""

    results_dir: str = setting(path, "results", "folder that holds the run folders (the server's --results-dir)")
    run_id: str | None = setting(optional(identifier), None, "run folder to record; unset: the newest run under --results-dir that is still running and not yet recorded")
    monitor_interval: float = setting(sample_interval, 0.2, "seconds between samples")
    monitor_source: str = setting(choice(*MONITOR_SOURCES), "auto", "what to sample: nvml (GPU memory; fails without a GPU), host (PSS of the run's processes, RSS where PSS is unreadable), auto (nvml when a GPU is visible, else host)")
    monitor_scope: str = setting(choice(*MONITOR_SCOPES), "host", "which processes are the run's: host (every services.server/services.client process on the host and their children; containers with pid: host) or launcher (only those started by the monitor's parent, as scripts/run_local.py does)")
    run_volume: str | None = setting(optional(path), None, "(host scope) a folder every process of the run mounts, mounted here too (compose: the data volume): only processes that see this very folder are recorded, so another deployment on the host stays out; unset: every Bouquet process on the host")
    docker_api: str | None = setting(optional(http_url), None, "URL of the inspect-only Docker API proxy (compose: http://docker-names:2375 with COMPOSE_PROFILES=names) to name compose replicas client-1, client-2, ...; unset: replicas are named by their hostnames, and Docker is never asked")
    metrics_port: int | None = setting(optional(port), None, "serve Prometheus metrics on this port (unset: off)")
    residual_tolerance_mib: float = setting(non_negative_float, 64.0, "memory a round may leave held above baseline (MiB per replica) and still count as returned")
    run_wait: float = setting(positive_float, 600.0, "seconds to wait for the run folder to appear before giving up")


@dataclass(frozen=True, kw_only=True)
class LinkSettings(EngineSettings):
    """``python -m services.appmode.link`` (the server in app mode): settles the federation, runs the SuperLink."""

    listen_address: str = reuse(ServerSettings, "listen_address")
    min_clients: int = reuse(ServerSettings, "min_clients")
    join_grace: float = reuse(ServerSettings, "join_grace")
    join_timeout: float = reuse(ServerSettings, "join_timeout")
    data_dir: str = reuse(LocalSettings, "data_dir")
    tls_dir: str | None = reuse(LocalSettings, "tls_dir")
    results_dir: str = reuse(ServerSettings, "results_dir")
    max_update_norm: float | None = reuse(ServerSettings, "max_update_norm")
    control_address: str = setting(address, "0.0.0.0:9095", "(app mode) address of the front's private Control listener (submit, flwr run, flwr ls), served only to requests that carry the submit token; never publish it beyond the hosts that submit (compose: inside the compose network; docker-compose.publish.yml: 127.0.0.1)")
    submit_token_file: str | None = setting(optional(path), None, "(app mode) file holding the submit token (first line): the secret that Control asks of submit and of your own flwr (compose: written once per deployment into the submit-secret volume, which only the server and submit mount); unset on the server: no Control listener at all")
    worker_timeout: float = reuse(TrainingSettings, "worker_timeout")  # the job's time budget: how long the ServerApp waits for a reply
    server_metrics_port: int | None = reuse(ServerSettings, "server_metrics_port")
    serverapp_gpus: bool = setting(boolean, False, "(app mode) let the ServerApp process see the GPUs (off: CUDA_VISIBLE_DEVICES is empty for it, so a ServerApp that evaluates centrally does it on the CPU and holds no GPU memory for the whole run)")


@dataclass(frozen=True, kw_only=True)
class NodeSettings(ClientSettings):
    """``python -m services.appmode.node`` (a client replica in app mode): one SuperNode whose
    ClientApp messages run in admitted workers forked from this replica's warm process."""

    worker_timeout: float = reuse(TrainingSettings, "worker_timeout")


@dataclass(frozen=True, kw_only=True)
class SubmitSettings(EngineSettings):
    """``python -m services.appmode.submit``: run a Flower App on the SuperLink, report its real outcome."""

    app: str = setting(path, "app", "(app mode) folder of the Flower App to run (its pyproject.toml has [tool.flwr.app]; compose: the task folder)")
    app_run_config: str | None = setting(optional(str), None, "(app mode) the run config overrides passed to flwr run --run-config, as \"key=value key2=value2\" (TOML values)")
    server_address: str = reuse(ClientSettings, "server_address")
    submit_token_file: str | None = reuse(LinkSettings, "submit_token_file")
    tls_dir: str | None = reuse(LocalSettings, "tls_dir")
    data_dir: str = reuse(LocalSettings, "data_dir")
    results_dir: str = reuse(ServerSettings, "results_dir")
    run_id: str | None = reuse(ServerSettings, "run_id")
    run_timeout: float = setting(positive_float, 3600.0, "(app mode) seconds the submitted run may take before it is stopped and reported failed")
    mlflow_experiment: str = reuse(ServerSettings, "mlflow_experiment")
    mlflow_optional: bool = reuse(ServerSettings, "mlflow_optional")
    tensorboard: bool = reuse(ServerSettings, "tensorboard")
    tracking_flush_timeout: float = reuse(ServerSettings, "tracking_flush_timeout")


# Views for the settings table (docs/settings.md), compose's variables and the tests.
SERVER = declared(ServerSettings)
CLIENT = declared(ClientSettings)
MONITOR = declared(MonitorSettings)
POOL = declared(PoolSettings)
LINK = declared(LinkSettings)
NODE = declared(NodeSettings)
SUBMIT = declared(SubmitSettings)

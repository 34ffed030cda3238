"""Run the federation on Flower's Deployment Engine: one ``flower-superlink``, one
``flower-supernode`` per client and ``flwr run`` of ``benchmarks/deployment_app`` (``run``) or
of any Flower App (``run_app``, benchmarks/appmode.py).

Everything listens on 127.0.0.1 with fresh ports, the CLI's FLWR_HOME is a folder of this
run (its config.toml names the SuperLink), telemetry is off and the SuperLink does not
install the app's dependencies (the app runs in this repository's environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks import deployment_config, processes
from services import lifetime
from services.net import free_port, wait_until_listening
from services.files import read_json_lines, tail
from services.taskspec import Placement, TaskSpec

APP_DIR = Path(__file__).resolve().parent / "deployment_app"


@dataclass
class DeploymentRun:
    """Outcome of one run: per-round records (Bouquet's metrics.jsonl fields)."""

    rounds: list[dict[str, Any]]


def _environment(flwr_home: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # flwr-serverapp / flwr-clientapp are started by name: they must be this environment's.
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def _write_cli_config(flwr_home: Path, port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def run(
    work_dir: Path,
    clients: int,
    rounds: int,
    spec: TaskSpec,
    placement: Placement,
    on_started: Callable[[list[int], list[int]], None] | None = None,
    timeout: float = 1800.0,
) -> DeploymentRun:
    """Run ``rounds`` rounds with ``clients`` SuperNodes; ``on_started(server_pids, client_pids)``
    is called once all processes run (the benchmark starts its memory sampler there). The apps
    train ``spec`` with ``placement``, the same objects Bouquet's workers get."""
    work_dir = work_dir.resolve()
    rounds_file = work_dir / "rounds.jsonl"
    config = deployment_config.run_config(clients, rounds, spec, placement, rounds_file)
    run_app(work_dir, APP_DIR, clients, config, lambda: len(_read_rounds(rounds_file)) >= rounds, on_started, timeout)
    return DeploymentRun(_read_rounds(rounds_file))


def run_app(
    work_dir: Path,
    app_dir: Path,
    clients: int,
    run_config: dict[str, Any],
    finished: Callable[[], bool] | None = None,
    on_started: Callable[[list[int], list[int]], None] | None = None,
    timeout: float = 1800.0,
    extra_env: dict[str, str] | None = None,
) -> None:
    """``flwr run`` of the Flower App in ``app_dir`` with ``run_config`` on one SuperLink and
    ``clients`` SuperNodes (node config ``partition-id`` / ``num-partitions``), stock Flower
    throughout. Returns once ``finished()`` is true, or (``finished`` None) once ``flwr run``
    exits 0; every process is stopped then."""
    work_dir = work_dir.resolve()  # flwr run works in work_dir; FLWR_HOME must not be relative to it
    work_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    home = work_dir / "flwr-home"
    _write_cli_config(home, port)
    env = {**_environment(home), **(extra_env or {})}
    run_config_file = work_dir / "run-config.toml"
    deployment_config.write(run_config_file, run_config)
    started: list[subprocess.Popen] = []
    try:
        superlink = processes.start(
            [str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            work_dir / "logs" / "superlink.log", env, work_dir,  # the ServerApp saves its files (final_model.pt) here
        )
        started.append(superlink)
        wait_until_listening(f"127.0.0.1:{port}", superlink, 120, "flower-superlink")
        nodes = []
        for index in range(clients):
            node_env = {**env, "FLWR_HOME": str(work_dir / f"node-{index}")}
            nodes.append(
                processes.start(
                    [
                        str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--port", str(free_port()),
                        "--node-config", f"partition-id={index} num-partitions={clients}",
                    ],
                    work_dir / "logs" / f"supernode-{index}.log", node_env, work_dir,
                )
            )
        started.extend(nodes)
        if on_started is not None:
            on_started([superlink.pid], [node.pid for node in nodes])
        # An app whose strategy samples the nodes online (FedAvg's default) must see all of them.
        _wait_for_nodes(bin_dir, env, clients, nodes, work_dir, time.monotonic() + timeout)
        cli = processes.start(
            [str(bin_dir / "flwr"), "run", str(app_dir), "bench", "--stream", "--run-config", str(run_config_file)],
            work_dir / "logs" / "flwr-run.log", env, work_dir,
        )
        started.append(cli)
        _follow(cli, finished, started, work_dir, timeout)
    finally:
        lifetime.stop_all(started, processes.STOP_GRACE_S, whole_group=True)  # and the children they left behind (e.g. ClientApp processes)


def _wait_for_nodes(bin_dir: Path, env: dict[str, str], clients: int, nodes: list[subprocess.Popen], work_dir: Path, deadline: float) -> None:
    """Until the SuperLink lists ``clients`` SuperNodes online (``flwr supernode list``)."""
    while time.monotonic() < deadline:
        listed = subprocess.run([str(bin_dir / "flwr"), "supernode", "list", "bench", "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        try:
            online = sum(1 for node in json.loads(listed.stdout).get("nodes", []) if str(node.get("status", "online")).lower() == "online")
        except (ValueError, AttributeError):
            online = 0
        if online >= clients:
            return
        for index, node in enumerate(nodes):
            if node.poll() is not None:
                raise RuntimeError(f"supernode-{index} exited with code {node.returncode}:\n{tail(work_dir / 'logs' / f'supernode-{index}.log')}")
        time.sleep(1.0)
    raise RuntimeError(f"fewer than {clients} SuperNodes came online")


def _follow(cli: subprocess.Popen, finished: Callable[[], bool] | None, started: list[subprocess.Popen], work_dir: Path, timeout: float) -> None:
    """Until the run is finished; a process that dies first fails the run with its log."""
    deadline = time.monotonic() + timeout
    while finished is None or not finished():
        for index, process in enumerate(started[:-1]):
            if process.poll() is not None:
                name = "superlink" if index == 0 else f"supernode-{index - 1}"
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail(work_dir / 'logs' / f'{name}.log')}")
        if cli.poll() is not None:
            if finished is None and cli.returncode == 0:
                return
            if finished is None or not finished():
                raise RuntimeError(f"flwr run ended (code {cli.returncode}) before the run finished:\n{tail(work_dir / 'logs' / 'flwr-run.log')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Deployment Engine run did not finish within {timeout:g} s")
        time.sleep(0.25)


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    """The ServerApp's round records so far (Bouquet's metrics.jsonl fields, one JSON line each)."""
    try:
        return read_json_lines(path)[0]
    except (OSError, ValueError):
        return []

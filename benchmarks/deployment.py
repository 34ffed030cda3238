"""Run the federation on Flower's Deployment Engine: one ``flower-superlink``, one
``flower-supernode`` per client and ``flwr run`` of ``benchmarks/deployment_app``.

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
from services.net import free_port, wait_until_listening
from services.files import read_json_lines, tail
from services.taskspec import Placement, TaskSpec

APP_DIR = Path(__file__).resolve().parent / "deployment_app"
REPO = APP_DIR.parent.parent


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
    work_dir = work_dir.resolve()  # flwr run works in work_dir; FLWR_HOME must not be relative to it
    work_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    home = work_dir / "flwr-home"
    _write_cli_config(home, port)
    env = _environment(home)
    rounds_file = work_dir / "rounds.jsonl"
    run_config = work_dir / "run-config.toml"
    deployment_config.write(run_config, deployment_config.run_config(clients, rounds, spec, placement, rounds_file))
    started: list[subprocess.Popen] = []
    try:
        superlink = processes.start(
            [str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            work_dir / "logs" / "superlink.log", env, REPO,
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
                    work_dir / "logs" / f"supernode-{index}.log", node_env, REPO,
                )
            )
        started.extend(nodes)
        if on_started is not None:
            on_started([superlink.pid], [node.pid for node in nodes])
        cli = processes.start(
            [str(bin_dir / "flwr"), "run", str(APP_DIR), "bench", "--stream", "--run-config", str(run_config)],
            work_dir / "logs" / "flwr-run.log", env, work_dir,
        )
        started.append(cli)
        _follow(cli, rounds_file, rounds, started, work_dir, timeout)
    finally:
        processes.stop(started)
    return DeploymentRun(_read_rounds(rounds_file))


def _follow(cli: subprocess.Popen, rounds_file: Path, rounds: int, started: list[subprocess.Popen], work_dir: Path, timeout: float) -> None:
    """Until the last round is recorded; a process that dies first fails the run with its log."""
    deadline = time.monotonic() + timeout
    while len(_read_rounds(rounds_file)) < rounds:
        for index, process in enumerate(started[:-1]):
            if process.poll() is not None:
                name = "superlink" if index == 0 else f"supernode-{index - 1}"
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail(work_dir / 'logs' / f'{name}.log')}")
        if cli.poll() is not None and len(_read_rounds(rounds_file)) < rounds:
            raise RuntimeError(
                f"flwr run ended (code {cli.returncode}) after {len(_read_rounds(rounds_file))} of {rounds} rounds:\n"
                f"{tail(work_dir / 'logs' / 'flwr-run.log')}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"Deployment Engine run did not finish {rounds} rounds within {timeout:g} s")
        time.sleep(0.25)


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    """The ServerApp's round records so far (Bouquet's metrics.jsonl fields, one JSON line each)."""
    try:
        return read_json_lines(path)[0]
    except (OSError, ValueError):
        return []

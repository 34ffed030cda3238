"""The local launcher: a whole Bouquet federation on this machine, one server and N clients on
127.0.0.1, as processes (``scripts/run_local.py`` is this under the name users type).

    .venv/bin/python scripts/run_local.py --clients 5 --rounds 5 --dataset digits
    .venv/bin/python -m services.launcher --clients 5 --rounds 5 --dataset digits   # the same

Every server and client setting is accepted too (see the README's table) and validated
before anything starts. Locally the launcher knows N, so some defaults differ from the
server's: --min-clients N, --min-fit-clients min(2, N), --join-grace 0, --listen-address
127.0.0.1:<a free port>, and --torch-threads max(1, cores // N) (the workers share this
host's cores). Clients start once the server accepts connections (no fixed sleep); a
progress bar follows the rounds; Ctrl-C or the end of the run stops everything.
Exit code 0 when all rounds finished; otherwise non-zero, with the tail of the log of
the process that failed. Logs land in <run folder>/logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services import settings as settings_module
from services.client.connect import free_port, wait_until_listening
from services.files import tail
from services.server.results import new_run_id

# The server, clients and monitor run from the folder that holds the package (the repository,
# where scripts/bootstrap.sh installs it in editable mode).
REPO = Path(__file__).resolve().parent.parent
PROGRAM = "run_local.py"

CLIENT_ONLY = [s for s in settings_module.CLIENT if s.name in ("connect_timeout",)]
SHARED_LOCAL = {s.name for s in settings_module.LOCAL}
console = Console(stderr=True)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, object]:
    launcher = argparse.ArgumentParser(add_help=False)
    launcher.add_argument("--clients", type=settings_module.positive_int, default=5)
    launcher.add_argument("--monitor", action="store_true")
    own, rest = launcher.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        print("launcher options:\n  --clients N   number of client processes (default 5)\n  --monitor     also record memory (services.monitor)\n")
    # Locally the federation's size is known: default min-clients to it and skip the join grace.
    # All workers share this host's cores: split them rather than let each worker take them all.
    defaults = {
        "min_clients": own.clients,
        "min_fit_clients": min(2, own.clients),
        "join_grace": 0.0,
        "listen_address": f"127.0.0.1:{free_port()}",
        "torch_threads": max(1, (os.cpu_count() or 1) // own.clients),
    }
    table = [dataclasses.replace(s, default=defaults.get(s.name, s.default)) for s in settings_module.SERVER] + CLIENT_ONLY
    from services.server.__main__ import validate

    values = settings_module.parse(table, rest, program=PROGRAM, description=__doc__, validate=validate)
    # The processes run from the repository; paths given relative to where the user stands must
    # mean the same folders for them and for the launcher.
    values.results_dir = str(Path(values.results_dir).resolve())
    values.data_dir = str(Path(values.data_dir).resolve())
    if values.slots_dir:
        values.slots_dir = str(Path(values.slots_dir).resolve())
    if values.task.endswith(".py"):  # a task file; builtin and module names stay as they are
        values.task = str(Path(values.task).resolve())
    return own, values


def flags(values: object, names: list[str]) -> list[str]:
    out = []
    for setting in settings_module.SERVER + CLIENT_ONLY:
        if setting.name in names and getattr(values, setting.name) is not None:
            out += [setting.flag, settings_module.as_text(getattr(values, setting.name))]
    return out


def _die_with_launcher() -> None:
    """In each child before exec: get SIGTERM if the launcher dies, even by SIGKILL (Linux)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Federation:
    def __init__(self, own: argparse.Namespace, values: object) -> None:
        self.own, self.values = own, values
        values.run_id = values.run_id or new_run_id()
        self.run_path = Path(values.results_dir) / values.run_id
        self.log_dir = Path(values.results_dir) / f".{values.run_id}.logs"  # moved into the run folder at the end
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the others in order
            preexec_fn=_die_with_launcher,
        )
        log_file.close()
        self.processes[name] = (process, log_path)

    def run(self) -> int:
        v = self.values
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server_names = [s.name for s in settings_module.SERVER]
        self.start("server", ["-m", "services.server", *flags(v, server_names)])
        host_port = v.listen_address.replace("0.0.0.0", "127.0.0.1").replace("[::]", "127.0.0.1")
        try:
            wait_until_listening(host_port, self.processes["server"][0], 120, "server")
        except RuntimeError as problem:
            return self._fail("server", str(problem))
        if self.own.monitor:
            self.start("monitor", ["-m", "services.monitor", "--results-dir", str(v.results_dir), "--run-id", v.run_id, "--monitor-scope", "launcher"])
        client_flags = ["--server-address", host_port, *flags(v, [*SHARED_LOCAL, "connect_timeout"])]
        for index in range(self.own.clients):
            self.start(f"client-{index}", ["-m", "services.client", *client_flags], {"FL_CLIENT_ID": f"client-{index}"})
        return self._follow()

    def _follow(self) -> int:
        server, _ = self.processes["server"]
        rounds = self.values.rounds
        seen = 0
        columns = [TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("rounds", total=rounds, status="waiting for clients")
            while True:
                records = self._rounds()
                for record in records[seen:]:
                    accuracy = record.get("accuracy")
                    status = f"accuracy {accuracy:.4f}" if accuracy is not None else "no evaluation"
                    status += f", {record.get('clients_ok', 0)} ok, {record.get('clients_failed', 0)} failed, {record.get('round_seconds', 0):.1f} s"
                    progress.update(task, completed=record["round"], status=status)
                    progress.console.print(f"round {record['round']}/{rounds}: {status}")
                seen = len(records)
                if server.poll() is not None:
                    break
                for name, (process, _) in self.processes.items():
                    if name != "server" and process.poll() not in (None, 0):
                        return self._fail(name, f"{name} exited with code {process.returncode}")
                time.sleep(0.5)
        if server.returncode != 0:
            return self._fail("server", f"server exited with code {server.returncode}")
        self._stop(grace=30)
        for name, (process, _) in self.processes.items():
            if name.startswith("client") and process.returncode not in (0, None, -signal.SIGTERM):
                return self._fail(name, f"{name} exited with code {process.returncode}")
        return 0

    def _rounds(self) -> list[dict]:
        try:
            with open(self.run_path / "metrics.jsonl") as lines:
                return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]
        except (OSError, ValueError):
            return []

    def _fail(self, name: str, reason: str) -> int:
        self._stop(grace=10)
        _, log_path = self.processes[name]
        console.print(f"[red]{PROGRAM}: {reason}[/red]; last lines of {name}'s log:")
        console.print(tail(self._final_log(log_path)), markup=False, highlight=False)
        return 1

    def _final_log(self, log_path: Path) -> Path:
        moved = self.run_path / "logs" / log_path.name
        return moved if moved.exists() else log_path

    def _stop(self, grace: float) -> None:
        """Server first (so it writes its summary), then clients and monitor."""
        order = sorted(self.processes.items(), key=lambda item: item[0] != "server")
        for name, (process, _) in order:
            if process.poll() is None:
                process.send_signal(signal.SIGINT if name == "server" else signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, (process, _) in order:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._collect_logs()

    def _collect_logs(self) -> None:
        if self.run_path.is_dir() and self.log_dir.is_dir():
            target = self.run_path / "logs"
            target.mkdir(exist_ok=True)
            for log_file in self.log_dir.iterdir():
                shutil.move(str(log_file), target / log_file.name)
            self.log_dir.rmdir()

    def interrupt(self) -> int:
        console.print("[yellow]interrupted: stopping the federation[/yellow]")
        self._stop(grace=15)
        return 130


def main(argv: list[str] | None = None) -> int:
    own, values = parse(argv)
    federation = Federation(own, values)
    started = time.monotonic()
    try:
        code = federation.run()
    except KeyboardInterrupt:
        code = federation.interrupt()
    federation._collect_logs()
    summary = federation.run_path / "summary.json"
    if summary.exists():
        result = json.loads(summary.read_text())
        console.print(
            f"run {result['run_id']}: {result['status']}, {result['rounds_completed']}/{result['rounds_requested']} rounds, "
            f"final accuracy {result['final_accuracy']}, {time.monotonic() - started:.1f} s"
        )
    print(federation.run_path if federation.run_path.exists() else "(no run folder was created)")
    return code


if __name__ == "__main__":
    sys.exit(main())

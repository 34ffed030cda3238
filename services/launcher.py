"""The local launcher: a whole Bouquet federation on this machine, one server and N clients on
127.0.0.1, as processes (``scripts/run_local.py`` is this under the name users type).

    .venv/bin/python scripts/run_local.py --clients 5 --rounds 5 --dataset digits
    .venv/bin/python -m services.launcher --clients 5 --rounds 5 --dataset digits   # the same

Every server and client setting is accepted too (see the table in docs/settings.md) and validated
before anything starts. Locally the launcher knows N, so some defaults differ from the
server's: --min-clients N, --min-fit-clients min(2, N), --join-grace 0, --listen-address
127.0.0.1:<a free port>, and --torch-threads max(1, cores // N) (the workers share this
host's cores). Clients start once the server accepts connections (no fixed sleep); a
progress bar follows the rounds; Ctrl-C or the end of the run stops everything.
Exit code 0 when all rounds finished; otherwise non-zero, with the tail of the log of
the process that failed. Logs land in <run folder>/logs/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services import joining, lifetime
from services import settings as settings_module
from services.appmode import assignment
from services.certs import make_certificates
from services.net import free_port, wait_until_listening
from services.files import read_rounds, tail
from services.server.results import new_run_id
from services.pool.use import uses_pool
from services.settings import ClientSettings, JoinSettings, LocalSettings, PoolSettings, ServerSettings, SubmitSettings, boolean, positive_int, reuse, setting

# The server, clients and monitor run from the folder that holds the package (the repository,
# where scripts/bootstrap.sh installs it in editable mode).
REPO = Path(__file__).resolve().parent.parent
PROGRAM = "run_local.py"

console = Console(stderr=True)


@dataclass(frozen=True, kw_only=True)
class LauncherSettings(ServerSettings):
    """The server's settings, the clients' connect timeout, and the launcher's own."""

    clients: int = setting(positive_int, 5, "number of client processes")
    monitor: bool = setting(boolean, False, "also record memory (services.monitor)")
    tls: bool = setting(boolean, False, "gRPC over TLS with throwaway certificates (a CA and a certificate for 127.0.0.1, deleted at the end)")
    connect_timeout: float = reuse(ClientSettings, "connect_timeout")
    app: str | None = reuse(SubmitSettings, "app", default=None)
    app_run_config: str | None = reuse(SubmitSettings, "app_run_config")


def torch_threads_per_worker(clients: int) -> int:
    """All workers share this host's cores: split them rather than let each worker take them all
    (the benchmark gives the Deployment Engine's ClientApps the same)."""
    return max(1, (os.cpu_count() or 1) // clients)


def local_defaults(clients: int) -> dict[str, Any]:
    """Locally the federation's size is known: min-clients defaults to it, no join grace."""
    return {
        "min_clients": clients,
        "min_fit_clients": min(2, clients),
        "join_grace": 0.0,
        "listen_address": f"127.0.0.1:{free_port()}",
        "torch_threads": torch_threads_per_worker(clients),
        "worker_pool": "host",  # one warm process for the whole federation (services.pool)
    }


def parse(argv: list[str] | None) -> LauncherSettings:
    clients = settings_module.peek(LauncherSettings, "clients", argv, program=PROGRAM)
    values = settings_module.parse(
        LauncherSettings, argv, program=PROGRAM, description=__doc__, validate=validate, defaults=local_defaults(clients)
    )
    # The processes run from the repository; paths given relative to where the user stands must
    # mean the same folders for them and for the launcher. A task file is resolved too; builtin
    # and module names stay as they are.
    return dataclasses.replace(
        values,
        results_dir=str(Path(values.results_dir).resolve()),
        data_dir=str(Path(values.data_dir).resolve()),
        task=str(Path(values.task).resolve()) if values.task.endswith(".py") else values.task,
        tls_dir=None if values.tls_dir is None else str(Path(values.tls_dir).resolve()),
        slots_dir=None if values.slots_dir is None else str(Path(values.slots_dir).resolve()),
        app=None if values.app is None else str(Path(values.app).resolve()),
    )


def validate(values: LauncherSettings) -> LauncherSettings:
    from services.server.__main__ import validate as validate_server

    if values.mode == "app" and values.app is None:
        raise settings_module.SettingError("--mode / FL_MODE = 'app' needs --app / FL_APP: the Flower App folder to run")
    if values.app is not None:
        from services.appmode.submit import validate as validate_submission

        validate_submission(values)  # type: ignore[arg-type]
    if values.tls and values.tls_dir is not None:
        raise settings_module.SettingError("--tls makes throwaway certificates; it cannot be combined with --tls-dir / FL_TLS_DIR")
    return validate_server(values)


def throwaway_certificates() -> Path:
    """A CA and a server certificate for 127.0.0.1 in a private temporary folder (--tls)."""
    folder = Path(tempfile.mkdtemp(prefix="bouquet-tls-"))
    make_certificates(folder, ["localhost"], ["127.0.0.1"], days=2)
    return folder


def submit_token_file() -> Path:
    """App mode's submit token (new for the run) in a private temporary folder, for the server's
    front and for submit: the Control listener serves only its holders; deleted at the end."""
    folder = Path(tempfile.mkdtemp(prefix="bouquet-submit-"))  # mode 0700
    path = folder / "submit-token"
    path.write_text(joining.new_token() + "\n")
    path.chmod(0o600)
    return path


def join_token_file(token: str | None) -> Path:
    """The run's join token (--join-token, else a new one) in a private temporary folder, passed
    to the server and the clients as FL_JOIN_TOKEN_FILE: never on a command line (`ps` shows
    those to every user) nor in the logs; deleted at the end."""
    folder = Path(tempfile.mkdtemp(prefix="bouquet-join-"))  # mode 0700
    path = folder / "join-token"
    path.write_text((token or joining.new_token()) + "\n")
    path.chmod(0o600)
    return path


def pool_environment(values: LauncherSettings) -> dict[str, str]:
    """The pool's settings as environment variables, not flags: the memory monitor reads the
    pool's environment to find its records (services.pool.wire.pool_folder_of)."""
    out = {}
    for item in settings_module.declared(PoolSettings):
        value = getattr(values, item.name, None)  # the pool's own (its lifetime) keep their defaults
        if value is not None:
            out[item.env] = settings_module.as_text(value)
    return out


class Federation:
    def __init__(self, values: LauncherSettings) -> None:
        self.run_id = values.run_id or new_run_id()  # named here: the server and the monitor get the same
        self.values = dataclasses.replace(values, run_id=self.run_id)
        self.run_path = Path(values.results_dir) / self.run_id
        self.log_dir = Path(values.results_dir) / f".{self.run_id}.logs"  # moved into the run folder at the end
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.join_env: dict[str, str] = {}  # FL_JOIN_TOKEN_FILE for the server and every client (main sets it)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")
        process = lifetime.start(
            [sys.executable, *argv],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # FL_JOIN_TOKEN stays out: the run's token reaches the processes as FL_JOIN_TOKEN_FILE.
            env={**{key: value for key, value in os.environ.items() if key != "FL_JOIN_TOKEN"}, "PYTHONUNBUFFERED": "1", **(env or {})},
            own_session=True,  # Ctrl-C reaches the launcher only; it stops the others in order
            dies_with_parent=True,  # SIGTERM if the launcher dies, even by SIGKILL
        )
        log_file.close()
        self.processes[name] = (process, log_path)

    def run(self) -> int:
        v = self.values
        self.log_dir.mkdir(parents=True, exist_ok=True)
        joins = {s.name for s in settings_module.declared(JoinSettings)}  # the token goes as a file, in the environment
        server_names = [s.name for s in settings_module.declared(ServerSettings) if s.name not in joins]
        if uses_pool(v):  # first: the server's and every client's workers are forked by it
            self.start("worker-pool", ["-m", "services.pool"], pool_environment(v))
        self.start("server", ["-m", "services.server", *settings_module.as_flags(v, server_names)], self.join_env)
        host_port = v.listen_address.replace("0.0.0.0", "127.0.0.1").replace("[::]", "127.0.0.1")
        try:
            wait_until_listening(host_port, self.processes["server"][0], 120, "server")
        except RuntimeError as problem:
            return self._fail("server", str(problem))
        if v.monitor:
            self.start("monitor", ["-m", "services.monitor", "--results-dir", str(v.results_dir), "--run-id", self.run_id, "--monitor-scope", "launcher"])
        client_names = [s.name for s in settings_module.declared(LocalSettings)] + ["connect_timeout"]
        client_flags = ["--server-address", host_port, *settings_module.as_flags(v, client_names)]
        for index in range(v.clients):
            self.start(f"client-{index}", ["-m", "services.client", *client_flags], {"FL_CLIENT_ID": f"client-{index}", **self.join_env})
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
            return read_rounds(self.run_path)
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
            lifetime.send(process, signal.SIGINT if name == "server" else signal.SIGTERM)
        lifetime.reap([process for _, (process, _) in order], grace)  # what still runs after the grace: SIGKILL, to its whole session
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


MAX_LISTED_PARTITIONS = 5
SUBMISSION_STOP_S = 90.0  # an interrupted submission's time to stop Flower's run and record its end


def missed_rounds_lines(result: dict[str, Any]) -> list[str]:
    """One line per partition that missed rounds (summary.json's rounds_missed_by_partition),
    the first few of them: a run can complete while a partition trained 2 of 6 rounds."""
    missed = result.get("rounds_missed_by_partition") or {}
    asked = result.get("rounds_recorded") or result.get("rounds_requested")
    lines = []
    for partition, counts in list(missed.items())[:MAX_LISTED_PARTITIONS]:
        why = ", ".join(f"{reason.replace('_', ' ')} {count}" for reason, count in counts.items() if reason != "missed")
        lines.append(f"partition {partition} missed {counts['missed']} of {asked} rounds ({why})")
    if len(missed) > MAX_LISTED_PARTITIONS:
        lines.append(f"... and {len(missed) - MAX_LISTED_PARTITIONS} more: summary.json rounds_missed_by_partition")
    return lines


def say_the_end(run_path: Path, seconds: float) -> None:
    """The partitions that missed rounds, the final line (both from summary.json), the run folder."""
    summary = run_path / "summary.json"
    if summary.exists():
        result = json.loads(summary.read_text())
        for line in (*missed_rounds_lines(result), final_line(result, seconds)):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    print(run_path if run_path.exists() else "(no run folder was created)")


def final_line(result: dict[str, Any], seconds: float) -> str:
    """The launcher's last line before the run folder: short enough for an 80-column terminal,
    accuracy rounded, and the partitions that missed rounds counted (a completed run may have some)."""
    accuracy = result.get("final_accuracy")
    parts = [
        f"{result['status']}: {result['rounds_completed']}/{result.get('rounds_requested') or '?'} rounds",  # app mode: None when the ServerApp logs no rounds
        f"accuracy {accuracy:.4f}" if isinstance(accuracy, (int, float)) else "no accuracy",
        f"{seconds:.1f} s",
    ]
    missed = len(result.get("rounds_missed_by_partition") or {})
    if missed:
        parts.insert(1, f"{missed} partition{'s' if missed > 1 else ''} missed rounds")
    return ", ".join(parts)



# -- app mode ---------------------------------------------------------------------------------
# One link (the front on 127.0.0.1:<free port> for the SuperNodes, its Control listener on another
# for submit with the run's submit token, the SuperLink behind them; the federation settled on N with no grace),
# N node agents (client-0 .. client-<N-1>, each with its SuperNode and warm process), one
# submission (`flwr run --stream`, shown as it comes) and with --monitor the memory monitor;
# everything is stopped at the end and the logs land in <run folder>/logs/. The exit code is
# the run's (services.appmode.submit).

class AppFederation(Federation):
    def __init__(self, values: LauncherSettings, submit_token: Path) -> None:
        super().__init__(values)
        self.submit_token = submit_token  # private file: the front's Control listener asks submit for it
        self.control_address = f"127.0.0.1:{free_port()}"

    def run(self) -> int:
        v = self.values
        self.log_dir.mkdir(parents=True, exist_ok=True)
        assignment.path(v.data_dir).unlink(missing_ok=True)  # a new federation: settle anew
        common = ["--data-dir", v.data_dir, *(["--tls-dir", v.tls_dir] if v.tls_dir else [])]
        if uses_pool(v):  # first: every node's ClientApp workers are forked by it
            self.start("worker-pool", ["-m", "services.pool"], {**pool_environment(v), "FL_MODE": "app"})
        control = ["--submit-token-file", str(self.submit_token)]
        # Through the server's and client's own commands with --mode app, as compose runs them:
        # the memory monitor knows those programs (and FL_CLIENT_ID names each replica).
        self.start("server", ["-m", "services.server", "--mode", "app", "--listen-address", v.listen_address, "--min-clients", str(v.clients), "--join-grace", "0",
                              "--join-timeout", str(v.join_timeout), "--results-dir", str(v.results_dir), *common, *control, "--control-address", self.control_address,
                              "--worker-timeout", repr(v.worker_timeout),  # the ServerApp waits for a reply no longer than the job's time budget
                              *(["--server-metrics-port", str(v.server_metrics_port)] if v.server_metrics_port is not None else []),
                              *(["--max-update-norm", repr(v.max_update_norm)] if v.max_update_norm is not None else [])])
        address = v.listen_address.replace("0.0.0.0", "127.0.0.1")
        node_names = [s.name for s in settings_module.declared(LocalSettings)] + ["connect_timeout", "worker_timeout"]
        node_flags = [*settings_module.as_flags(v, node_names)]
        for index in range(v.clients):
            self.start(f"client-{index}", ["-m", "services.client", "--mode", "app", "--server-address", address, *node_flags], {"FL_CLIENT_ID": f"client-{index}"})
        if v.monitor:
            self.start("monitor", ["-m", "services.monitor", "--results-dir", str(v.results_dir), "--run-id", self.run_id, "--monitor-scope", "launcher"])
        submit = ["-m", "services.appmode.submit", "--app", str(v.app), "--server-address", self.control_address, "--results-dir", v.results_dir, "--run-id", self.run_id, *common, *control]
        if v.app_run_config:
            submit += ["--app-run-config", v.app_run_config]
        self.start("submit", submit)
        return self._follow_submission()

    def interrupt(self) -> int:
        """The submission first, while the SuperLink still answers: it stops Flower's run and
        records the run's end (summary.json "interrupted", the trackers); then the federation."""
        console.print("[yellow]interrupted: stopping the run, then the federation[/yellow]")
        submit = self.processes.get("submit")
        if submit is not None:
            lifetime.send(submit[0], signal.SIGTERM)
            lifetime.wait(submit[0], SUBMISSION_STOP_S)  # still running after it: _stop kills it
        self._stop(grace=15)
        return 130

    def _follow_submission(self) -> int:
        """Show the submission's output until it ends. A replica that exits is said once and the
        run goes on without it (the ServerApp stops waiting for its replies; its partition's
        missed rounds are recorded), as under compose; the server or the pool exiting ends it."""
        submit, log_path = self.processes["submit"]
        shown, gone = 0, set()
        while True:
            shown = self._show(log_path, shown)
            if submit.poll() is not None:
                break
            for name, (process, replica_log) in self.processes.items():
                if name in ("submit", "monitor") or name in gone or process.poll() is None:
                    continue
                if not name.startswith("client-"):
                    return self._fail(name, f"{name} exited with code {process.returncode} before the run ended")
                gone.add(name)
                console.print(f"[red]{name} exited with code {process.returncode} before the run ended; the run goes on without it (its log: {replica_log})[/red]")
            time.sleep(0.5)
        self._show(log_path, shown)
        self._stop(grace=30)
        if submit.returncode != 0:
            console.print(f"[red]{PROGRAM}: the run failed (exit code {submit.returncode}); its summary.json says why[/red]")
        return submit.returncode

    @staticmethod
    def _show(log_path, shown: int) -> int:
        """Print what the submission logged since byte ``shown`` (complete lines); the new offset."""
        try:
            with open(log_path, "rb") as log:
                log.seek(shown)
                chunk = log.read()
        except OSError:
            return shown
        complete = chunk[: chunk.rfind(b"\n") + 1]
        if complete:
            console.print(complete.decode(errors="replace"), end="", markup=False, highlight=False)
        return shown + len(complete)

def run_app(values: LauncherSettings, submit_token: Path) -> int:
    """App mode (--app or FL_MODE=app): SuperLink, N SuperNodes, one streamed submission; exit code = the run's."""
    federation = AppFederation(values, submit_token)
    started = time.monotonic()
    try:
        code = federation.run()
    except KeyboardInterrupt:
        code = federation.interrupt()
    federation._collect_logs()
    say_the_end(federation.run_path, time.monotonic() - started)
    return code


def main(argv: list[str] | None = None) -> int:
    values = parse(argv)
    certificates = throwaway_certificates() if values.tls else None
    if certificates is not None:
        values = dataclasses.replace(values, tls_dir=str(certificates))
    if values.app is not None or values.mode == "app":
        submit_token = submit_token_file()
        try:
            return run_app(values, submit_token)
        finally:
            if certificates is not None:
                shutil.rmtree(certificates, ignore_errors=True)
            shutil.rmtree(submit_token.parent, ignore_errors=True)
    token = join_token_file(values.join_token)
    values = dataclasses.replace(values, join_token=None, join_token_file=None)
    federation = Federation(values)
    federation.join_env = {"FL_JOIN_TOKEN_FILE": str(token)}
    started = time.monotonic()
    try:
        code = federation.run()
    except KeyboardInterrupt:
        code = federation.interrupt()
    finally:
        if certificates is not None:
            shutil.rmtree(certificates, ignore_errors=True)
        shutil.rmtree(token.parent, ignore_errors=True)
    federation._collect_logs()
    say_the_end(federation.run_path, time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())

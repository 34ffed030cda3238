"""``scripts/run_local.py --app <Flower App folder> --clients N``: app mode on this machine.

One link (the SuperLink on 127.0.0.1:<free port>, the federation settled on N with no grace),
N node agents (``client-0`` .. ``client-<N-1>``, each with its SuperNode and warm process), one
submission (``flwr run --stream``, shown as it comes) and with ``--monitor`` the memory monitor;
everything is stopped at the end and the logs land in ``<run folder>/logs/``. The exit code is the run's (``services.appmode.submit``).
"""

from __future__ import annotations

import time

from services import settings as settings_module
from services.appmode import assignment
from services.launcher import PROGRAM, Federation, LauncherSettings, console
from services.settings import LocalSettings, NodeSettings


class AppFederation(Federation):
    def run(self) -> int:
        v = self.values
        self.log_dir.mkdir(parents=True, exist_ok=True)
        assignment.path(v.data_dir).unlink(missing_ok=True)  # a new federation: settle anew
        common = ["--data-dir", v.data_dir, *(["--tls-dir", v.tls_dir] if v.tls_dir else [])]
        # Through the server's and client's own commands with --mode app, as compose runs them:
        # the memory monitor knows those programs (and FL_CLIENT_ID names each replica).
        self.start("server", ["-m", "services.server", "--mode", "app", "--listen-address", v.listen_address, "--min-clients", str(v.clients), "--join-grace", "0",
                              "--join-timeout", str(v.join_timeout), *common])
        address = v.listen_address.replace("0.0.0.0", "127.0.0.1")
        node_names = [s.name for s in settings_module.declared(LocalSettings)] + ["connect_timeout", "worker_timeout"]
        node_flags = [*settings_module.as_flags(v, node_names)]
        for index in range(v.clients):
            self.start(f"client-{index}", ["-m", "services.client", "--mode", "app", "--server-address", address, *node_flags], {"FL_CLIENT_ID": f"client-{index}"})
        if v.monitor:
            self.start("monitor", ["-m", "services.monitor", "--results-dir", str(v.results_dir), "--run-id", self.run_id, "--monitor-scope", "launcher"])
        submit = ["-m", "services.appmode.submit", "--app", str(v.app), "--server-address", address, "--results-dir", v.results_dir, "--run-id", self.run_id, *common]
        if v.app_run_config:
            submit += ["--app-run-config", v.app_run_config]
        self.start("submit", submit)
        return self._follow_submission()

    def _follow_submission(self) -> int:
        submit, log_path = self.processes["submit"]
        shown = 0
        while True:
            shown = self._show(log_path, shown)
            if submit.poll() is not None:
                break
            for name, (process, _) in self.processes.items():
                if name != "submit" and name != "monitor" and process.poll() is not None:
                    return self._fail(name, f"{name} exited with code {process.returncode} before the run ended")
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

def main(values: LauncherSettings) -> int:
    federation = AppFederation(values)
    try:
        code = federation.run()
    except KeyboardInterrupt:
        code = federation.interrupt()
    federation._collect_logs()
    print(federation.run_path if federation.run_path.exists() else "(no run folder was created)")
    return code

"""Real tracking servers on loopback, for the tests and the tracking benchmark: MLflow's own
``mlflow server`` (SQLite backend, artifacts in a folder) and Debian's Prometheus, each found
where .ci/run installs it (``find_program``), and read back through their HTTP APIs as any
user's tool would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from services import lifetime
from services.net import free_port

REPO = Path(__file__).resolve().parent.parent

START_TIMEOUT_S = 300  # a loaded 2-core machine has taken over 2 minutes to start mlflow server


class ProgramMissing(FileNotFoundError):
    """A tracking server's program is not installed here."""


def find_program(name: str, variable: str, candidates: list[Path]) -> str:
    """The executable named by ``variable``, else the first candidate that exists, else PATH."""
    for found in [os.environ.get(variable), *map(str, candidates), shutil.which(name)]:
        if found and Path(found).exists():
            return found
    raise ProgramMissing(f"{name} not found (set {variable}, or run .ci/run's install step)")


def mlflow_program() -> str:
    cache = Path(os.environ.get("BOUQUET_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bouquet")
    return find_program("mlflow", "BOUQUET_MLFLOW", [cache / "mlflow-server" / "bin" / "mlflow"])  # where .ci/trackers.sh puts it


def prometheus_program() -> str:
    return find_program("prometheus", "BOUQUET_PROMETHEUS", [Path("/usr/bin/prometheus")])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something truthy (that value is returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def get_json(url: str, payload: dict | None = None) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


class MlflowServer:
    """``mlflow server`` on 127.0.0.1, its SQLite database and artifacts under ``folder``; it can
    be stopped and started again on the same port and database (a tracking server that goes down)."""

    def __init__(self, folder: Path) -> None:
        self.executable = mlflow_program()
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "MlflowServer":
        self.starts += 1
        log = open(self.folder / f"mlflow-server-{self.starts}.log", "w")
        self.process = lifetime.start(
            [self.executable, "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, own_session=True, dies_with_parent=False,
            # no GenAI job consumers (seven huey processes that Bouquet's runs never use)
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        wait_for(self._healthy, START_TIMEOUT_S, f"mlflow server on {self.uri} (log {log.name})")
        return self

    def _healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(self.folder / f'mlflow-server-{self.starts}.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """The server and every process it started (its own session): none outlives it."""
        if self.process is not None:
            lifetime.stop(self.process, grace=30, whole_group=True)  # then SIGKILL for workers that outlived the server

    # -- MLflow's REST API, as any user's tool would read it --------------------------------------

    def api(self, endpoint: str, payload: dict | None = None, **query: str) -> Any:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        return get_json(url, payload)

    def run_of(self, experiment: str, run_id: str) -> dict | None:
        """The MLflow run recorded for the Bouquet run ``run_id`` (its tag), or None."""
        try:
            experiment_id = self.api("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        except urllib.error.HTTPError:
            return None
        runs = self.api("runs/search", {"experiment_ids": [experiment_id], "filter": f"tags.`bouquet.run_id` = '{run_id}'"}).get("runs", [])
        if len(runs) > 1:
            raise RuntimeError(f"{len(runs)} MLflow runs for one Bouquet run {run_id!r}")
        return runs[0] if runs else None

    def history(self, mlflow_run_id: str, key: str) -> dict[int, float]:
        points = self.api("metrics/get-history", run_id=mlflow_run_id, metric_key=key).get("metrics", [])
        return {int(p["step"]): p["value"] for p in points}

    def artifacts(self, mlflow_run_id: str, path: str = "") -> list[str]:
        answer = self.api("artifacts/list", run_id=mlflow_run_id, **({"path": path} if path else {}))
        return sorted(f["path"] for f in answer.get("files", []))


class Prometheus:
    """Debian's prometheus, scraping ``targets`` every second, its HTTP API on 127.0.0.1."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        executable = prometheus_program()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs:\n  - job_name: bouquet\n    static_configs:\n      - targets: {json.dumps(targets)}\n"
        )
        log = open(folder / "prometheus.log", "w")
        self.process = lifetime.start(
            [executable, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, own_session=True, dies_with_parent=False,
        )
        log.close()
        wait_for(self._ready, START_TIMEOUT_S, f"prometheus on {self.url} (log {log.name})")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError("prometheus exited (see prometheus.log beside its config)")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expression: str) -> list[dict]:
        return get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expression})}")["data"]["result"]

    def stop(self) -> None:
        lifetime.stop(self.process, grace=30, whole_group=True)

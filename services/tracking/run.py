"""What the server does for trackers: one object built when the run folder is open, told of each
recorded round, and finished after summary.json is written.

It writes the run's parameters into tracking.json (once: a resumed run keeps its first
attempt's, as MLflow's parameters cannot change), starts a background sender per file-fed
tracker (MLflow when MLFLOW_TRACKING_URI is set, TensorBoard unless switched off) and serves the
Prometheus gauges (bound by the server before it opens the run folder).
"""

from __future__ import annotations

import logging
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from services.tracking.figures import run_params
from services.tracking.mlflow_run import tracking_uri
from services.tracking.progress import Progress
from services.tracking.prometheus import RoundGauges
from services.tracking.sender import Sender

log = logging.getLogger("bouquet.tracking")

LOCAL_FLUSH_S = 10.0
TASK_MODE = "task (start_server: Bouquet's server and clients over gRPC)"
APP_MODE = "app (Flower's Deployment Engine: SuperLink and SuperNodes, every ClientApp message in a worker forked from its replica's warm process)"


def resolvable(uri: str, attempts: int = 5) -> bool:
    """Whether the URI's host name resolves (a few tries a second apart: a compose service's
    name appears when its container is created, which may be just after the server's)."""
    host = urllib.parse.urlsplit(uri).hostname
    if not host:
        return True  # a file or database URI: nothing to resolve
    for attempt in range(attempts):
        try:
            socket.getaddrinfo(host, None)
            return True
        except socket.gaierror:
            if attempt + 1 < attempts:
                time.sleep(1.0)
    return False


def resend_hint(folder: Path) -> str:
    return f"python -m services.tracking {folder}"


class RunTracking:
    def __init__(
        self, folder: Path, settings: Mapping[str, Any], task: Mapping[str, Any], *,
        mlflow_experiment: str, tensorboard: bool, flush_timeout: float, gauges: RoundGauges | None = None, mlflow_optional: bool = False,
        engine_mode: str = TASK_MODE,
    ) -> None:
        self.folder = Path(folder)
        self.flush_timeout = flush_timeout
        run = Progress(self.folder, "run")
        if "params" not in run.get():
            run.update(params=run_params(settings, task, engine_mode))
        self.senders: list[Sender] = []
        uri = tracking_uri()
        if uri and mlflow_optional and not resolvable(uri):
            log.info("MLflow at %s: its host does not resolve, so no MLflow for this run (FL_MLFLOW_OPTIONAL: compose's tracking profile is off)", uri)
            uri = None
        if uri:
            from services.tracking.mlflow_run import MlflowRun, import_client

            import_client()  # ~1 s of CPU, here at start rather than in the sender during the first rounds

            self.senders.append(Sender("mlflow", lambda: MlflowRun(self.folder, mlflow_experiment, uri), resend_hint(self.folder)).start())
            log.info("recording the run in MLflow at %s, experiment %r (MLFLOW_TRACKING_URI), in the background", uri, mlflow_experiment)
        if tensorboard:
            from services.tracking.tensorboard import TensorBoardLog, import_writer

            import_writer()  # here, in the main thread: see import_writer

            self.senders.append(Sender("tensorboard", lambda: TensorBoardLog(self.folder), "the next start of this run writes it").start())
        self.gauges = gauges

    def round_recorded(self, record: Mapping[str, Any]) -> None:
        """Called by the round recorder once the round's line is on disk: only sets gauges and
        wakes the senders (no I/O here)."""
        if self.gauges is not None:
            self.gauges.round_recorded(record)
        for sender in self.senders:
            sender.poke()

    def finish(self) -> None:
        """After summary.json: TensorBoard first (its files are local, and MLflow takes them as
        artifacts), then MLflow with what is left of the flush timeout."""
        deadline = time.monotonic() + self.flush_timeout
        for sender in sorted(self.senders, key=lambda sender: sender.name != "tensorboard"):
            left = deadline - time.monotonic()
            sender.finish(max(left, LOCAL_FLUSH_S) if sender.name == "tensorboard" else max(left, 0.0))
        if self.gauges is not None:
            self.gauges.close()

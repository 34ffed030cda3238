"""``python -m services.tracking RUN_FOLDER [--experiment NAME]``: send a run folder to MLflow
(MLFLOW_TRACKING_URI), whatever its tracker missed: a server that gave up at its end because the
tracking server was down, or files the memory monitor wrote after the server ended
(report.html). Idempotent: it sends only what tracking.json says was not sent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from services import logs
from services.settings import EXIT_BAD_SETTING
from services.tracking.mlflow_run import MlflowRun, tracking_uri
from services.tracking.progress import Progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.tracking", description=__doc__)
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the one the run was sent to, else 'bouquet')")
    args = parser.parse_args(argv)
    if not tracking_uri():
        print("services.tracking: error: MLFLOW_TRACKING_URI is not set: no MLflow tracking server to send to", file=sys.stderr)
        return EXIT_BAD_SETTING
    if not (args.run_folder / "metrics.jsonl").exists():
        print(f"services.tracking: error: RUN_FOLDER = {str(args.run_folder)!r}: not a run folder (no metrics.jsonl)", file=sys.stderr)
        return EXIT_BAD_SETTING
    logs.setup()
    params = Progress(args.run_folder, "run").get().get("params", {})
    experiment = args.experiment or params.get("mlflow_experiment") or "bouquet"
    run = MlflowRun(args.run_folder, experiment)
    sent = run.sync(final=True)
    logging.getLogger("bouquet.tracking").info("sent %d round(s) of %s to %s%s", sent, args.run_folder, run.where, "; the run's end too" if run.finished() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

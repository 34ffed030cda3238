"""``python -m services.tracking RUN_FOLDER [--experiment NAME]``: send a run folder to MLflow
(MLFLOW_TRACKING_URI wins; else the tracking server it was recorded in), whatever its tracker missed: a server that gave up at its end because the
tracking server was down, or files the memory monitor wrote after the server ended
(report.html). Idempotent: it sends only what tracking.json says was not sent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from services import logs
from services.settings import EXIT_BAD_SETTING
from services.tracking.mlflow_run import send_later, tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.tracking", description=__doc__)
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the run's FL_MLFLOW_EXPERIMENT, else 'bouquet')")
    args = parser.parse_args(argv)
    if not (args.run_folder / "metrics.jsonl").exists():
        print(f"services.tracking: error: RUN_FOLDER = {str(args.run_folder)!r}: not a run folder (no metrics.jsonl)", file=sys.stderr)
        return EXIT_BAD_SETTING
    run = send_later(args.run_folder, args.experiment, tracking_uri())
    if run is None:
        print("services.tracking: error: MLFLOW_TRACKING_URI is not set and the run was never sent to MLflow: no tracking server to send to", file=sys.stderr)
        return EXIT_BAD_SETTING
    logs.setup()
    sent = run.sync(final=True)
    logging.getLogger("bouquet.tracking").info("sent %d round(s) of %s to %s%s", sent, args.run_folder, run.where, "; the run's end too" if run.finished() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

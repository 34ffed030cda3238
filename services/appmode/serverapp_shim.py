"""Bouquet's ``flwr-serverapp``: first on the SuperLink's PATH, so each run's ServerApp works in that run's folder.

A ServerApp saves what it makes to its working directory (Flower's quickstart-pytorch writes
``final_model.pt`` there); left alone that is the SuperLink's, outside every run folder, and
overwritten by the next run. SuperExec starts ``flwr-serverapp`` by bare name for every run, so
this, installed by the link (``services.appmode.flower.install_program``), starts instead:
it changes into the folder Bouquet's submit named in ``<results>/.appmode-current-run`` (the
run folder's ``serverapp/``; a ``flwr run`` from elsewhere gets
``<results>/.flower-runs/<UTC time>/``, and says so), then execs the command the link named
(``services.appmode.serverapp``: Flower's own ``flwr-serverapp`` with every ClientApp reply
checked) with the same arguments, telling it the run folder its records go to. Standard library
only (it runs with ``python -S``).
"""

import json
import os
import sys
import time
from pathlib import Path

CURRENT_RUN = ".appmode-current-run"  # in the results folder: where the ServerApp of the run being submitted works
RESULTS_VARIABLE = "BOUQUET_SERVERAPP_RESULTS"
COMMAND_VARIABLE = "BOUQUET_SERVERAPP_COMMAND"  # a JSON list: the program and its first arguments
RUN_FOLDER_VARIABLE = "BOUQUET_RUN_FOLDER"  # for the command: the run folder (services.appmode.serverapp reads it)
MAX_NORM_VARIABLE = "BOUQUET_MAX_UPDATE_NORM"  # for the command: FL_MAX_UPDATE_NORM, set by the link
DATA_DIR_VARIABLE = "BOUQUET_DATA_DIR"  # for the command: the data folder (the nodes' records, the roster, the assignment)
WORKER_TIMEOUT_VARIABLE = "BOUQUET_WORKER_TIMEOUT"  # for the command: FL_WORKER_TIMEOUT, the job's time budget's unit


def working_folder(results: Path) -> tuple[Path, str | None]:
    """The folder the marker names, if it lies inside the results folder; else one of its own
    (hidden: not a run folder, which the memory monitor would wait on), and why."""
    try:
        named = Path((results / CURRENT_RUN).read_text().strip())
    except OSError as error:
        named, why = None, f"no submission named a run folder ({type(error).__name__} on {results / CURRENT_RUN}: a flwr run from elsewhere)"
    if named is not None:
        if named.is_absolute() and named.resolve().is_relative_to(results.resolve()) and named.resolve() != results.resolve():
            return named, None
        why = f"{results / CURRENT_RUN} names {str(named)!r}, not a folder inside {results}"
    return results / ".flower-runs" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), why


def main() -> None:
    command = json.loads(os.environ[COMMAND_VARIABLE])
    target, why = working_folder(Path(os.environ[RESULTS_VARIABLE]))
    os.environ[RUN_FOLDER_VARIABLE] = str(target if why else target.parent)  # a folder of its own keeps its records too
    if why:
        print(f"flwr-serverapp (Bouquet): {why}; the ServerApp works in {target}", file=sys.stderr, flush=True)
    try:
        target.mkdir(parents=True, exist_ok=True)
        os.chdir(target)
    except OSError as error:
        print(f"flwr-serverapp (Bouquet): cannot work in {target} ({error}); the ServerApp works in {os.getcwd()}", file=sys.stderr, flush=True)
    os.execv(command[0], [*command, *sys.argv[1:]])


if __name__ == "__main__":
    main()

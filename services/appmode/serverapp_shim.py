"""Bouquet's ``flwr-serverapp``: first on the SuperLink's PATH, so each run's ServerApp works in that run's folder.

A ServerApp saves what it makes to its working directory (Flower's quickstart-pytorch writes
``final_model.pt`` there); left alone that is the SuperLink's, outside every run folder, and
overwritten by the next run. SuperExec starts ``flwr-serverapp`` by bare name for every run, so
this, installed by the link (``services.appmode.flower.install_program``), starts instead:
it changes into the folder Bouquet's submit named in ``<results>/.appmode-current-run`` (the
run folder's ``serverapp/``; a ``flwr run`` from elsewhere gets
``<results>/flower-runs/<UTC time>/``), then execs Flower's own ``flwr-serverapp`` with the
same arguments. Standard library only (it runs with ``python -S``).
"""

import os
import sys
import time
from pathlib import Path

CURRENT_RUN = ".appmode-current-run"  # in the results folder: where the ServerApp of the run being submitted works
RESULTS_VARIABLE = "BOUQUET_SERVERAPP_RESULTS"
PROGRAM_VARIABLE = "BOUQUET_SERVERAPP_PROGRAM"


def working_folder(results: Path) -> Path:
    """The folder the marker names, if it lies inside the results folder; else one of its own."""
    try:
        named = Path((results / CURRENT_RUN).read_text().strip())
    except OSError:
        named = None
    if named is not None and named.is_absolute() and named.resolve().is_relative_to(results.resolve()) and named.resolve() != results.resolve():
        return named
    return results / "flower-runs" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def main() -> None:
    program = os.environ[PROGRAM_VARIABLE]
    target = working_folder(Path(os.environ[RESULTS_VARIABLE]))
    try:
        target.mkdir(parents=True, exist_ok=True)
        os.chdir(target)
    except OSError as error:
        print(f"flwr-serverapp (Bouquet): cannot work in {target} ({error}); the ServerApp works in {os.getcwd()}", file=sys.stderr, flush=True)
    os.execv(program, [program, *sys.argv[1:]])


if __name__ == "__main__":
    main()

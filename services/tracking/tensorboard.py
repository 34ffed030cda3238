"""TensorBoard event files in the run folder (``<run>/tensorboard/``), written with tensorboardX
(no torch, no TensorFlow): ``tensorboard --logdir results/`` shows every run, one per folder.

Fed from metrics.jsonl like MLflow (the same figures, ``services.tracking.figures``), with the
rounds written kept in tracking.json: a resumed run adds a new event file for its new rounds only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.files import read_rounds
from services.tracking.figures import initial_figures, round_figures
from services.tracking.mlflow_run import epoch_ms
from services.tracking.progress import Progress

FOLDER = "tensorboard"


def import_writer() -> type:
    """tensorboardX's SummaryWriter, imported so that torch is not: tensorboardX imports torch
    when it can (only to accept torch tensors, which Bouquet never gives it), and the server
    process never imports torch. Call it from the main thread at start (``RunTracking`` does),
    so that no other import of torch can run while it is kept out."""
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        SummaryWriter = import_writer()
        self.folder = Path(folder)
        self.progress = Progress(self.folder, self.name)
        self.writer = SummaryWriter(logdir=str(self.folder / FOLDER), flush_secs=5)

    @property
    def where(self) -> str:
        return f"TensorBoard files in {self.folder / FOLDER}"

    def sync(self, final: bool = False) -> int:
        state = self.progress.get()
        written = state.get("rounds_written", 0)
        rounds = read_rounds(self.folder)
        initial = {} if state.get("initial_written") else initial_figures(self.folder)
        for key, value in initial.items():
            self.writer.add_scalar(key, value, global_step=0)
        for record in rounds[written:]:
            walltime = epoch_ms(record.get("ended_at")) / 1000
            for key, value in round_figures(record).items():
                self.writer.add_scalar(key.replace(".", "/"), value, global_step=record["round"], walltime=walltime)
        self.writer.flush()
        if initial:
            self.progress.update(initial_written=True)
        if len(rounds) != written:
            self.progress.update(rounds_written=len(rounds))
        if final:
            self.writer.close()
        return len(rounds) - written

    def finished(self) -> bool:
        return self.progress.get().get("rounds_written", 0) == len(read_rounds(self.folder))

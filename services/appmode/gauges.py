"""The server's Prometheus round gauges in app mode, while the run goes.

Task mode's server sets its gauges (``services.tracking.prometheus``) as it records each round.
In app mode the rounds are recorded by ``submit`` (metrics.jsonl, a line as each round ends),
which may run in another container; Prometheus scrapes the server. So the link serves the same
gauges on FL_SERVER_METRICS_PORT and feeds them each new line of the current run's
metrics.jsonl: the run the ServerApp works for (``serverapp_shim.CURRENT_RUN``).
"""

from __future__ import annotations

import threading
from pathlib import Path

from services.appmode.serverapp_shim import CURRENT_RUN
from services.files import METRICS, read_json_lines
from services.tracking.prometheus import RoundGauges

FOLLOW_S = 1.0


class RunFollower:
    """Each round line of the current run, told to the gauges once."""

    def __init__(self, results_dir: str | Path, gauges: RoundGauges) -> None:
        self.results = Path(results_dir)
        self.gauges = gauges
        self.folder: Path | None = None
        self.told = 0  # lines of ``folder``'s metrics.jsonl the gauges have
        self.seen: tuple[int, int] | None = None  # that file's (inode, mtime) when last read

    def step(self) -> None:
        folder = self.current_run() or self.folder  # submit removes the marker before the run's last lines
        if folder is None:
            return
        if folder != self.folder:
            self.folder, self.told, self.seen = folder, 0, None
        try:
            stat = (folder / METRICS).stat()
        except OSError:
            return
        if (stat.st_ino, stat.st_mtime_ns) == self.seen:  # submit replaces the file whole: unchanged, nothing to read
            return
        self.seen = (stat.st_ino, stat.st_mtime_ns)
        lines = read_json_lines(folder / METRICS)[0]
        for line in lines[self.told:]:
            self.gauges.round_recorded(line)
        self.told = max(self.told, len(lines))

    def current_run(self) -> Path | None:
        """The run folder the marker names (its ``serverapp/`` folder's parent), if any."""
        try:
            named = Path((self.results / CURRENT_RUN).read_text().strip())
        except OSError:
            return None
        return named.parent if named.is_absolute() else None

    def watch(self, stop: threading.Event) -> None:
        while not stop.wait(FOLLOW_S):
            self.step()
        self.step()  # the last round, written as the run ended

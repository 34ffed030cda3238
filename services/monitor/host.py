"""Host memory when there is no GPU: the RSS of each of the run's processes (psutil).

CPU runs then show the same picture as GPU runs: workers appear and vanish each round while
the long-lived client processes stay flat. The device row ("host") is the sum over the run's
processes, so that the summary's overall figure means the same thing as on a GPU: memory the
run holds, not what everything else on the machine does.
"""

from __future__ import annotations

import psutil

from services.monitor.processes import ProcessTable
from services.monitor.readings import MIB, DeviceReading, ProcessReading, Reading


class HostReader:
    source = "host"

    def __init__(self, table: ProcessTable) -> None:
        self.table = table
        self.total_mib = psutil.virtual_memory().total / MIB

    def read(self) -> Reading:
        processes = []
        for pid in self.table.tracked():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue  # exited between the listing and now: it holds nothing
            processes.append(ProcessReading(pid, "host", rss / MIB))
        used = sum(p.memory_mib for p in processes if p.memory_mib is not None)
        return Reading([DeviceReading("host", "host memory (RSS of the run's processes)", used, self.total_mib)], processes)

    def close(self) -> None:
        pass

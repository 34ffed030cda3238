"""Optional Prometheus metrics (off unless --metrics-port is set), so Grafana users can watch a
run live. Gauges are per device and per replica and role, never per pid: a new worker every
round would otherwise add a new time series every round."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from services.monitor.processes import WORKER_ROLES


class Exporter:
    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        labels = ["source", "device"]
        self.device_used = Gauge("bouquet_device_memory_used_mib", "Memory used on the device (GPU) or by the run's processes (host)", labels, registry=self.registry)
        self.device_total = Gauge("bouquet_device_memory_total_mib", "Capacity of the device or of the host", labels, registry=self.registry)
        self.utilization = Gauge("bouquet_device_utilization_percent", "GPU utilisation (NVML)", labels, registry=self.registry)
        self.replica = Gauge("bouquet_replica_memory_mib", "Memory held by a replica's processes of one role", ["source", "replica", "role"], registry=self.registry)
        self.workers = Gauge("bouquet_workers_alive", "Worker processes alive (client and server workers)", registry=self.registry)
        self.round = Gauge("bouquet_rounds_finished", "Rounds the server has recorded as finished", registry=self.registry)
        self.samples = Counter("bouquet_monitor_samples", "Samples taken by the memory monitor", registry=self.registry)
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)
        self._series: set[tuple[str, str, str]] = set()

    def update(self, rows: list[dict[str, Any]], rounds_finished: int) -> None:
        held: dict[tuple[str, str, str], float] = defaultdict(float)
        workers = 0
        for row in rows:
            if row["kind"] == "device":
                key = (row["source"], row["device"])
                self.device_used.labels(*key).set(row["memory_mib"])
                if row.get("total_mib") is not None:
                    self.device_total.labels(*key).set(row["total_mib"])
                if row.get("utilization_pct") is not None:
                    self.utilization.labels(*key).set(row["utilization_pct"])
            else:
                held[(row["source"], row["replica"], row["role"])] += row["memory_mib"] or 0.0
                workers += row["role"] in WORKER_ROLES
        for key in self._series - set(held):  # a replica whose workers are gone holds nothing now
            self.replica.labels(*key).set(0)
        for key, value in held.items():
            self.replica.labels(*key).set(value)
        self._series |= set(held)
        self.workers.set(workers)
        self.round.set(rounds_finished)
        self.samples.inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

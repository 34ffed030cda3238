"""The server's round figures for Prometheus (``--server-metrics-port``), beside the memory
monitor's gauges (services.monitor.exporter): the last recorded round, its accuracy, loss and
seconds, its clients by outcome, and counts over the run.

Kept as one snapshot, replaced whole under a lock as each round is recorded (no I/O on the
round's path), and read whole by the scrape: a scrape never mixes two rounds' figures."""

from __future__ import annotations

import threading
from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.tracking.figures import round_figures

OUTCOMES = ("ok", "failed", "missing", "rejected")
# gauge name -> (figure, help)
GAUGES = {
    "bouquet_server_round": ("round", "The last round the server recorded"),
    "bouquet_server_accuracy": ("accuracy", "The last recorded round's accuracy (server-side, or the clients' when the task has no held-out data)"),
    "bouquet_server_loss": ("loss", "The last recorded round's loss"),
    "bouquet_server_round_seconds": ("round_seconds", "The last recorded round's duration in seconds"),
    "bouquet_server_round_workers_peak": ("workers_peak", "Most training workers alive at once in the last recorded round"),
}


class RoundGauges:
    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._rounds = 0
        self._clients = {outcome: 0.0 for outcome in OUTCOMES}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

    def round_recorded(self, record: Mapping[str, Any]) -> None:
        figures = {**round_figures(record), "round": float(record["round"])}
        with self._lock:
            self._last = figures
            self._rounds += 1
            for outcome in OUTCOMES:
                self._clients[outcome] += figures.get(f"clients_{outcome}", 0.0)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            last, rounds, clients = dict(self._last), self._rounds, dict(self._clients)
        if not last:
            return
        for name, (figure, help_text) in GAUGES.items():
            if figure in last:
                yield GaugeMetricFamily(name, help_text, value=last[figure])
        by_outcome = GaugeMetricFamily("bouquet_server_round_clients", "Clients of the last recorded round by outcome (missing: partitions whose holder was not connected)", labels=["outcome"])
        for outcome in OUTCOMES:
            by_outcome.add_metric([outcome], last.get(f"clients_{outcome}", 0.0))
        yield by_outcome
        yield CounterMetricFamily("bouquet_server_rounds", "Rounds recorded by this server process", value=rounds)
        totals = CounterMetricFamily("bouquet_server_clients", "Clients over the rounds recorded by this server process, by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            totals.add_metric([outcome], clients[outcome])
        yield totals

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

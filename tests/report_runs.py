"""Run folders shaped like a compose run of N replicas on a CPU host, written from scratch for
the report's tests (and its screenshot at 100 replicas): memory.csv with the server, every
replica's client, idle forkserver and resource tracker, workers that take 2 slots in turn
(the rest fork and wait), metrics.jsonl with the workers' slot times, summary.json.

    PYTHONPATH=tests python -c "import report_runs; report_runs.main()" <folder> <replicas> [rounds]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from services.monitor import csvlog
from services.monitor.rounds import iso

T0 = 1_800_000_000.0
SERVER_MIB, CLIENT_MIB, FORKSERVER_MIB, TRACKER_MIB = 310.0, 95.0, 402.0, 7.0
WORKER_MIB, WAITING_MIB, EVALUATION_MIB = 160.0, 4.0, 180.0
SETTLE_MIB = 3.4  # a client's own heap after its first round (seen in compose)
SLOTS = 2
ROUND_SECONDS = 20.0


SERVER = "server-1"  # the names proxy names every service's containers so, the server's too


def name(replica: int) -> str:
    return f"client-{replica + 1}"  # as the names proxy gives them: compose service and number


def identity(replica: int) -> str:
    return f"{replica * 7919 + 0xA1B2C3D4E5:012x}"  # a container's hostname: its short id


class Samples:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.number = 0

    def add(self, at: float, processes: list[tuple]) -> None:
        t = T0 + at
        common = {"time": iso(t), "sample": self.number, "source": "host", "device": "host"}
        self.rows.append({**common, "kind": "device", "memory_mib": round(sum(p[-1] for p in processes), 1), "total_mib": 24_000.0})
        for pid, ppid, started, role, replica, ident, memory in processes:
            self.rows.append({**common, "kind": "process", "pid": pid, "ppid": ppid, "started": iso(T0 + started), "role": role,
                              "replica": replica, "identity": ident, "container": ident[:12], "memory_mib": memory})
        self.number += 1


def write_run(folder: Path, replicas: int, rounds: int = 3, leaky: int | None = None, hostile: bool = False) -> Path:
    """``leaky``: that replica's client keeps 90 MiB more after each round (the verdict fails);
    ``hostile``: round 2 rejects one update and misses a partition, the summary counts refusals."""
    folder.mkdir(parents=True)
    samples, records = Samples(), []

    def standing(after_round: int) -> list[tuple]:
        out = [(10, 1, 0.0, "server", SERVER, "", SERVER_MIB), (11, 10, 1.0, "helper", SERVER, "", FORKSERVER_MIB)]
        for r in range(replicas):
            base = 1000 + 10 * r
            own = CLIENT_MIB + (SETTLE_MIB if after_round else 0.0) + (90.0 * after_round if r == leaky else 0.0)
            out += [(base, 1, 2.0, "client", name(r), identity(r), own),
                    (base + 1, base, 3.0, "helper", name(r), identity(r), FORKSERVER_MIB),
                    (base + 2, base, 3.0, "helper", name(r), identity(r), TRACKER_MIB)]
        return out

    samples.add(5.0, standing(0))
    samples.add(9.0, standing(0))  # the baseline: the last sample before round 1
    pid = 100_000
    for number in range(1, rounds + 1):
        start = 10.0 + (number - 1) * (ROUND_SECONDS + 1.0)
        end = start + ROUND_SECONDS
        turn = ROUND_SECONDS * 0.8 / max(1, (replicas + SLOTS - 1) // SLOTS)
        clients = []
        for r in range(replicas):
            begin = start + 0.5 + (r // SLOTS) * turn
            clients.append({"id": identity(r), "partition": r, "num_examples": 72, "device": "cpu", "slots": SLOTS, "worker_pid": pid + r,
                            "worker_started_at": T0 + begin, "worker_ended_at": T0 + begin + turn - 0.01, "worker_start_seconds": 0.05})
        for step in (0.25, 0.5, 0.75):
            now = start + ROUND_SECONDS * 0.8 * step
            workers = []
            for r, client in enumerate(clients):
                if client["worker_ended_at"] - T0 < now:
                    continue
                running = client["worker_started_at"] - T0 <= now
                workers.append((pid + r, 1000 + 10 * r + 1, start + 0.4, "worker", name(r), identity(r), WORKER_MIB if running else WAITING_MIB))
            samples.add(now, standing(number - 1) + workers)
        samples.add(end - 0.5, standing(number - 1) + [(pid + 999, 11, end - 2.0, "server-worker", SERVER, "", EVALUATION_MIB)])
        samples.add(end + 0.1, standing(number))
        pid += 1000
        record = {
            "round": number, "trained": True, "started_at": iso(T0 + start), "ended_at": iso(T0 + end), "round_seconds": ROUND_SECONDS,
            "accuracy": 0.9 - 0.4 / number + 1 / 90, "loss": 1.5 / number, "clients": clients, "failures": [], "missing": [],
            "clients_ok": replicas, "clients_failed": 0, "num_partitions": replicas,
            "slots_per_device": {"cpu": SLOTS}, "concurrent_workers_peak": {"cpu": SLOTS},
        }
        if hostile and number == 2:
            rejected = clients.pop(3)
            dropped = clients.pop(0)
            record.update(clients=clients, clients_ok=replicas - 2, clients_rejected=1, aggregate_refused=False,
                          rejected=[{"id": rejected["id"], "partition": 3, "reason": "update is not finite (NaN in layer 2)"}],
                          missing=[{"id": dropped["id"], "partition": 0, "reason": "not connected (left, or restarting)"}])
        records.append(record)
    out = csvlog.MemoryCsv(folder / "memory.csv")
    out.write(samples.rows)
    out.close()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    summary = {
        "run_id": folder.name, "status": "completed", "rounds_requested": rounds, "rounds_completed": rounds, "rounds_recorded": rounds,
        "final_accuracy": records[-1]["accuracy"], "initial_accuracy": 0.1, "initial_loss": 2.3, "num_partitions": replicas,
        "partitions": {identity(r): r for r in range(replicas)},
        "rounds_missed_by_partition": {"0": {"missed": 1, "not_connected": 1}, "3": {"missed": 1, "rejected": 1}} if hostile else {},
    }
    if hostile:
        summary.update(updates_rejected=1, updates_clipped=4, joins_refused=[{"id": "intruder", "reason": "not in the roster"}])
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def main() -> None:
    from services.monitor.report import write_report

    folder, replicas = Path(sys.argv[1]), int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(write_report(write_run(folder, replicas, rounds, hostile=True)))

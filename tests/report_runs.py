"""Run folders shaped like a compose run of N replicas on a CPU host, written from scratch for
the report's tests (and its screenshot at 100 replicas): memory.csv with the server, every
replica's client, idle forkserver and resource tracker, workers that take 2 slots in turn
(the rest fork and wait), metrics.jsonl with the workers' slot times, summary.json.

    PYTHONPATH=tests python -c "import report_runs; report_runs.main()" <folder> <replicas> [rounds]
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.monitor import csvlog
from services.files import iso
from services.server.results import RoundRecorder, RunFolder

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


def write_run(folder: Path, replicas: int, rounds: int = 3, leaky: int | None = None, hostile: bool = False, refused_round: int | None = None) -> Path:
    """``leaky``: that replica's client keeps 90 MiB more after each round (the verdict fails);
    ``hostile``: round 1 clips 4 updates, round 2 rejects one update and misses a partition, one
    join is refused; ``refused_round``: that round's aggregate is refused. metrics.jsonl and the
    summary's counts are written by the server's own RoundRecorder (only the round's times are
    set to this run's clock)."""
    run = RunFolder(folder.parent, folder.name)
    recorder = RoundRecorder(run)
    samples = Samples()

    def standing(after_round: int) -> list[tuple]:
        out = [(10, 1, 0.0, "server", SERVER, "", SERVER_MIB), (11, 10, 1.0, "helper", SERVER, "", FORKSERVER_MIB)]
        for r in range(replicas):
            base = 1000 + 10 * r
            own = CLIENT_MIB + (SETTLE_MIB if after_round else 0.0) + (90.0 * after_round if r == leaky else 0.0)
            out += [(base, 1, 2.0, "client", name(r), identity(r), own),
                    (base + 1, base, 3.0, "helper", name(r), identity(r), FORKSERVER_MIB),
                    (base + 2, base, 3.0, "helper", name(r), identity(r), TRACKER_MIB)]
        return out

    if hostile:
        recorder.join_refused()
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
        recorder.round_started(number)
        rejected = []
        if hostile and number == 1:
            for client in clients[:4]:
                client.update(update_norm=1.5, clipped_from_norm=7.25)
        if hostile and number == 2:
            bad, gone = clients.pop(3), clients.pop(0)
            rejected = [{"id": bad["id"], "partition": 3, "reason": "array 0: 1 of 144 values are not finite (NaN)"}]
            recorder.partitions_missing([{"partition": 0, "id": gone["id"], "reason": "not connected (left, or restarting)"}])
        recorder.fit_finished(clients, [], replicas, rejected=rejected)
        if number == refused_round:
            recorder.aggregate_refused("aggregate array 0: 144 of 144 values are not finite")
        recorder.central_evaluated(1.5 / number, {"accuracy": 0.9 - 0.4 / number + 1 / 90})
        record = recorder.round_ended()
        record.update(started_at=iso(T0 + start), ended_at=iso(T0 + end), round_seconds=ROUND_SECONDS)
        recorder.commit(record)
    run.release()
    out = csvlog.MemoryCsv(folder / "memory.csv")
    out.write(samples.rows)
    out.close()
    summary = {
        "run_id": folder.name, "status": "completed", "rounds_requested": rounds, "rounds_completed": len(recorder.trained_rounds),
        "rounds_recorded": rounds, "final_accuracy": recorder.rounds[-1]["accuracy"], "initial_accuracy": 0.1, "initial_loss": 2.3,
        "num_partitions": replicas, "partitions": {identity(r): r for r in range(replicas)},
        "rounds_trained_by_partition": recorder.rounds_trained_by_partition(replicas),
        "rounds_missed_by_partition": recorder.rounds_missed_by_partition(),
        "updates_rejected": recorder.updates_rejected, "updates_clipped": recorder.updates_clipped, "joins_refused": recorder.joins_refused,
    }
    run.write_summary(summary)
    return folder


def main() -> None:
    from services.monitor.report import write_report

    folder, replicas = Path(sys.argv[1]), int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(write_report(write_run(folder, replicas, rounds, hostile=True)))

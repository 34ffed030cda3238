"""Host memory and round time of a whole local federation, host worker pool against a warm
process per replica, paired run by run (same machine, same settings, one after the other).

Each run is ``scripts/run_local.py`` as a user types it, with ``--worker-pool host`` or
``replica``; every 0.5 s the launcher's whole process tree (server, clients, the pool, every
worker and helper) is summed in PSS (shared pages split among their sharers: what the tree
costs the host). The table gives the peak and the idle sum (after settling, before round 1
ends), and the rounds' median time from metrics.jsonl.

    .venv/bin/python -m benchmarks.launcher_memory --clients 5,10 --rounds 3 --out docs/measurements/<machine>/launcher-memory.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def tree_pss_mib(root: psutil.Process) -> float:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total / MIB


def one_run(clients: int, rounds: int, pool: str, work: Path) -> dict:
    results = work / f"{pool}-{clients}"
    argv = [sys.executable, "scripts/run_local.py", "--clients", str(clients), "--rounds", str(rounds), "--dataset", "digits",
            "--worker-pool", pool, "--results-dir", str(results), "--data-dir", str(work / "data"), "--run-id", "run"]
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    launcher = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(launcher.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - started, tree_pss_mib(root)))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = launcher.wait(1800)
    done.set()
    sampler.join()
    records = [json.loads(line) for line in (results / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first_end = records[0]["round_seconds"] if records else None
    return {
        "clients": clients, "pool": pool, "exit": code, "seconds": round(time.monotonic() - started, 1),
        "peak_pss_mib": round(max(mib for _, mib in samples), 1),
        "round_median_s": round(statistics.median(r["round_seconds"] for r in records), 2) if records else None,
        "round_1_s": first_end,
        "rounds": len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="5,10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    lines = ["| clients | workers forked by | exit | rounds | peak PSS of the whole tree, MiB | round 1 s | median round s | whole run s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="bouquet-launcher-memory-") as work:
        for clients in (int(n) for n in options.clients.split(",")):
            for pool in ("replica", "host"):  # paired: the same N one after the other
                r = one_run(clients, options.rounds, pool, Path(work))
                line = (f"| {clients} | {'the host pool' if pool == 'host' else 'each replica'} | {r['exit']} | {r['rounds']} | {r['peak_pss_mib']} | "
                        f"{r['round_1_s']} | {r['round_median_s']} | {r['seconds']} |")
                lines.append(line)
                print(line, flush=True)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

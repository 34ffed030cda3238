"""What the forkserver's preload costs an idle replica and what it saves per worker start.

For each variant (spawn; a forkserver preloading nothing, torch only, or the modules of
services.worker.FORKSERVER_PRELOAD) a fresh probe process, shaped like an idle client (flwr and
grpc imported, no torch), starts its forkserver, lets it settle, and reads its process tree's
memory from /proc/<pid>/smaps_rollup: RSS, PSS (shared pages split among sharers) and the
anonymous part (what every replica pays for itself; file-backed pages of the same libraries are
shared by all replicas on a host through the page cache). Then it runs workers that import the
builtin task (torch) like a training job and reports their start time and what each adds
(its own private memory).

    .venv/bin/python -m benchmarks.idle_memory              # all variants, 5 workers each
    .venv/bin/python -m benchmarks.idle_memory --workers 3 --variants spawn,forkserver-torch
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services import settings
from services.settings import CommandLineOnly, choice, comma_list, optional, positive_int, setting

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (start method, forkserver preload)
    "spawn": ("spawn", None),
    "forkserver-bare": ("forkserver", []),
    "forkserver-torch": ("forkserver", ["torch"]),
    "forkserver-torch-dynamo": ("forkserver", ["torch", "torch._dynamo"]),
    "forkserver-full": ("forkserver", None),  # services.worker.FORKSERVER_PRELOAD as shipped
}
MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class IdleMemorySettings(CommandLineOnly):
    variants: list[str] = setting(comma_list(choice(*VARIANTS), ", ".join(VARIANTS)), list(VARIANTS), "variants to measure")
    workers: int = setting(positive_int, 5, "workers run per variant")
    probe: str | None = setting(optional(choice(*VARIANTS)), None, "measure this one variant in this process (what each variant's probe process runs)")


def rollup(pid: int) -> dict[str, float]:
    """RSS, PSS and anonymous memory of one process in MiB (smaps_rollup: Linux >= 4.14)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous", "Private_Clean", "Private_Dirty"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def tree_memory(root: int) -> dict[str, float]:
    import psutil

    total: dict[str, float] = {}
    processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    for process in processes:
        for key, value in rollup(process.pid).items():
            total[key] = total.get(key, 0.0) + value
    total["processes"] = len(processes)
    return total


def worker_private() -> dict[str, float]:
    """A worker job: import the task (torch) as a training job does, then say what this process holds privately."""
    import os

    began = time.monotonic()
    import services.task  # noqa: F401  (torch, numpy, the task machinery)
    import services.builtin_task  # noqa: F401
    import torch.optim  # noqa: F401  (what train() uses; pulls in torch._dynamo)

    imported = time.monotonic() - began
    memory = rollup(os.getpid())
    return {"private_mib": memory["Private_Clean"] + memory["Private_Dirty"], "pss_mib": memory["Pss"], "rss_mib": memory["Rss"], "import_seconds": imported}


def probe(variant: str, workers: int) -> dict[str, object]:
    """Run inside a fresh process: one idle 'client' and its workers."""
    import os

    import flwr.client  # noqa: F401  an idle client has these loaded
    import grpc  # noqa: F401

    from services import worker

    start_method, preload = VARIANTS[variant]
    if preload is not None:
        worker.FORKSERVER_PRELOAD[:] = preload
    worker.prestart(start_method)
    if start_method == "forkserver":  # the forkserver answers only once its preload is imported
        worker.run("benchmarks.idle_memory:rollup", {"pid": os.getpid()}, timeout=300, start_method=start_method)
    time.sleep(2.0)  # let the tree settle (no worker alive)
    idle = tree_memory(os.getpid())
    starts, private = [], []
    for _ in range(workers):
        result = worker.run("benchmarks.idle_memory:worker_private", {}, timeout=300, start_method=start_method)
        starts.append(result.start_seconds + result.value["import_seconds"])  # until the task is imported and could train
        private.append(result.value["private_mib"])
    return {
        "variant": variant, "idle": idle,
        "worker_start_seconds": statistics.median(starts), "worker_start_all": [round(s, 3) for s in starts],
        "worker_private_mib": statistics.median(private),
    }


def main(argv: list[str] | None = None) -> int:
    args = settings.parse(IdleMemorySettings, argv, program="idle_memory.py", description=__doc__)
    if args.probe:
        print(json.dumps(probe(args.probe, args.workers)))
        return 0
    results = []
    for variant in args.variants:
        done = subprocess.run([sys.executable, "-m", "benchmarks.idle_memory", "--probe", variant, "--workers", str(args.workers)],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| variant | idle tree RSS MiB | idle tree PSS MiB | idle anonymous MiB | processes | worker ready s (median: start + task imported) | worker private MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        idle = r["idle"]
        print(f"| {r['variant']} | {idle['Rss']:.0f} | {idle['Pss']:.0f} | {idle['Anonymous']:.0f} | {idle['processes']:.0f} | {r['worker_start_seconds']:.3f} | {r['worker_private_mib']:.0f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

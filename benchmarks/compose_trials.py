"""Fresh `docker compose up --scale client=N` runs in a row, the way a user types it, and what
each one settled on: the evidence behind "every replica gets its own partition, every time".

    .venv/bin/python -m benchmarks.compose_trials --runs 10 --replicas 20 --out docs/measurements/<machine>/compose-trials.md
    .venv/bin/python -m benchmarks.compose_trials --runs 3 --replicas 20 --app examples/quickstart-app --rounds 3   # app mode
    .venv/bin/python -m benchmarks.compose_trials --runs 1 --replicas 5 --app examples/quickstart-app --rounds 6 --kill-at-round 3

App mode (``--app``): FL_MODE=app with the App as the task folder, `up`, then `run --rm submit` as the
README says; also recorded: each round's seconds (metrics.jsonl) and the messages' median
``app_load_seconds`` (messages.jsonl). ``--kill-at-round K`` (app mode): `docker kill` of one
replica as the ServerApp starts round K (round-starts.jsonl), then what each round recorded of it.

Each run: `up --detach --no-build --scale client=N` with the CPU switch (COMPOSE_FILE=docker-compose.yml),
the repository's .env otherwise unchanged, a results folder of its own; waits for the server to
exit; records settling, rounds, memory verdict and peak `docker stats` memory; then `down --volumes`.
Needs the images from scripts/build_images_offline.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from services.files import ROUND_STARTS, read_json_lines, read_rounds

REPO = Path(__file__).resolve().parent.parent
UNITS_MIB = {"B": 1 / 2**20, "KiB": 1 / 1024, "kB": 1e3 / 2**20, "MiB": 1, "MB": 1e6 / 2**20, "GiB": 1024, "GB": 1e9 / 2**20}


def docker_stats_mib(project: str) -> dict[str, float]:
    """Memory per container of the project now, as `docker stats` shows it (MiB)."""
    names = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"], capture_output=True, text=True).stdout.split()
    if not names:
        return {}
    out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *names], capture_output=True, text=True).stdout
    usage = {}
    for line in out.splitlines():
        name, used = line.split()[0], line.split()[1]
        number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]+)", used).groups()
        usage[name] = float(number) * UNITS_MIB[unit]
    return usage


def app_settings(app: Path, rounds: int, work: Path) -> dict[str, str]:
    """FL_MODE=app with a copy of the App as the task folder (readable by the containers' user)."""
    folder = work / "app"
    if not folder.exists():
        shutil.copytree(app, folder, ignore=shutil.ignore_patterns("__pycache__"))
        for path in (folder, *folder.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
    return {"FL_MODE": "app", "BOUQUET_TASK_DIR": str(folder), "FL_APP_RUN_CONFIG": f"num-server-rounds={rounds}"}


def app_facts(folder: Path) -> dict:
    """Round seconds (metrics.jsonl) and the messages' median app_load_seconds (messages.jsonl)."""
    rounds = read_rounds(folder)
    seconds = [round(datetime.fromisoformat(r["ended_at"]).timestamp() - datetime.fromisoformat(r["started_at"]).timestamp(), 1) for r in rounds]
    messages = [json.loads(line) for line in (folder / "messages.jsonl").read_text().splitlines()] if (folder / "messages.jsonl").exists() else []
    loads = sorted(m["app_load_seconds"] for m in messages if m.get("app_load_seconds") is not None)
    warm = sorted(m["app_load_seconds"] for m in messages if m.get("app_was_warm"))
    return {"round_seconds": seconds, "app_load_median_s": loads[len(loads) // 2] if loads else None,
            "app_load_warm_median_s": warm[len(warm) // 2] if warm else None, "messages": len(messages), "messages_warm": len(warm)}


def kill_a_replica_at(project: str, folder: Path, round_number: int, stop: threading.Event, killed: dict) -> None:
    """`docker kill` of the last client container once the ServerApp noted round ``round_number``'s start."""
    while not stop.wait(0.2):
        if any(line["round"] >= round_number for line in read_json_lines(folder / ROUND_STARTS)[0]):
            names = sorted(subprocess.run(["docker", "ps", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={project}",
                                           "--filter", "label=com.docker.compose.service=client"], capture_output=True, text=True).stdout.split())
            hostname = subprocess.run(["docker", "inspect", "-f", "{{.Config.Hostname}}", names[-1]], capture_output=True, text=True).stdout.strip()
            subprocess.run(["docker", "kill", names[-1]], capture_output=True)
            killed.update(container=names[-1], identity=hostname, at=time.time())
            return


def absences(folder: Path, killed: dict) -> dict:
    """What each round recorded of the killed replica, and the run's misses."""
    summary = json.loads((folder / "summary.json").read_text())
    rounds = read_rounds(folder)
    said = []
    for record in rounds:
        failure = next((f["cause"] for f in record.get("failures", []) if f["id"] == killed.get("identity")), None)
        gap = next((g["reason"] for g in record.get("missing", []) if g["id"] == killed.get("identity")), None)
        said.append(f"round {record['round']} ({record['round_seconds']} s): " + (f"failed: {failure}" if failure else f"missing: {gap}" if gap else "ok"))
    return {"killed": killed, "said": said, "rounds_missed_by_partition": summary.get("rounds_missed_by_partition")}


def one_run(compose: list[str], replicas: int, index: int, work: Path, app: Path | None = None, rounds: int = 3, kill_at: int | None = None) -> dict:
    project = f"bouquet-trial{index}"
    results = work / f"run{index}"
    results.mkdir(parents=True)
    results.chmod(0o777)
    env = {"COMPOSE_FILE": "docker-compose.yml", "COMPOSE_PROJECT_NAME": project, "BOUQUET_RESULTS_DIR": str(results), "FL_RUN_ID": "trial",
           **(app_settings(app, rounds, work) if app else {})}
    run = lambda *args, **kw: subprocess.run([*compose, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, **kw)  # noqa: E731
    started, started_at = time.monotonic(), time.time()
    peak_total, stop = [0.0, {}], threading.Event()
    peak_each: dict[str, float] = {}  # per container, over the run

    def watch_stats() -> None:
        while not stop.is_set():
            usage = docker_stats_mib(project)
            for name, mib in usage.items():
                peak_each[name] = max(peak_each.get(name, 0.0), mib)
            if sum(usage.values()) > peak_total[0]:
                peak_total[0], peak_total[1] = sum(usage.values()), usage
    watcher = threading.Thread(target=watch_stats, daemon=True)
    try:
        up = run("up", "--detach", "--no-build", "--scale", f"client={replicas}")
        if up.returncode != 0:
            return {"run": index, "error": f"up exited {up.returncode}: {up.stderr[-500:]}"}
        watcher.start()
        killed: dict = {}
        if kill_at:
            threading.Thread(target=kill_a_replica_at, args=(project, results / "trial", kill_at, stop, killed), daemon=True).start()
        if app:  # the submission is the run: it exits with the run's outcome
            exit_code = str(run("run", "--rm", "submit").returncode)
        else:
            server = run("ps", "-q", "server").stdout.strip()
            while subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", server], capture_output=True, text=True).stdout.strip() not in ("exited", "dead"):
                time.sleep(2)
            exit_code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", server], capture_output=True, text=True).stdout.strip()
        folder = results / "trial"
        deadline = time.monotonic() + 120
        while not (folder / "report.html").exists() and time.monotonic() < deadline:  # the monitor writes it last
            time.sleep(1)
        stop.set()
        ps = run("ps", "--all", "--format", "{{.Service}} {{.State}} {{.ExitCode}}").stdout.splitlines()
        summary = json.loads((folder / "summary.json").read_text())
        memory = json.loads((folder / "memory_summary.json").read_text()) if (folder / "memory_summary.json").exists() else {}
        rounds = read_rounds(folder)
        clients = sorted(mib for name, mib in peak_each.items() if "-client-" in name)
        return {
            "round1_s": round(datetime.fromisoformat(rounds[0]["ended_at"]).timestamp() - started_at, 1) if rounds else None,
            "client_peak_median_mib": round(clients[len(clients) // 2], 1) if clients else None,
            "client_peak_max_mib": round(clients[-1], 1) if clients else None,
            "others_peak_mib": {name.removeprefix(f"{project}-"): round(mib, 1) for name, mib in peak_each.items() if "-client-" not in name},
            "run": index,
            "seconds": round(time.monotonic() - started, 1),
            "server_exit": exit_code,
            "status": summary["status"],
            "num_partitions": summary.get("num_partitions", len(summary.get("partitions") or {})),  # app mode: its partitions map
            "settled": summary.get("settled"),
            "clients_ok": [r["clients_ok"] for r in rounds],
            "final_accuracy": summary.get("final_accuracy"),
            "verdict": memory.get("verdict", {}).get("text"),
            "peak_mib": memory.get("peak", {}).get("overall_mib"),
            "docker_stats_peak_mib": round(peak_total[0], 1),
            "report": (folder / "report.html").exists(),
            "ps": sorted(set(ps)),
            **(app_facts(folder) if app else {}),
            **(absences(folder, killed) if kill_at else {}),
        }
    finally:
        stop.set()
        run("down", "--volumes", "--remove-orphans", "--timeout", "10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--compose", default="docker compose", help="the compose command (default: Compose v2)")
    parser.add_argument("--out", type=Path, help="write the table here (Markdown) as well")
    parser.add_argument("--keep", type=Path, help="copy each run's folder (report.html, memory.csv, ...) here as run<N>/")
    parser.add_argument("--app", type=Path, help="app mode: this Flower App (e.g. examples/quickstart-app), submitted with `run --rm submit`")
    parser.add_argument("--rounds", type=int, default=3, help="app mode: num-server-rounds")
    parser.add_argument("--kill-at-round", type=int, help="app mode: docker kill one replica as this round starts")
    options = parser.parse_args()
    compose = shlex.split(options.compose)
    version = subprocess.run([*compose, "version"], capture_output=True, text=True).stdout.strip()
    mode = f", app mode ({options.app}, {options.rounds} rounds)" if options.app else ""
    lines = [f"{options.runs} fresh `{options.compose} up --scale client={options.replicas}` runs ({version}), CPU images, .env defaults{mode}", "",
             "| run | s | up → round 1 done s | server exit | status | partitions | clients ok per round | final acc | memory verdict | monitor peak MiB | docker stats peak MiB | replica peak MiB (median / max) | report.html |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="bouquet-trials-") as work:
        for index in range(1, options.runs + 1):
            try:
                r = one_run(compose, options.replicas, index, Path(work), options.app, options.rounds, options.kill_at_round)
            except Exception as error:  # one run's surprise must not lose its folder (--keep) or the next runs
                r = {"error": f"{type(error).__name__}: {error}"}
            if options.keep and (Path(work) / f"run{index}" / "trial").is_dir():
                shutil.copytree(Path(work) / f"run{index}" / "trial", options.keep / f"run{index}", dirs_exist_ok=True)
            if "error" in r:
                line = f"| {index} | | | | error: {r['error']} | | | | | | | | |"
            else:
                line = (f"| {index} | {r['seconds']} | {r['round1_s']} | {r['server_exit']} | {r['status']} | {r['num_partitions']} | {r['clients_ok']} | "
                        f"{r['final_accuracy'] if r['final_accuracy'] is not None else float('nan'):.3f} | {r['verdict']} | {r['peak_mib']} | {r['docker_stats_peak_mib']} | "
                        f"{r['client_peak_median_mib']} / {r['client_peak_max_mib']} | {r['report']} |")
            lines.append(line)
            print(line, flush=True)
            print(f"    settled: {r.get('settled')}; ps: {r.get('ps')}; other containers' peaks (MiB): {r.get('others_peak_mib')}", flush=True)
            lines.append(f"<!-- run {index}: other containers' peaks (MiB): {r.get('others_peak_mib')} -->")
            if options.app and "error" not in r:
                line = (f"    app mode: round seconds {r['round_seconds']}; app_load_seconds median {r['app_load_median_s']} (warm messages: "
                        f"{r['messages_warm']} of {r['messages']}, median {r['app_load_warm_median_s']})")
                print(line, flush=True)
                lines.append(line)
            if options.kill_at_round and "error" not in r:
                for line in [f"    killed {r['killed']}", *(f"    {said}" for said in r["said"]), f"    rounds_missed_by_partition: {r['rounds_missed_by_partition']}"]:
                    print(line, flush=True)
                    lines.append(line)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""What app mode's front (nginx before the SuperLink, services/appmode/front.py) costs a round, paired in one run.

One link (SuperLink and front, with Bouquet's TLS certificates and SuperNode keys as documented),
then, alternating ``front, direct, direct, front, ...``, N node agents whose SuperNodes dial
either the front's published address or the SuperLink's own loopback address (reachable on this
host only: this is the comparison, not a setup), each followed by one submission of the example
App (examples/quickstart-app) over the Control listener. The same identities every time, so
every set gets the same partitions; each set is stopped before the next starts.
Round time: metrics.jsonl's ``round_seconds`` (Flower's round start to the next one), the first
and last round of each run left out (start-up; the last runs to the run's end).

    .venv/bin/python scripts/bench_front.py --clients 3 --rounds 5 --pairs 2 --out bench-front

Writes front-bench.json and front-bench.md into --out and prints the table. docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services import joining, lifetime
from services import settings as settings_module
from services.certs import make_certificates
from services.net import free_port
from services.settings import CommandLineOnly, boolean, path, positive_int, setting

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "quickstart-app"
PROGRAM = "bench_front.py"
START_S = 900.0  # a loaded host starts the SuperLink and N warm processes in minutes


@dataclass(frozen=True, kw_only=True)
class FrontBenchSettings(CommandLineOnly):
    clients: int = setting(positive_int, 3, "SuperNodes (replicas) per run")
    rounds: int = setting(positive_int, 5, "rounds per run (the first and last are left out of the figures)")
    pairs: int = setting(positive_int, 2, "runs through the front and as many direct, alternating")
    tls: bool = setting(boolean, True, "Bouquet's TLS certificates and SuperNode keys, as documented (off: plain HTTP, no keys)")
    out: str = setting(path, "bench-front", "folder for front-bench.json / front-bench.md and the runs")


class Link:
    """The link of the whole benchmark, and node sets started and stopped around it."""

    def __init__(self, work: Path, options: FrontBenchSettings) -> None:
        self.work, self.options = work, options
        self.tls_dir = None
        if options.tls:
            self.tls_dir = work / "tls"
            make_certificates(self.tls_dir, ["localhost"], ["127.0.0.1"], days=1)
        self.data, self.results = work / "data", work / "results"
        self.published, self.control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.token = work / "submit-token"
        self.token.write_text(joining.new_token() + "\n")
        self.token.chmod(0o600)
        self.tls_flags = ["--tls-dir", str(self.tls_dir)] if self.tls_dir else []
        self.log = work / "link.log"
        self.process = _start(self.log, ["-m", "services.appmode.link", "--listen-address", self.published, "--control-address", self.control,
                                         "--submit-token-file", str(self.token), "--min-clients", str(options.clients), "--join-grace", "0",
                                         "--data-dir", str(self.data), "--results-dir", str(self.results), *self.tls_flags])

    def superlink(self) -> str:
        deadline = time.monotonic() + START_S
        while not (found := re.search(r"flower-superlink \(pid \d+\) on (127\.0\.0\.1:\d+)", _text(self.log))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the link did not start its SuperLink:\n{_text(self.log)[-2000:]}")
            time.sleep(0.5)
        return found.group(1)

    def run(self, label: str, index: int, address: str) -> dict:
        """N nodes dialling ``address``, one submission; the run's round times."""
        nodes = [_start(self.work / f"{label}-{index}-node-{n}.log", ["-m", "services.appmode.node", "--server-address", address, "--data-dir", str(self.data),
                                                                       "--connect-timeout", str(START_S), *self.tls_flags], {"FL_CLIENT_ID": f"node-{n}"})
                 for n in range(self.options.clients)]
        run_id = f"{label}-{index}"
        try:
            submitted = subprocess.run([sys.executable, "-m", "services.appmode.submit", "--app", str(EXAMPLE), "--server-address", self.control,
                                        "--submit-token-file", str(self.token), "--data-dir", str(self.data), "--results-dir", str(self.results),
                                        "--run-id", run_id, "--app-run-config", f"num-server-rounds={self.options.rounds}", "--run-timeout", str(START_S),
                                        *self.tls_flags], cwd=REPO, capture_output=True, text=True, timeout=2 * START_S)
        finally:
            _stop(nodes)
        if submitted.returncode != 0:
            raise RuntimeError(f"{run_id} failed (exit {submitted.returncode}):\n{submitted.stdout[-2000:]}{submitted.stderr[-2000:]}")
        rounds = [json.loads(line) for line in (self.results / run_id / "metrics.jsonl").read_text().splitlines()]
        middle = [line["round_seconds"] for line in rounds[1:-1]]
        return {"label": label, "run": run_id, "round_seconds": middle}

    def stop(self) -> None:
        _stop([self.process])


def _start(log: Path, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return lifetime.start([sys.executable, *argv], dies_with_parent=False, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _stop(processes: list[subprocess.Popen]) -> None:
    lifetime.stop_all(processes, grace=60)


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def order(pairs: int) -> list[str]:
    """front, direct, direct, front, ...: each variant as often first as second, against drift."""
    return [variant for pair in range(pairs) for variant in (("front", "direct") if pair % 2 == 0 else ("direct", "front"))]


def summarize(runs: list[dict]) -> dict:
    by = {label: [s for run in runs if run["label"] == label for s in run["round_seconds"]] for label in ("front", "direct")}
    medians = {label: statistics.median(values) if values else None for label, values in by.items()}
    ratio = None if None in medians.values() else medians["front"] / medians["direct"]
    return {"rounds": by, "median_round_seconds": medians, "front_over_direct": ratio}


def markdown(meta: dict, summary: dict) -> str:
    lines = [f"# The front's cost per round ({meta['clients']} SuperNodes, {meta['rounds']} rounds a run, {meta['pairs']} pairs, TLS {'on' if meta['tls'] else 'off'})", "",
             f"{meta['date']}, {meta['cpus']} CPUs; rounds 2..{meta['rounds'] - 1} of each run.", "",
             "| SuperNodes dial | rounds | median round (s) | each round (s) |", "|---|---|---|---|"]
    for label in ("front", "direct"):
        values = summary["rounds"][label]
        lines.append(f"| {'the front (nginx)' if label == 'front' else 'the SuperLink directly'} | {len(values)} | {summary['median_round_seconds'][label]:.3f} | {', '.join(f'{v:.2f}' for v in values)} |")
    ratio = summary["front_over_direct"]
    lines += ["", f"front / direct (medians): **{ratio:.3f}** ({(ratio - 1) * 100:+.1f} %)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = settings_module.parse(FrontBenchSettings, argv, program=PROGRAM, description=__doc__)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="front-bench-", dir=out))
    link = Link(work, options)
    runs = []
    try:
        direct = link.superlink()
        for index, label in enumerate(order(options.pairs)):
            runs.append(link.run(label, index, link.published if label == "front" else direct))
            print(f"{runs[-1]['run']}: rounds {runs[-1]['round_seconds']}", file=sys.stderr, flush=True)
    finally:
        link.stop()
    meta = {"clients": options.clients, "rounds": options.rounds, "pairs": options.pairs, "tls": options.tls,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    summary = summarize(runs)
    (out / "front-bench.json").write_text(json.dumps({"meta": meta, "runs": runs, **summary}, indent=2) + "\n")
    (out / "front-bench.md").write_text(markdown(meta, summary))
    print(markdown(meta, summary))
    return 0

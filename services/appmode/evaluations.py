"""The ServerApp's central evaluations, read from what Flower's strategy logs in ``flwr-run.log``.

A Flower App evaluates inside its own ServerApp process, which Bouquet never sees; Flower's
strategies log the results ("Initial global evaluation results: {...}" before round 1, and
"Global evaluation" followed by "MetricRecord: {...}" in each "[ROUND k/N]"). Reading them lets
app mode's metrics.jsonl and summary.json carry accuracy and loss like task mode's, so the report
draws its accuracy curve. Only numeric ``accuracy`` and ``loss`` are taken; an App whose strategy
logs other names (or nothing) simply has none.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")  # Flower's strategies log it as each round starts: round, rounds
INITIAL = re.compile(r"Initial global evaluation results: (\{.*\})")
RECORD = re.compile(r"MetricRecord: (\{.*\})")
KEPT = ("accuracy", "loss")


@dataclass
class CentralEvaluations:
    initial: dict[str, float] = field(default_factory=dict)
    by_round: dict[int, dict[str, float]] = field(default_factory=dict)


def read(log_text: str) -> CentralEvaluations:
    found = CentralEvaluations()
    current, expecting = 0, False
    for line in log_text.splitlines():
        if match := ROUND.search(line):
            current, expecting = int(match.group(1)), False
        elif match := INITIAL.search(line):
            found.initial = _figures(match.group(1))
        elif line.rstrip().endswith("Global evaluation"):
            expecting = True
        elif expecting and (match := RECORD.search(line)):
            if current:
                found.by_round[current] = _figures(match.group(1))
            expecting = False
    return found


def _figures(literal: str) -> dict[str, float]:
    try:
        values: Any = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return {}
    if not isinstance(values, dict):
        return {}
    return {key: float(values[key]) for key in KEPT if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool)}

"""Which of Flower's aggregation strategies runs, with which hyper-parameters (FL_STRATEGY,
FL_STRATEGY_ARGS). Flower's own classes do the aggregating; Bouquet's duties (membership,
partitions, records, central evaluation) wrap them in ``services.server.strategy``, and the
round loop (``services.server.rounds``) writes the checkpoints.

The arguments a user may set are the strategy constructor's own numbers and flags, found by
introspection, minus the ones Bouquet decides (who trains, failures are accepted); each value
is converted to the parameter's type, so a typo or a bad value is refused before anything starts.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.common import Parameters
from flwr.server import strategy as flower_strategies
from flwr.server.strategy import Strategy

from services.settings import STRATEGIES, SettingError, boolean

CLASSES = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
}
assert set(CLASSES) == set(STRATEGIES)
# Bouquet samples the clients itself and always accepts failures (they are recorded per round).
OWNED_BY_BOUQUET = {"fraction_fit", "fraction_evaluate", "min_fit_clients", "min_evaluate_clients", "min_available_clients", "accept_failures", "inplace"}
CONVERTERS = {float: float, int: int, bool: boolean}
LABEL = "--strategy-args / FL_STRATEGY_ARGS"


def strategy_class(name: str) -> type[Strategy]:
    return getattr(flower_strategies, CLASSES[name])


def tunable(name: str) -> dict[str, inspect.Parameter]:
    """The constructor's parameters a user may set: plain numbers and flags Bouquet does not own."""
    parameters = inspect.signature(strategy_class(name)).parameters.values()
    return {p.name: p for p in parameters if p.annotation in CONVERTERS and p.name not in OWNED_BY_BOUQUET}


def parse_args(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """FL_STRATEGY_ARGS checked against the strategy: known keys, values of the right type, and
    every required one present. Raises SettingError naming what is wrong."""
    allowed = tunable(name)
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise SettingError(f"{LABEL}: {CLASSES[name]} ({name}) has no argument {key!r}; it takes: {known}")
        kind = allowed[key].annotation
        try:
            values[key] = CONVERTERS[kind](text)
        except ValueError:
            raise SettingError(f"{LABEL}: {key}={text!r} must be {'true/false' if kind is bool else 'a number' if kind is float else 'an integer'}") from None
    missing = [p for p in allowed.values() if p.default is inspect.Parameter.empty and p.name not in values]
    if missing:
        example = ",".join(f"{p.name}=..." for p in missing)
        raise SettingError(f"--strategy / FL_STRATEGY = {name!r} needs {example} in {LABEL}")
    return values


def build(name: str, args: dict[str, Any], initial: Parameters) -> Strategy:
    """The Flower strategy, told to accept failures and to start from Bouquet's initial model
    (the adaptive ones, FedAdam and co., keep it as their first "current" weights)."""
    return strategy_class(name)(accept_failures=True, initial_parameters=initial, min_fit_clients=1, min_available_clients=1, **args)

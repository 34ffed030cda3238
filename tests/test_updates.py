"""Issue 19: the checks every client update passes before a Flower strategy sees it
(services/updates.py, shared with app mode's reply checks), and what BouquetStrategy.aggregate_fit does with them, with
Flower's real FedAvg behind it: bad updates left out and recorded, far ones clipped, and a
non-finite aggregate refused with the previous model kept."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.server.strategy import FedAvg
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from services import settings as settings_module
from services import updates
from services.server.strategy import BouquetStrategy
from services.server.membership import Membership
from services.server.registry import PartitionRegistry
from services.server.results import RoundRecorder, RunFolder
from services.settings import ServerSettings
from services.taskspec import TaskSpec


def model() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(16, 1, 3, 3)).astype(np.float32), np.zeros(16, np.float32), np.array(7, np.int64)]


LAYOUT = updates.layout_of(model())


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda w: [np.zeros((17, 1, 3, 3), np.float32), *w[1:]], "array 0: shape (17,1,3,3), expected (16,1,3,3)"),
        (lambda w: [w[0], w[1].astype(np.float64), w[2]], "array 1: dtype float64, expected float32"),
        (lambda w: w[:2], "2 arrays, expected 3"),
        (lambda w: [*w, w[1]], "4 arrays, expected 3"),
        (lambda w: [np.where(np.arange(144).reshape(16, 1, 3, 3) < 2, np.nan, w[0]).astype(np.float32), *w[1:]], "array 0: 2 of 144 values are not finite (NaN)"),
        (lambda w: [w[0], np.full(16, np.inf, np.float32), w[2]], "array 1: 16 of 16 values are not finite (Inf)"),
        (lambda w: [w[0], np.array([np.nan, np.inf, -np.inf, *[0.0] * 13], np.float32), w[2]], "array 1: 3 of 16 values are not finite (NaN/Inf)"),
    ],
)
def test_a_broken_update_is_named_by_array_and_problem(change, reason):
    assert updates.update_problem(LAYOUT, change(model()), 10, {}) == reason


@pytest.mark.parametrize("examples, reason", [(0, "num_examples 0, expected a positive integer"), (-5, "num_examples -5, expected a positive integer"),
                                              (True, "num_examples True is not an integer"), (2.5, "num_examples 2.5 is not an integer")])
def test_the_number_of_examples_must_be_a_positive_integer(examples, reason):
    assert updates.update_problem(LAYOUT, model(), examples, {}) == reason


def test_numeric_metrics_must_be_finite_and_text_is_left_alone():
    assert updates.update_problem(LAYOUT, model(), 10, {"train_loss": float("inf")}) == "metric 'train_loss' is inf"
    assert updates.update_problem(LAYOUT, model(), 10, {"per_class": [0.5, float("nan")]}) == "metric 'per_class' is [0.5, nan]"
    assert updates.update_problem(LAYOUT, model(), np.int64(10), {"train_loss": 0.3, "note": "nan", "steps": 12}) is None


def test_a_client_evaluation_is_checked_too():
    assert updates.evaluation_problem(0.5, 10, {"accuracy": 0.9}) is None
    assert updates.evaluation_problem(float("nan"), 10, {}) == "loss nan is not a finite number"
    assert updates.evaluation_problem(0.5, 0, {}) == "num_examples 0, expected a positive integer"
    assert updates.evaluation_problem(0.5, 10, {"accuracy": "high"}) == "metric 'accuracy' is 'high', expected a number"
    assert updates.evaluation_problem(0.5, 10, {"accuracy": 7.0}) == "metric 'accuracy' is 7.0, expected a fraction in [0, 1]"
    assert updates.evaluation_problem(0.5, 10, {"accuracy": -0.1}) == "metric 'accuracy' is -0.1, expected a fraction in [0, 1]"
    assert updates.evaluation_problem(0.5, 10, {"accuracy": 1}) is None


def test_clipping_moves_an_update_back_to_the_bound_along_its_own_direction():
    reference = model()
    far = [reference[0] + 3.0, reference[1] + 4.0, np.array(9, np.int64)]
    norm = updates.update_norm(reference, far)
    assert norm == pytest.approx(np.sqrt(144 * 9 + 16 * 16))  # the integer buffer is no distance
    clipped, before = updates.clip_update(reference, far, 2.0)
    assert before == pytest.approx(norm)
    assert updates.update_norm(reference, clipped) == pytest.approx(2.0, rel=1e-5)
    delta = np.concatenate([(c - r).ravel() for c, r in zip(clipped[:2], reference[:2])])
    assert np.allclose(delta / np.linalg.norm(delta), np.concatenate([np.full(144, 3.0), np.full(16, 4.0)]) / norm, atol=1e-5)
    assert [a.dtype for a in clipped] == [a.dtype for a in far] and clipped[2] == 9
    near, _ = updates.clip_update(reference, [reference[0] + 0.01, *reference[1:]], 2.0)
    assert all(np.array_equal(a, b) for a, b in zip(near, [reference[0] + 0.01, *reference[1:]]))


def test_an_aggregate_keeps_the_models_dtypes_and_a_non_finite_one_is_named():
    averaged = [model()[0].astype(np.float64), model()[1], np.array(7.4)]
    kept = updates.in_layout(LAYOUT, averaged)
    assert [a.dtype for a in kept] == [np.float32, np.float32, np.int64] and kept[2] == 7
    assert updates.aggregate_problem(LAYOUT, kept) is None
    assert updates.aggregate_problem(LAYOUT, [np.full((16, 1, 3, 3), np.inf, np.float32), *kept[1:]]) == "aggregate array 0: 144 of 144 values are not finite"
    assert updates.checked_aggregate(LAYOUT, averaged)[2] == 7
    # finite as float64, Inf once cast to the model's float32
    overflowing = [np.full((16, 1, 3, 3), 1e39), *averaged[1:]]
    assert updates.aggregate_problem(LAYOUT, overflowing) is None
    assert updates.checked_aggregate(LAYOUT, overflowing) == "aggregate array 0: 144 of 144 values are not finite in the model's dtypes"
    # a NaN in an integer buffer is named before rounding could hide it
    assert updates.checked_aggregate(LAYOUT, [*averaged[:2], np.array(np.nan)]) == "aggregate array 2: 1 of 1 values are not finite"


# --- BouquetStrategy.aggregate_fit with Flower's FedAvg -------------------------------------------


class Evaluator:
    def initial_weights(self):
        return model()


def strategy(tmp_path, answering: int, **values) -> tuple[BouquetStrategy, RoundRecorder]:
    settings = settings_module.parse(ServerSettings, [f"--{k.replace('_', '-')}={v}" for k, v in values.items()], environ={})
    recorder = RoundRecorder(RunFolder(tmp_path, "unit"))
    registry = PartitionRegistry()
    registry.settle(4)
    bouquet = BouquetStrategy(
        spec=TaskSpec.from_settings(settings), settings=settings, membership=Membership(registry, 1, 0, 1), clients=None,
        recorder=recorder, evaluator=Evaluator(),
    )
    initial = bouquet.initialize_parameters(None)
    bouquet._global_parameters = initial
    bouquet._global_weights = parameters_to_ndarrays(initial)
    bouquet._sampled = {f"cid-{i}": (f"client-{i}", i) for i in range(answering)}
    recorder.round_started(1)
    return bouquet, recorder


def answer(i: int, weights: list[np.ndarray], examples: int = 10):
    return SimpleNamespace(cid=f"cid-{i}"), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), examples, {"train_loss": 0.1})


def test_bad_updates_are_left_out_and_recorded_and_the_rest_averaged(tmp_path):
    bouquet, recorder = strategy(tmp_path, 3)
    good = [model()[0] + 1.0, model()[1], model()[2]]
    broken = [np.zeros((17, 1, 3, 3), np.float32), *model()[1:]]
    aggregated, _ = bouquet.aggregate_fit(1, [answer(0, good), answer(1, broken), answer(2, good, examples=-1)], [])
    assert np.allclose(parameters_to_ndarrays(aggregated)[0], good[0])
    record = recorder.round_ended()
    assert (record["clients_ok"], record["clients_failed"], record["clients_rejected"], record["trained"]) == (1, 0, 2, True)
    assert record["rejected"] == [
        {"id": "client-1", "partition": 1, "reason": "array 0: shape (17,1,3,3), expected (16,1,3,3)"},
        {"id": "client-2", "partition": 2, "reason": "num_examples -1, expected a positive integer"},
    ]
    assert [a.dtype for a in parameters_to_ndarrays(aggregated)] == [np.float32, np.float32, np.int64]
    recorder.commit(record)  # what a client sent as metrics cannot break the record either


def test_a_client_claiming_huge_numbers_of_examples_is_weighed_as_ten_times_the_median(tmp_path):
    """FedAvg weighs by the examples a client claims: 2**62 would make its update the model."""
    assert updates.examples_cap([5]) is None
    assert updates.examples_cap([100, 2**62]) == 1000 and updates.examples_cap([90, 100, 110, 2**62]) == 1000
    bouquet, recorder = strategy(tmp_path, 3)
    start = model()
    honest = [start[0] + 1.0, *start[1:]]
    steering = [start[0] - 50.0, *start[1:]]
    aggregated, _ = bouquet.aggregate_fit(1, [answer(0, honest, 100), answer(1, honest, 100), answer(2, steering, 2**62)], [])
    # weights 100, 100, 1000: the mean moves 1 * 200/1200 - 50 * 1000/1200, not -50
    assert np.allclose(parameters_to_ndarrays(aggregated)[0], start[0] + (200 * 1.0 - 1000 * 50.0) / 1200, atol=1e-4)
    record = recorder.round_ended()
    by_id = {client["id"]: client for client in record["clients"]}
    assert by_id["client-2"]["num_examples"] == 1000 and by_id["client-2"]["num_examples_claimed"] == 2**62
    assert "num_examples_claimed" not in by_id["client-0"] and by_id["client-0"]["num_examples"] == 100


def test_a_client_metric_of_any_flower_type_is_recorded(tmp_path):
    bouquet, recorder = strategy(tmp_path, 1)
    proxy, res = answer(0, model())
    res.metrics = {"blob": b"\x00\xff", "steps": [1, 2], "train_loss": 0.2}
    bouquet.aggregate_fit(1, [(proxy, res)], [])
    recorder.commit(recorder.round_ended())
    [client] = json.loads((tmp_path / "unit" / "metrics.jsonl").read_text())["clients"]
    assert (client["blob"], client["steps"]) == ("00ff", [1, 2])


def test_far_updates_are_clipped_to_the_bound_and_recorded(tmp_path):
    bouquet, recorder = strategy(tmp_path, 2, max_update_norm=1.5)
    start = model()
    far = [start[0] + 100.0, *start[1:]]
    aggregated, _ = bouquet.aggregate_fit(1, [answer(0, far), answer(1, [start[0] + 0.01, *start[1:]])], [])
    moved = updates.update_norm(start, parameters_to_ndarrays(aggregated))
    assert moved <= 1.5
    record = recorder.round_ended()
    clipped = {c["id"]: c for c in record["clients"]}
    assert clipped["client-0"]["update_norm"] == 1.5 and clipped["client-0"]["clipped_from_norm"] == pytest.approx(1200.0)
    assert "clipped_from_norm" not in clipped["client-1"] and clipped["client-1"]["update_norm"] == pytest.approx(0.12, rel=1e-3)
    recorder.commit(record)
    assert recorder.updates_clipped == 1


def test_an_aggregate_that_overflows_is_refused_and_the_model_kept(tmp_path):
    """Finite updates, each within float32, whose example-weighted sum is not: FedAvg's own
    arithmetic makes Inf (FedAvg with inplace=False multiplies each update by its examples first;
    Bouquet keeps inplace to itself, so it is set here by hand). The round is recorded as not
    trained, with the reason."""
    bouquet, recorder = strategy(tmp_path, 2)
    bouquet.inner = FedAvg(accept_failures=True, inplace=False, min_fit_clients=1, min_available_clients=1)
    huge = [np.full((16, 1, 3, 3), 3e38, np.float32), *model()[1:]]
    aggregated, _ = bouquet.aggregate_fit(1, [answer(0, huge, examples=1000), answer(1, huge, examples=1000)], [])
    assert aggregated is None
    record = recorder.round_ended()
    assert record["trained"] is False and record["clients_ok"] == 2
    assert record["aggregate_refused"] == "aggregate array 0: 144 of 144 values are not finite"
    recorder.commit(record)
    assert json.loads((tmp_path / "unit" / "metrics.jsonl").read_text())["aggregate_refused"].startswith("aggregate array 0")
    # the strategy was rebuilt from the kept model: a usable round after it averages normally
    bouquet._sampled = {"cid-0": ("client-0", 0)}
    recorder.round_started(2)
    again, _ = bouquet.aggregate_fit(2, [answer(0, model())], [])
    assert np.allclose(parameters_to_ndarrays(again)[0], model()[0])

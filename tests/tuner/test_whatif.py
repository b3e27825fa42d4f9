"""`tracetune whatif`'s predictions on constructed observations: numbers in, numbers out."""

from __future__ import annotations

import random

import pytest

from tracetune.tuner.batching import BatchSample, fit_service_time, predict_batching
from tracetune.tuner.config import ConfigError, Knob, PipelineSpec
from tracetune.tuner.observe import Observation, RouteObservation
from tracetune.tuner.policies import CascadeSample
from tracetune.tuner.whatif import parse_sets, predict

SPEC = PipelineSpec("p", {
    "classify": {"batch_max_size": Knob("int", 8, 1, 256), "batch_max_wait_ms": Knob("float", 5.0, 0, 1000),
                 "route_weights": Knob("weights", {"a": 0.5, "b": 0.5})},
    "escalate": {"cascade_threshold": Knob("float", 0.5, 0, 1)},
}, cascades={"escalate": "classify"})


def _observation() -> Observation:
    rng = random.Random(3)
    obs = Observation("p", 100.0, requests=2000)
    obs.steps["classify"] = {"a": RouteObservation(spans=1000, cost=0.02, correct=90, labelled=100),
                             "b": RouteObservation(spans=1000, cost=0.01, correct=80, labelled=100)}
    obs.steps["escalate"] = {"llm": RouteObservation(spans=400, cost=4.0)}  # 0.01 USD per call
    obs.batches["classify"] = [BatchSample(size, 20 + 4 * size + rng.gauss(0, 0.5)) for size in range(1, 17)
                               for _ in range(4)]
    obs.cascade_samples["escalate"] = [CascadeSample(i / 2000, i >= 400, True) for i in range(2000)]
    return obs


def test_parse_sets_reads_numbers_booleans_and_route_weights():
    assert parse_sets(["classify.batch_max_size=16", "classify.batch_max_wait_ms=2.5", "x.cache_enabled=false",
                       "classify.route_weights=a=0.2,b=0.8"]) == {
        "classify": {"batch_max_size": 16, "batch_max_wait_ms": 2.5, "route_weights": {"a": 0.2, "b": 0.8}},
        "x": {"cache_enabled": False}}
    for bad in ("classify", "classify.batch_max_size", "batch_max_size=3", "classify.batch_max_size=big"):
        with pytest.raises(ConfigError, match="--set"):
            parse_sets([bad])


def test_batching_prediction_is_the_fitted_queueing_model():
    obs = _observation()
    rows = predict(SPEC, SPEC.defaults(), {"classify": {"batch_max_size": 16}}, obs)
    p95 = next(r for r in rows if r["figure"] == "p95_ms")
    model = fit_service_time(obs.batches["classify"])
    assert p95["current"] == pytest.approx(predict_batching(model, 20.0, 8, 5.0)["p95_ms"], rel=1e-4)
    assert p95["proposed"] == pytest.approx(predict_batching(model, 20.0, 16, 5.0)["p95_ms"], rel=1e-4)


def test_a_lower_cascade_threshold_predicts_fewer_escalations_lower_cost_and_the_quality_it_costs():
    rows = {r["figure"]: r for r in predict(SPEC, SPEC.defaults(), {"escalate": {"cascade_threshold": 0.1}},
                                            _observation())}
    assert rows["escalated_share"]["current"] == pytest.approx(0.5) and rows["escalated_share"]["proposed"] == \
        pytest.approx(0.1)
    assert rows["cost_per_1k"]["proposed"] == pytest.approx(rows["cost_per_1k"]["current"] / 5)
    assert rows["quality"]["current"] == 1.0 and rows["quality"]["proposed"] == pytest.approx(1 - 0.1)


def test_routing_prediction_weighs_cost_and_accuracy_by_route():
    rows = {r["figure"]: r for r in predict(SPEC, SPEC.defaults(),
                                            {"classify": {"route_weights": {"a": 0.0, "b": 1.0}}}, _observation())}
    assert rows["accuracy"]["current"] == pytest.approx(0.85) and rows["accuracy"]["proposed"] == pytest.approx(0.8)
    assert rows["cost_per_1k_of_step_requests"]["proposed"] < rows["cost_per_1k_of_step_requests"]["current"]


def test_a_proposal_outside_the_declaration_is_refused_naming_the_knob():
    with pytest.raises(ConfigError, match="steps.classify.batch_max_size"):
        predict(SPEC, SPEC.defaults(), {"classify": {"batch_max_size": 0}}, _observation())

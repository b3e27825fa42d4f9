"""Tuning policies on constructed numbers: a known latency curve, duplicate streams, labelled routes and cascades.

The batcher's queueing model is checked against `simulate_batcher`, a discrete-event simulation of the
executor's Batcher (dispatch when the worker is free and the batch is full or its oldest request has
waited max_wait), written here independently of the model.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from tracetune.tuner.batching import (
    BatchSample,
    ServiceModel,
    aimd_batch_size,
    batching_policy,
    fit_service_time,
    predict_batching,
)
from tracetune.tuner.config import Knob
from tracetune.tuner.policies import (
    CascadeSample,
    RouteStats,
    TaskLatencies,
    caching_policy,
    cascade_policy,
    cascade_route_floor,
    cascade_tiers_policy,
    clamp_change,
    concurrency_policy,
    escalation_quantiles,
    local_tiers_policy,
    mixture_quantile,
    routing_policy,
    slow_weight_cap,
)

CURVE = ServiceModel(base_ms=20.0, per_item_ms=4.0)  # the known latency curve: 20 ms + 4 ms per item
BATCH_KNOBS = {"batch_max_size": Knob("int", 8, 1, 1024, "items"),
               "batch_max_wait_ms": Knob("float", 5.0, 0, 10_000, "ms")}
SIZES, WAITS = (2, 4, 8, 16, 32, 64), (0.0, 5.0, 20.0, 50.0, 100.0)


def simulate_batcher(model: ServiceModel, rate: float, max_size: int, max_wait_ms: float, n: int = 20_000,
                     seed: int = 7) -> tuple[float, float]:
    """(p95 latency in ms, mean batch size) of `n` Poisson requests at `rate` req/s through one batcher."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1000.0 / rate, n))
    latency, sizes, free, i = np.empty(n), [], [0.0], 0
    while i < n:
        worker = heapq.heappop(free)
        close = arrivals[i] + max_wait_ms
        if i + max_size - 1 < n:
            close = min(close, arrivals[i + max_size - 1])  # the batch is full when its last slot arrives
        dispatch = max(worker, close)
        size = max(1, min(max_size, int(np.searchsorted(arrivals, dispatch, side="right")) - i))
        done = dispatch + model.batch_ms(size)
        latency[i:i + size] = done - arrivals[i:i + size]
        sizes.append(size)
        heapq.heappush(free, done)
        i += size
    return float(np.percentile(latency[n // 10:], 95)), float(np.mean(sizes))


# ---- service time and the queueing model ---------------------------------------------------------

def test_fit_service_time_recovers_base_slope_and_padding_from_noisy_batches():
    rng = np.random.default_rng(1)
    size = rng.integers(1, 33, 300)
    padding = rng.uniform(0, 0.6, 300)
    duration = 20 + 4 * size * (1 + 0.8 * padding) + rng.normal(0, 3, 300)
    model = fit_service_time([BatchSample(int(s), float(d), float(p)) for s, d, p in zip(size, duration, padding,
                                                                                          strict=True)])
    assert model is not None and model.samples == 300
    assert model.base_ms == pytest.approx(20, abs=1.5)
    assert model.per_item_ms == pytest.approx(4, abs=0.1)
    assert model.padding_factor == pytest.approx(0.8, abs=0.08)
    assert model.batch_ms(10, 0.5) == pytest.approx(20 + 40 * 1.4, rel=0.03)


def test_fit_service_time_needs_twenty_batches_of_at_least_two_sizes():
    few = [BatchSample(s % 8 + 1, 20.0 + 4 * (s % 8 + 1)) for s in range(19)]
    assert fit_service_time(few) is None
    assert fit_service_time([BatchSample(8, 52.0 + (i % 3)) for i in range(50)]) is None
    model = fit_service_time([*few, BatchSample(4, 36.0)])
    assert model is not None and model.base_ms == pytest.approx(20) and model.per_item_ms == pytest.approx(4)


@pytest.mark.parametrize(("rate", "size", "wait"), [(50, 8, 20.0), (100, 16, 5.0), (100, 8, 50.0), (150, 32, 50.0),
                                                    (20, 4, 100.0), (30, 1, 0.0)])
def test_predict_batching_agrees_with_a_simulation_at_moderate_load(rate, size, wait):
    """Utilisation 0.2-0.8: p95 within 10% and mean batch size within 15% of the simulated batcher."""
    predicted = predict_batching(CURVE, rate, size, wait)
    assert 0.1 < predicted["utilisation"] < 0.85
    p95, batch = simulate_batcher(CURVE, rate, size, wait)
    assert predicted["p95_ms"] == pytest.approx(p95, rel=0.10)
    assert predicted["batch_size"] == pytest.approx(batch, rel=0.15)
    assert predicted["compute_ms_per_request"] == pytest.approx(
        CURVE.base_ms / predicted["batch_size"] + CURVE.per_item_ms, rel=0.15)


def test_predict_batching_is_infinite_at_and_over_capacity():
    capacity = 8 / CURVE.batch_ms(8) * 1000  # 153.8 req/s with batches of 8
    for rate in (capacity, capacity * 1.2):
        predicted = predict_batching(CURVE, rate, 8, 5.0)
        assert predicted["utilisation"] >= 1 and math.isinf(predicted["p95_ms"])
        assert predicted["capacity_rps"] == pytest.approx(capacity)
    assert math.isfinite(predict_batching(CURVE, capacity * 0.9, 8, 5.0)["p95_ms"])
    idle = predict_batching(CURVE, 0.0, 8, 5.0)
    assert idle["p95_ms"] == pytest.approx(5.0 + 24.0) and idle["utilisation"] == 0
    with pytest.raises(ValueError, match="max_size >= 1"):
        predict_batching(CURVE, 10, 0, 5.0)


def test_a_known_latency_curve_yields_the_known_best_batch_size():
    """At 150 req/s under a 200 ms p95 target (160 ms with the 0.8 margin): batch 16, wait 50 ms."""
    rate, target, limit = 150.0, 200.0, 160.0
    proposal = batching_policy(CURVE, rate, {"batch_max_size": 8, "batch_max_wait_ms": 5.0}, BATCH_KNOBS, target,
                               None, step="classify", sizes=SIZES, waits=WAITS)
    assert proposal is not None and proposal.step == "classify"
    assert proposal.values == {"batch_max_size": 16, "batch_max_wait_ms": 50.0}
    # brute force over the same grid: the cheapest compute per request whose predicted p95 holds the limit
    grid = {(s, w): predict_batching(CURVE, rate, s, w) for s in SIZES for w in WAITS}
    feasible = {k: v for k, v in grid.items() if v["p95_ms"] <= limit}
    cheapest = min(v["compute_ms_per_request"] for v in feasible.values())
    chosen = grid[(16, 50.0)]
    assert chosen["compute_ms_per_request"] <= cheapest * 1.01
    assert all(v["compute_ms_per_request"] > cheapest * 1.01 for (s, w), v in feasible.items() if w < 50.0)
    assert proposal.predicted["p95_ms"] == pytest.approx(chosen["p95_ms"])
    assert chosen["p95_ms"] <= limit
    # the trade-off: batch 8 cannot keep up (utilisation 0.98) and a longer wait overshoots the limit
    assert grid[(8, 50.0)]["p95_ms"] > target and grid[(16, 100.0)]["p95_ms"] > limit
    # and the batcher itself agrees: the chosen config meets the target, the smaller batch does not
    assert simulate_batcher(CURVE, rate, 16, 50.0)[0] <= target
    assert simulate_batcher(CURVE, rate, 8, 50.0)[0] > target
    assert "p95" in proposal.reason and "16" in proposal.reason
    assert batching_policy(CURVE, rate, {"batch_max_size": 16, "batch_max_wait_ms": 50.0}, BATCH_KNOBS, target,
                           None, sizes=SIZES, waits=WAITS) is None  # already the best: no change


def test_an_overloaded_batcher_gets_the_most_capacity_and_no_infinite_predictions():
    # 250 req/s is over every size's capacity (64 items: 232 req/s): latency first, then throughput
    proposal = batching_policy(CURVE, 250.0, {"batch_max_size": 8, "batch_max_wait_ms": 5.0}, BATCH_KNOBS, 200.0,
                               900.0, sizes=SIZES, waits=WAITS)
    assert proposal is not None and proposal.values["batch_max_size"] == 64
    assert "no config meets it" in proposal.reason
    assert "p95_ms" not in proposal.predicted and all(math.isfinite(v) for v in proposal.predicted.values())
    assert proposal.predicted["capacity_rps"] == pytest.approx(64 / CURVE.batch_ms(64) * 1000)


def test_batching_policy_turns_length_bucketing_on_when_padding_is_material():
    padded = ServiceModel(base_ms=10.0, per_item_ms=4.0, padding_factor=1.5)
    knobs = {**BATCH_KNOBS, "length_bucketing": Knob("bool", False)}
    current = {"batch_max_size": 8, "batch_max_wait_ms": 5.0, "length_bucketing": False}
    proposal = batching_policy(padded, 60.0, current, knobs, 300.0, 150.0, padding_ratio=0.5, sizes=(8,),
                               waits=(5.0,))
    assert proposal is not None and proposal.values == {"length_bucketing": True}
    unpadded = batching_policy(padded, 60.0, current, knobs, 300.0, 150.0, padding_ratio=0.02, sizes=(8,),
                               waits=(5.0,))
    assert unpadded is None


def test_batching_policy_without_a_model_runs_aimd_on_the_observed_p95():
    current = {"batch_max_size": 8, "batch_max_wait_ms": 5.0}
    over = batching_policy(None, 100.0, current, BATCH_KNOBS, 500.0, 612.0, step="classify")
    assert over is not None and over.values == {"batch_max_size": 4} and "612" in over.reason
    under = batching_policy(None, 100.0, current, BATCH_KNOBS, 500.0, 300.0)
    assert under is not None and under.values == {"batch_max_size": 9}
    assert batching_policy(None, 100.0, current, BATCH_KNOBS, 500.0, 450.0) is None  # inside the margin band
    assert batching_policy(None, 100.0, current, BATCH_KNOBS, 500.0, None) is None  # nothing observed


def test_batching_policy_trusts_an_observed_p95_over_a_model_that_contradicts_it():
    current = {"batch_max_size": 8, "batch_max_wait_ms": 5.0}
    assert predict_batching(CURVE, 50.0, 8, 5.0)["p95_ms"] < 100
    proposal = batching_policy(CURVE, 50.0, current, BATCH_KNOBS, 200.0, 450.0, sizes=SIZES, waits=WAITS)
    assert proposal is not None and proposal.values == {"batch_max_size": 4} and "model predicts" in proposal.reason
    # The other way: the model says batches of 8 at 150/s miss the 200 ms target (453 ms), and the step meets it
    # with the margin to spare (60 ms): not a move to the least latency the model promises, AIMD on what is seen.
    assert predict_batching(CURVE, 150.0, 8, 5.0)["p95_ms"] > 0.8 * 200
    proposal = batching_policy(CURVE, 150.0, current, BATCH_KNOBS, 200.0, 60.0, sizes=SIZES, waits=WAITS)
    assert proposal is not None and proposal.values == {"batch_max_size": 9} and "453 ms here but 60" in proposal.reason
    # Observed inside the target but not the margin: no contradiction, the model's search (batches of 16).
    proposal = batching_policy(CURVE, 150.0, current, BATCH_KNOBS, 200.0, 170.0, sizes=SIZES, waits=WAITS)
    assert proposal.values["batch_max_size"] == 16 and "model predicts" not in proposal.reason


def test_aimd_grows_by_one_under_the_target_halves_over_it_and_stays_in_bounds():
    knob = Knob("int", 8, 2, 12)
    assert aimd_batch_size(8, 300.0, 500.0, knob) == 9
    assert aimd_batch_size(8, 300.0, 500.0, knob, increase=2) == 10
    assert aimd_batch_size(8, 600.0, 500.0, knob) == 4
    assert aimd_batch_size(8, 450.0, 500.0, knob) == 8  # between margin * target and target: hold
    assert aimd_batch_size(12, 100.0, 500.0, knob) == 12  # the upper bound
    assert aimd_batch_size(3, 900.0, 500.0, knob) == 2  # the lower bound
    assert aimd_batch_size(1, 900.0, 500.0, Knob("int", 1, 1, 64)) == 1


# ---- caching -------------------------------------------------------------------------------------

CACHE_KNOBS = {"cache_enabled": Knob("bool", False), "cache_ttl_seconds": Knob("float", 600.0, 0, 30 * 86_400),
               "cache_max_entries": Knob("int", 1000, 1, 10_000_000)}
CACHE_OFF = {"cache_enabled": False, "cache_ttl_seconds": 600.0, "cache_max_entries": 1000}


def test_a_duplicate_heavy_stream_switches_caching_on_within_the_staleness_limit():
    proposal = caching_policy(3000, 2100, 0, CACHE_OFF, CACHE_KNOBS, 3600.0, 900, 300.0, step="score")
    assert proposal is not None and proposal.values["cache_enabled"] is True
    # The declared 600 s stays: it covers the window's repeats, and repeats further apart than the 300 s
    # window cannot be seen in it, so they are no reason to shorten it.
    assert "cache_ttl_seconds" not in proposal.values
    assert proposal.values["cache_max_entries"] == 2700  # 900 distinct inputs per 300 s -> 1800 per 600 s TTL, x1.5
    assert proposal.predicted["hit_ratio"] == pytest.approx(0.7)
    strict = caching_policy(3000, 2100, 0, CACHE_OFF, CACHE_KNOBS, 60.0, 900, 300.0)
    assert strict is not None and strict.values["cache_ttl_seconds"] == 60.0  # the staleness limit wins
    assert strict.values.get("cache_max_entries", 1000) >= 270  # 900 per 300 s -> 180 per 60 s, x1.5
    assert strict.predicted["hit_ratio"] == pytest.approx(0.7 * 60 / 300)  # repeats further apart than 60 s miss


def test_a_stream_without_repeats_switches_caching_off():
    on = {**CACHE_OFF, "cache_enabled": True, "cache_ttl_seconds": 300.0, "cache_max_entries": 4500}
    proposal = caching_policy(3000, 3, 0, on, CACHE_KNOBS, 3600.0, 2997, 300.0)
    assert proposal is not None and proposal.values == {"cache_enabled": False}
    assert proposal.predicted["hit_ratio"] == 0.0
    assert caching_policy(3000, 3, 0, CACHE_OFF, CACHE_KNOBS, 3600.0, 2997, 300.0) is None  # already off
    assert caching_policy(3000, 90, 60, on, CACHE_KNOBS, 3600.0, 2910, 300.0) is None  # 3% repeats: hold
    stale = caching_policy(3000, 2100, 1800, on, CACHE_KNOBS, 0.0, 900, 300.0)
    assert stale is not None and stale.values == {"cache_enabled": False}  # a staleness limit of 0 forbids it
    assert caching_policy(10, 9, 0, CACHE_OFF, CACHE_KNOBS, 3600.0, 1, 300.0) is None  # too few requests


# ---- routing -------------------------------------------------------------------------------------

ROUTES = Knob("weights", {"fp32": 0.5, "int8": 0.5})


def test_a_cheaper_route_with_enough_accuracy_gains_weight_shift_limited():
    routes = [RouteStats("fp32", 1000, 388, 400, 0.0002, 40.0), RouteStats("int8", 1000, 386, 400, 0.00008, 18.0)]
    proposal = routing_policy(routes, {"fp32": 0.5, "int8": 0.5}, ROUTES, 0.93, 500.0, step="classify")
    assert proposal is not None
    assert proposal.values["route_weights"] == pytest.approx({"fp32": 0.25, "int8": 0.75})
    assert proposal.predicted["cost_per_1k"] == pytest.approx(1000 * (0.25 * 0.0002 + 0.75 * 0.00008))
    assert proposal.predicted["quality_lower_bound"] >= 0.93
    unlimited = routing_policy(routes, {"fp32": 0.5, "int8": 0.5}, ROUTES, 0.93, max_shift=1.0)
    assert unlimited is not None and unlimited.values["route_weights"]["int8"] == pytest.approx(1.0)


def test_a_cheap_route_below_the_floor_loses_weight():
    routes = [RouteStats("fp32", 1000, 388, 400, 0.0002), RouteStats("int8", 1000, 320, 400, 0.00008)]
    proposal = routing_policy(routes, {"fp32": 0.5, "int8": 0.5}, ROUTES, 0.93)
    assert proposal is not None
    assert proposal.values["route_weights"] == pytest.approx({"fp32": 0.75, "int8": 0.25})  # 0.25 per decision
    target = routing_policy(routes, {"fp32": 0.5, "int8": 0.5}, ROUTES, 0.93, max_shift=1.0)
    assert target is not None and target.predicted["quality_lower_bound"] == pytest.approx(0.93, abs=1e-6)
    assert target.predicted["quality_lower_bound"] >= 0.93
    assert 0 < target.values["route_weights"]["int8"] < 0.25  # the cheapest mix that holds the floor


def test_routing_needs_enough_labels_and_does_not_feed_a_slow_route():
    few = [RouteStats("fp32", 1000, 388, 400, 0.0002), RouteStats("int8", 1000, 10, 10, 0.00008)]
    assert routing_policy(few, {"fp32": 0.5, "int8": 0.5}, ROUTES, 0.93) is None
    # A dear route with too few labels may lose its weight to labelled routes that hold the floor alone.
    dear = [RouteStats("fp32", 1000, 388, 400, 0.0002), RouteStats("int8", 1000, 10, 10, 0.002)]
    away = routing_policy(dear, {"fp32": 0.9, "int8": 0.1}, ROUTES, 0.93)
    assert away is not None and away.values["route_weights"] == pytest.approx({"fp32": 1.0, "int8": 0.0})
    assert "too few labels" in away.reason
    slow = [RouteStats("fp32", 1000, 388, 400, 0.0002, 40.0), RouteStats("int8", 1000, 386, 400, 0.00008, 900.0)]
    assert routing_policy(slow, {"fp32": 0.5, "int8": 0.5}, ROUTES, 0.93, p95_target_ms=500.0) is None
    # 30 of 30 right is not trusted as 100% (lower bound 0.917 < 0.95 floor): only a share of traffic
    small = [RouteStats("fp32", 1000, 390, 400, 0.0002), RouteStats("int8", 30, 30, 30, 0.00008)]
    large = [RouteStats("fp32", 1000, 390, 400, 0.0002), RouteStats("int8", 400, 400, 400, 0.00008)]
    trusted = [routing_policy(r, {"fp32": 1.0, "int8": 0.0}, ROUTES, 0.95, max_shift=1.0) for r in (small, large)]
    assert trusted[0] is not None and trusted[1] is not None
    assert trusted[0].values["route_weights"]["int8"] < 0.3 and trusted[1].values["route_weights"]["int8"] == 1.0


# ---- cascade -------------------------------------------------------------------------------------

def _wilson(successes: float, n: int, z: float = 1.645) -> float:
    p = successes / n
    return (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def _triage(n_per_level: int = 10) -> list[CascadeSample]:
    """The local model's accuracy rises with its confidence: right with probability = confidence + 0.1."""
    rng = np.random.default_rng(3)
    return [CascadeSample(c / 100, bool(rng.random() < min(1.0, c / 100 + 0.1)))
            for c in range(100) for _ in range(n_per_level)]


THRESHOLD = Knob("float", 0.5, 0, 1)


def _quality_lower(samples: list[CascadeSample], t: float, remote: float, z: float = 1.645) -> float:
    labelled = [s for s in samples if s.local_correct is not None]
    correct = sum(s.local_correct if s.confidence >= t else remote for s in labelled)
    return _wilson(correct, len(labelled), z)


def test_a_lower_threshold_is_judged_on_the_answers_the_tiers_gave_the_tasks_it_still_escalates():
    """The least sure tasks are the hard ones for the remote tiers too (as rag's comparisons are): right 0.70 of
    the time under confidence 0.3, 0.99 between 0.3 and 0.6 (0.85 on average). A threshold escalating only the
    hard ones is predicted from those tasks' own remote answers, not from the tiers' average."""
    samples = []
    for c in range(100):
        for j in range(40):
            local = j < round(40 * (0.1 if c < 30 else 0.85 if c < 60 else 0.99))
            remote = (7 * j % 40) < round(40 * (0.7 if c < 30 else 0.99)) if c < 60 else None  # escalated at 0.6
            samples.append(CascadeSample(c / 100, local, remote))

    def answered(t: float) -> float:  # the pipeline's quality at threshold t, from each task's own answers
        return sum(s.local_correct if s.confidence >= t else s.remote_correct for s in samples) / len(samples)

    proposal = cascade_policy(samples, 0.6, Knob("float", 0.6, 0, 1), 0.88, 0.01, max_step=1.0)
    t = proposal.values["cascade_threshold"]
    assert t < 0.6 and proposal.predicted["quality"] == pytest.approx(answered(t)) and answered(t) >= 0.88
    # Priced at the tiers' average accuracy, the same labels would go further, to a threshold whose tasks'
    # own answers miss the floor.
    average = cascade_policy(samples, 0.6, Knob("float", 0.6, 0, 1), 0.88, 0.01, max_step=1.0, remote_accuracy=0.85)
    assert average.values["cascade_threshold"] < t and average.predicted["quality"] >= 0.88
    assert answered(average.values["cascade_threshold"]) < 0.86


def test_the_quality_floor_holds_the_cascade_threshold():
    samples = _triage()
    proposal = cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01, remote_accuracy=0.97, max_step=1.0, step="esc")
    assert proposal is not None and proposal.step == "esc"
    t = proposal.values["cascade_threshold"]
    # A cut from a threshold that holds the floor must hold it at the 99% bound (hysteresis) ...
    assert _quality_lower(samples, t, 0.97, 2.326) >= 0.8 and proposal.predicted["quality_lower_bound"] >= 0.8
    # ... and every threshold that escalates fewer tasks (so would cost less) does not
    share = sum(s.confidence < t for s in samples)
    for lower in np.arange(0, t, 0.01):
        if sum(s.confidence < lower for s in samples) < share:
            assert _quality_lower(samples, lower, 0.97, 2.326) < 0.8
    assert proposal.predicted["escalation_share"] == pytest.approx(share / len(samples))
    assert proposal.predicted["cost_per_1k"] == pytest.approx(1000 * 0.01 * share / len(samples))


def test_a_threshold_over_the_escalation_cap_moves_cheaper_only_on_the_stricter_bound():
    """The threshold in force holds the floor but escalates more than the tail allows (the cap, with the pipeline's
    p95 inside its target): the cut is held to the 99% bound as any cheaper move is, not walked to the edge of the
    95% bound because of the cap."""
    samples = _triage()
    free = cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01, remote_accuracy=0.97, max_step=1.0, step="esc")
    capped = cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01, remote_accuracy=0.97, max_step=1.0, step="esc",
                            escalation_cap=0.6)
    t = capped.values["cascade_threshold"]
    assert t == free.values["cascade_threshold"] and _quality_lower(samples, t, 0.97, 2.326) >= 0.8
    edge = max(x for x in np.arange(0, t, 0.01) if _quality_lower(samples, x, 0.97) < 0.8) + 0.01
    assert edge < t  # the 95% bound alone would have gone further


def test_a_lower_quality_floor_gives_a_lower_threshold_and_a_lower_cost():
    samples = _triage()
    strict = cascade_policy(samples, 0.9, THRESHOLD, 0.85, 0.01, remote_accuracy=0.97, max_step=1.0)
    loose = cascade_policy(samples, 0.9, THRESHOLD, 0.75, 0.01, remote_accuracy=0.97, max_step=1.0)
    assert strict is not None and loose is not None
    assert loose.values["cascade_threshold"] < strict.values["cascade_threshold"]
    assert loose.predicted["cost_per_1k"] < strict.predicted["cost_per_1k"]
    assert loose.predicted["quality"] < strict.predicted["quality"]


def test_the_cascade_moves_at_most_max_step_and_needs_enough_labels():
    samples = _triage()
    target = cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01, remote_accuracy=0.97, max_step=1.0)
    assert target is not None and target.values["cascade_threshold"] < 0.75
    step = cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01, remote_accuracy=0.97, max_step=0.1)
    assert step is not None and step.values["cascade_threshold"] == pytest.approx(0.8)
    unlabelled = [CascadeSample(s.confidence, s.local_correct if i < 49 else None) for i, s in enumerate(samples)]
    assert cascade_policy(unlabelled, 0.9, THRESHOLD, 0.8, 0.01, remote_accuracy=0.97) is None
    assert cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01) is None  # remote accuracy neither given nor labelled


def test_the_cascade_raises_its_threshold_when_no_threshold_holds_the_floor():
    samples = _triage()
    proposal = cascade_policy(samples, 0.5, THRESHOLD, 0.99, 0.01, remote_accuracy=0.97)
    assert proposal is not None and proposal.values["cascade_threshold"] == pytest.approx(0.6)
    assert "quality first" in proposal.reason


def test_the_cascade_estimates_remote_accuracy_from_labelled_escalations():
    samples = [CascadeSample(s.confidence, s.local_correct, True if s.confidence < 0.5 else None)
               for s in _triage()]
    proposal = cascade_policy(samples, 0.9, THRESHOLD, 0.8, 0.01, max_step=1.0)
    assert proposal is not None and "remote accuracy 1.000" in proposal.reason
    assert proposal.predicted["quality_lower_bound"] >= 0.8


# ---- concurrency and guardrails ------------------------------------------------------------------

CONCURRENCY = Knob("int", 8, 1, 64)


def test_five_percent_429s_halve_concurrency_and_none_raise_it_slowly():
    halved = concurrency_policy(8, CONCURRENCY, 400, 20, step="escalate")
    assert halved is not None and halved.values == {"max_concurrency": 4}
    assert halved.predicted["rate_limited_share"] == 0.0  # 8 * 95% = 7.6 taken at once > 4
    assert concurrency_policy(8, CONCURRENCY, 400, 2) is None  # 0.5%: tolerated
    assert concurrency_policy(1, CONCURRENCY, 400, 40) is None  # already at the minimum
    grown = concurrency_policy(4, CONCURRENCY, 400, 0)
    assert grown is not None and grown.values == {"max_concurrency": 5}
    assert concurrency_policy(4, CONCURRENCY, 150, 0) is None  # fewer than 200 calls
    assert concurrency_policy(8, CONCURRENCY, 400, 0) is None  # at the default
    assert concurrency_policy(4, CONCURRENCY, 400, 0, timeouts=20) is None  # timing out: no increase


def test_clamp_change_keeps_bounds_and_relative_limits():
    size = Knob("int", 8, 1, 1024)
    assert clamp_change(size, 8, 100) == 12
    assert clamp_change(size, 8, 1) == 4
    assert clamp_change(size, 8, 10) == 10
    assert clamp_change(size, 1000, 4000) == 1024
    assert clamp_change(size, 1, 5) == 2  # at least 1 for ints
    assert clamp_change(size, 8, 100, max_relative=1.0) == 16
    threshold = Knob("float", 0.5, 0, 1)
    assert clamp_change(threshold, 0.5, 0.1) == pytest.approx(0.25)
    assert clamp_change(threshold, 0.8, 1.5) == pytest.approx(1.0)
    assert clamp_change(threshold, 0.0, 0.3) == pytest.approx(0.01)  # from 0: 1% of the declared range
    assert clamp_change(Knob("bool", False), False, True) is True
    weights = clamp_change(ROUTES, {"fp32": 0.9, "int8": 0.1}, {"fp32": 0.0, "int8": 1.0}, max_relative=0.5)
    assert weights == pytest.approx({"fp32": 0.4, "int8": 0.6})
    assert sum(clamp_change(ROUTES, {"fp32": 2.0, "int8": 2.0}, {"fp32": 1.0, "int8": 0.0}, 0.1).values()) \
        == pytest.approx(1.0)


def test_a_cascades_tiers_answer_for_the_pipelines_floor_and_its_share_of_the_tail():
    # 100 labelled tasks; 80 kept locally (70 right), 20 escalated: the pipeline holds 0.9 if the escalated
    # answers are right (0.9 x 100 - 70) / 20 = 100% ... and 0.85 if 75% of them are.
    samples = [CascadeSample(0.9, i < 70) for i in range(80)] + [CascadeSample(0.3, False) for _ in range(20)]
    assert cascade_route_floor(samples, 0.5, 0.9) == pytest.approx(1.0)
    assert cascade_route_floor(samples, 0.5, 0.85) == pytest.approx(0.75)
    assert cascade_route_floor(samples, 0.5, None) is None
    assert cascade_route_floor([], 0.5, 0.85) == 0.85  # no labelled escalation: the pipeline's floor
    # A cheap tier over the p95 target may take the escalations when they are few enough for the tail.
    assert slow_weight_cap(0.04) == 1.0 and slow_weight_cap(0.08) == pytest.approx(0.5)
    tiers = [RouteStats("small", 4000, 3400, 4000, 0.0002, p95_ms=720.0),
             RouteStats("large", 4000, 3700, 4000, 0.0010, p95_ms=300.0)]
    knob = Knob("weights", {"small": 0.7, "large": 0.3})
    capped = routing_policy(tiers, {"small": 0.7, "large": 0.3}, knob, 0.75, 500.0, max_shift=1.0,
                            slow_cap=slow_weight_cap(0.08))
    assert capped.values["route_weights"]["small"] == pytest.approx(0.5)  # the tail allows half on the slow tier
    free = routing_policy(tiers, {"small": 0.7, "large": 0.3}, knob, 0.75, 500.0, max_shift=1.0,
                          slow_cap=slow_weight_cap(0.03))
    assert free.values["route_weights"]["small"] == pytest.approx(1.0)
    # Without the cap (a step every task goes through) the slow route gains nothing.
    assert routing_policy(tiers, {"small": 0.3, "large": 0.7}, knob, 0.75, 500.0, max_shift=1.0) is None
    # The floor the escalated answers need still binds: 0.9 needs more of the accurate tier.
    floored = routing_policy(tiers, {"small": 0.7, "large": 0.3}, knob, 0.9, 500.0, max_shift=1.0,
                             slow_cap=slow_weight_cap(0.03))
    assert floored.values["route_weights"]["large"] > 0.3


def test_too_few_labels_to_prove_the_floor_hold_a_mix_that_meets_it():
    tiers = [RouteStats("small", 40, 37, 40, 0.0002), RouteStats("large", 40, 38, 40, 0.0010)]
    knob = Knob("weights", {"small": 0.5, "large": 0.5})
    # Point accuracy 0.9375 >= 0.93, lower bounds about 0.80-0.83: no mix provably holds 0.93, none moves.
    assert routing_policy(tiers, {"small": 0.5, "large": 0.5}, knob, 0.93) is None
    # Under the floor even at the point estimate, but 37 of 40 against 38 of 40 tells the tiers apart no
    # better than a coin: no move (moving on it is how weights flip back and forth).
    assert routing_policy(tiers, {"small": 0.5, "large": 0.5}, knob, 0.95) is None
    # A tier beyond doubt more accurate (its lower bound above the mix's accuracy): toward it.
    clear = [RouteStats("small", 400, 340, 400, 0.0002), RouteStats("large", 400, 396, 400, 0.0010)]
    worse = routing_policy(clear, {"small": 0.5, "large": 0.5}, knob, 0.95)
    assert worse is not None and worse.values["route_weights"]["large"] > 0.5


def test_a_wide_float_range_still_moves_at_most_half_per_decision():
    ttl = Knob("float", 600.0, 0, 30 * 86_400, "s")
    assert clamp_change(ttl, 600.0, 42.5) == pytest.approx(300.0)  # not 1% of 30 days (25,920 s) at once
    assert clamp_change(ttl, 600.0, 5000.0) == pytest.approx(900.0)
    assert clamp_change(Knob("float", 0.0, 0, 1), 0.0, 0.5) == pytest.approx(0.01)  # from 0: 1% of the range


def test_batching_leaves_a_config_that_meets_its_target_when_the_saving_is_negligible_for_the_pipeline():
    current = {"batch_max_size": 2, "batch_max_wait_ms": 0.0}
    worth = batching_policy(CURVE, 40.0, current, BATCH_KNOBS, 500.0, 60.0, step="s", cost_share=0.9)
    assert worth is not None  # compute is most of the cost: bigger batches pay
    assert batching_policy(CURVE, 40.0, current, BATCH_KNOBS, 500.0, 60.0, step="s", cost_share=0.01) is None
    # Over its target it still acts, however small its share of the cost.
    assert batching_policy(CURVE, 40.0, current, BATCH_KNOBS, 500.0, 900.0, step="s", cost_share=0.01) is not None


# ---- the pipeline's latency at another escalation share --------------------------------------------

def test_the_mixture_quantile_solves_the_mixed_cdf_of_known_distributions():
    """Local tasks ~ exponential (100 ms mean) + 50 ms, escalated ones ~ lognormal (median 1200 ms): the
    p95 at share s solves s * F_esc(x) + (1 - s) * F_local(x) = 0.95, found here by root-finding on the
    distributions' own CDFs and matched by the mixture of their empirical CDFs."""
    from scipy.optimize import brentq
    from scipy.stats import expon, lognorm

    local, remote = expon(loc=50, scale=100), lognorm(s=0.5, scale=1200)
    levels = (np.arange(20_000) + 0.5) / 20_000  # evenly spaced quantiles: the empirical CDFs track the true ones
    local_ms, remote_ms = local.ppf(levels), remote.ppf(levels)
    for share in (0.05, 0.2, 0.5, 0.9):
        for q in (0.95, 0.99):
            exact = brentq(lambda x, s=share, p=q: s * remote.cdf(x) + (1 - s) * local.cdf(x) - p, 0, 1e6)
            found = mixture_quantile([(1 - share, local_ms), (share, remote_ms)], q)
            assert found == pytest.approx(exact, rel=0.01), (share, q)
    # With weights as the parts' own counts, the mixture is the pooled sample: its quantile is numpy's (inverted CDF).
    rng = np.random.default_rng(5)
    a, b = rng.exponential(100, 700), rng.lognormal(7, 0.5, 300)
    pooled = np.quantile(np.concatenate([a, b]), 0.95, method="inverted_cdf")
    assert mixture_quantile([(700, a), (300, b)], 0.95) == pooled
    assert math.isnan(mixture_quantile([(0.5, a), (0.5, [])], 0.95))  # a part that weighs, without samples


def test_escalation_quantiles_mix_the_remote_routes_by_their_weights():
    fast, slow = np.linspace(400, 600, 1001), np.linspace(1000, 3000, 1001)
    latency = TaskLatencies(np.linspace(40, 60, 1001), {"small": fast, "large": slow})
    found = escalation_quantiles(latency, [0.0, 0.5, 1.0], {"small": 0.75, "large": 0.25}, (0.95,))[0.95]
    # share 0: the local tasks alone; 1: three quarters on the fast route, a quarter on the slow one.
    assert found[0] == pytest.approx(59.0, abs=0.1)
    for share, value in zip((0.5, 1.0), found[1:], strict=True):
        # 0.95 = (1 - share) + share * (0.75 + 0.25 * (x - 1000) / 2000), solved for x
        exact = 1000 + 2000 * ((0.95 - (1 - share)) / share - 0.75) / 0.25
        assert value == pytest.approx(exact, abs=3)
    # A route that weighs but was not seen in the window: no prediction.
    assert np.isnan(escalation_quantiles(latency, [0.5], {"small": 0.5, "other": 0.5})[0.95]).all()


def _cascade_latency(n: int = 2000) -> tuple[list[CascadeSample], TaskLatencies]:
    """Confidences even over [0, 1); the local model is right from 0.3 up, the remote one always; local tasks
    take 80-120 ms end to end, escalated ones 200-1200 ms."""
    samples = [CascadeSample(i / n, i / n >= 0.3, True) for i in range(n)]
    return samples, TaskLatencies(np.linspace(80, 120, n), {"llm": np.linspace(200, 1200, n)})


def test_a_missed_p95_moves_the_threshold_to_the_cheapest_proven_one_predicted_inside_it_else_the_most_accurate():
    samples, latency = _cascade_latency()
    floor, target = 0.8, {0.95: 1000.0}
    proposal = cascade_policy(samples, 0.5, THRESHOLD, floor, 0.01, max_step=1.0, latency=latency,
                              latency_targets=target)
    # Directly: at p96 (the tail margin) the mixture is under 1000 ms while 1 - 0.2 s >= 0.96, i.e. s <= 0.2;
    # quality is 0.7 + t under 0.3, so the floor's lower bound holds from about 0.125 up. Every threshold proven
    # at the 99% bound is inside the target, so the restoring move is the cheapest one a cost move would take
    # (the same call without the latency model): the canary restoring p95 carries the saving too.
    cheapest = cascade_policy(samples, 0.5, THRESHOLD, floor, 0.01, max_step=1.0)
    assert "p95_ms" not in cheapest.predicted and "(99% bound)" in cheapest.reason
    assert proposal.values["cascade_threshold"] == pytest.approx(cheapest.values["cascade_threshold"])
    assert 0.125 < proposal.values["cascade_threshold"] < 0.15
    assert proposal.reason.startswith("the cheapest threshold predicted inside the 1000 ms p95 target")
    s = proposal.values["cascade_threshold"]
    assert proposal.predicted["p95_ms"] == pytest.approx(
        mixture_quantile([(1 - s, latency.local_ms), (s, latency.escalated_ms["llm"])], 0.95))
    assert proposal.predicted["p95_ms"] <= 1000 < proposal.predicted["p95_ms_before"]
    assert proposal.predicted["quality_lower_bound"] >= floor
    # A floor the 99% bound proves nowhere inside the target (0.885: the 95% bound holds at 0.20 alone): the most
    # accurate threshold inside it, 0.20, as far as the latency needs and no further.
    proposal = cascade_policy(samples, 0.5, THRESHOLD, 0.885, 0.01, max_step=1.0, latency=latency,
                              latency_targets=target)
    assert proposal.values["cascade_threshold"] == pytest.approx(0.20)
    assert proposal.reason.startswith("the most accurate threshold predicted inside the 1000 ms p95 target")
    assert proposal.predicted["p95_ms"] == pytest.approx(
        mixture_quantile([(0.8, latency.local_ms), (0.2, latency.escalated_ms["llm"])], 0.95))
    # No threshold inside the target holds the floor: quality first, the cheapest holding it (95% bound: the
    # missed target is the reason to move, no stricter bound against noise), the lowest latency among them.
    tight = cascade_policy(samples, 0.5, THRESHOLD, floor, 0.01, max_step=1.0, latency=latency,
                           latency_targets={0.95: 300.0})
    t, remote = tight.values["cascade_threshold"], _wilson(len(samples), len(samples))
    assert _quality_lower(samples, t, remote) >= floor > _quality_lower(samples, t - 0.01, remote)
    assert tight.reason.startswith("no threshold predicted inside the latency targets holds the floor")
    assert tight.predicted["p95_ms"] < tight.predicted["p95_ms_before"]


def test_restoring_latency_on_labels_that_prove_the_floor_nowhere_holds_thresholds_to_their_point_estimate():
    """100 labels cannot prove a 0.98 floor anywhere (the best lower bound is 0.974); the current threshold is
    held on its point estimate, and a latency move is held to the same standard, not refused for want of labels."""
    samples, latency = _cascade_latency(100)
    looser = cascade_policy(samples, 0.5, THRESHOLD, 0.98, 0.01, max_step=1.0, latency=latency,
                            latency_targets={0.95: 1100.0})
    # p96 <= 1100 ms while s <= 0.4; quality (point) is 1.0 from 0.30 up, 0.98 at 0.28: the most accurate is 0.30.
    assert looser.values["cascade_threshold"] == pytest.approx(0.30)
    assert "whose point estimate holds the floor" in looser.reason
    # Inside 1000 ms (s <= 0.2) no threshold's point estimate reaches 0.98: the cheapest that does, 0.28.
    tight = cascade_policy(samples, 0.5, THRESHOLD, 0.98, 0.01, max_step=1.0, latency=latency,
                           latency_targets={0.95: 1000.0})
    assert tight.values["cascade_threshold"] == pytest.approx(0.28)
    assert "at its point estimate" in tight.reason
    assert cascade_policy(samples, 0.5, THRESHOLD, 0.98, 0.01, max_step=1.0) is None  # without the model: hold


def test_a_cascades_lower_bound_adds_the_local_and_remote_margins_in_quadrature():
    """Each part's Wilson margin at its own count and share, not the remote bound plugged into a Wilson bound of
    the whole (which counts the escalated tasks' noise twice); the ends are the plain Wilson bounds."""
    from tracetune.tuner.policies import _cascade_lower, wilson_lower

    assert _cascade_lower(940, 0, 1000, 0.9, 100, 1.645) == pytest.approx(wilson_lower(940, 1000, 1.645))
    assert _cascade_lower(0, 1000, 1000, 0.9, 100, 1.645) == pytest.approx(wilson_lower(90, 100, 1.645))
    assert _cascade_lower(0, 1000, 1000, 0.9, 0, 1.645) == pytest.approx(0.9)  # remote accuracy given exactly
    kept, escalated = 880, 100  # 900 kept at 0.978, 100 escalated at 0.9 measured on 100
    point = (kept + 0.9 * escalated) / 1000
    local = 0.9 * (kept / 900 - wilson_lower(kept, 900, 1.645))
    remote = 0.1 * (0.9 - wilson_lower(90, 100, 1.645))
    bound = _cascade_lower(kept, escalated, 1000, 0.9, 100, 1.645)
    assert bound == pytest.approx(point - math.hypot(local, remote))
    assert bound > wilson_lower(kept + wilson_lower(90, 100, 1.645) * escalated, 1000, 1.645)


def _tiers_case(large_cost: float = 0.003) -> tuple[list[CascadeSample], list[RouteStats]]:
    """2000 labelled tasks whose local answers are right more often the surer they are (20% at confidence 0,
    100% at 1); a small tier right 70% of the time at 2 USD per 1k calls, a large one 97% at `large_cost`."""
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(2000):
        confidence = float(rng.uniform(0, 1))
        samples.append(CascadeSample(confidence, bool(rng.random() < 0.2 + 0.8 * confidence), None, "local"))
    return samples, [RouteStats("small", 600, 420, 600, 0.002), RouteStats("large", 400, 388, 400, large_cost)]


def test_a_cascades_threshold_and_tiers_are_chosen_together_when_a_surer_mix_lets_fewer_tasks_escalate():
    """At the mix in force no lower threshold holds the 0.77 floor; a mix with more of the large tier, dearer
    per call, holds it at a threshold that escalates 43% of tasks instead of 69%: cheaper in all. With the
    large tier dear enough, or a pair in force that no longer holds the floor, it is left to each policy."""
    samples, tiers = _tiers_case()
    threshold, weights = Knob("float", 0.7, 0, 1), Knob("weights", {"small": 0.7, "large": 0.3})
    now = {"small": 0.7, "large": 0.3}
    joint = cascade_tiers_policy(samples, tiers, 0.7, now, threshold, weights, 0.77, "gen", max_step=0.3,
                                 max_shift=1.0)
    assert joint is not None, "a cheaper pair exists"
    assert joint.values["route_weights"]["large"] > 0.3 and joint.values["cascade_threshold"] < 0.7
    predicted = joint.predicted
    assert predicted["cost_per_1k"] < 0.9 * predicted["cost_per_1k_before"]
    assert predicted["quality_lower_bound"] >= 0.77
    assert predicted["escalation_share"] < predicted["escalation_share_before"]
    assert "threshold and tiers chosen together" in joint.reason
    # The pair is what the model says: escalations at the new threshold times the mix's price per call.
    price = sum(w * t.compute_cost_per_request for t in tiers for n, w in joint.values["route_weights"].items()
                if n == t.route)
    assert predicted["cost_per_1k"] == pytest.approx(1000 * predicted["escalation_share"] * price)
    # Moves stay within their limits.
    small = cascade_tiers_policy(samples, tiers, 0.7, now, threshold, weights, 0.77, "gen", max_step=0.1,
                                 max_shift=0.1)
    assert small is None or (abs(small.values.get("cascade_threshold", 0.7) - 0.7) <= 0.1 + 1e-9
                             and abs(small.values["route_weights"]["large"] - 0.3) <= 0.1 + 1e-9)
    dear_samples, dear = _tiers_case(large_cost=0.02)
    assert cascade_tiers_policy(dear_samples, dear, 0.7, now, threshold, weights, 0.77, "gen", max_step=0.3,
                                max_shift=1.0) is None
    assert cascade_tiers_policy(samples, tiers, 0.7, now, threshold, weights, 0.80, "gen", max_step=0.3,
                                max_shift=1.0) is None  # the pair in force is under the floor: quality first


def test_threshold_and_tiers_together_are_judged_on_the_answers_each_tier_gave_the_tasks_still_escalated():
    """Both tiers answer the least sure tasks worse (small 0.45 under confidence 0.35, 0.85 above; large 0.75 and
    1.0): a lower threshold with more of the large tier escalates only the hard tasks, which the tiers' means
    overrate. Judged on each tier's own answers to the tasks a pair escalates, the pair chosen holds the 0.74 floor
    on what those tasks' answers are worth, as predicted; on the means it did not."""
    rng = np.random.default_rng(5)
    p_small = lambda c: 0.45 if c < 0.35 else 0.85
    p_large = lambda c: 0.75 if c < 0.35 else 1.0
    samples, sent = [], {"small": [0, 0], "large": [0, 0]}
    for _ in range(4000):
        c = float(rng.uniform(0, 1))
        local = bool(rng.random() < 0.2 + 0.8 * c)
        if c < 0.7:
            tier = "small" if rng.random() < 0.7 else "large"
            right = bool(rng.random() < (p_small if tier == "small" else p_large)(c))
            sent[tier][0] += 1
            sent[tier][1] += right
            samples.append(CascadeSample(c, local, right, "local", tier))
        else:
            samples.append(CascadeSample(c, local, None, "local"))
    tiers = [RouteStats("small", sent["small"][0], sent["small"][1], sent["small"][0], 0.002),
             RouteStats("large", sent["large"][0], sent["large"][1], sent["large"][0], 0.003)]
    threshold, weights = Knob("float", 0.7, 0, 1), Knob("weights", {"small": 0.7, "large": 0.3})
    now = {"small": 0.7, "large": 0.3}

    def worth(t: float, mix: dict) -> float:  # expected quality on these tasks, from how the answers were drawn
        return float(np.mean([(0.2 + 0.8 * s.confidence) if s.confidence >= t else
                              mix["small"] * p_small(s.confidence) + mix["large"] * p_large(s.confidence)
                              for s in samples]))

    floor = 0.74
    assert worth(0.7, now) >= floor + 0.02  # the pair in force holds it
    joint = cascade_tiers_policy(samples, tiers, 0.7, now, threshold, weights, floor, "gen", max_step=0.4,
                                 max_shift=1.0)
    assert joint is not None, "more of the large tier at a lower threshold is cheaper and holds the floor"
    t, mix = joint.values["cascade_threshold"], joint.values["route_weights"]
    assert t < 0.7 and mix["large"] > 0.3
    assert worth(t, mix) >= floor  # on the tiers' means: 0.31 with 0.85 large, worth 0.718, predicted 0.765
    assert joint.predicted["quality"] == pytest.approx(worth(t, mix), abs=0.01)


def test_a_threshold_going_up_quality_first_goes_as_far_as_the_floor_needs_not_to_the_top():
    """No threshold's lower bound holds the floor on 150 labelled escalations (95% right): the threshold goes to
    the cheapest whose point estimate holds it; with a floor no threshold reaches even so, to the most accurate
    threshold, not to 1.0 (escalating everything pays for accuracy the floor does not ask for)."""
    samples = [CascadeSample(s.confidence, s.local_correct, (i % 20 != 0) if s.confidence < 0.5 else None)
               for i, s in enumerate(_triage(3))]
    up = cascade_policy(samples, 0.5, THRESHOLD, 0.94, 0.01, max_step=1.0)
    assert up is not None and 0.5 < up.values["cascade_threshold"] < 0.9, up
    assert up.predicted["quality"] >= 0.94 > up.predicted["quality_lower_bound"]
    assert "toward the cheapest whose point estimate does, quality first" in up.reason
    remote = [s.remote_correct for s in samples if s.remote_correct is not None]
    def point(t: float) -> float:  # kept local answers, escalated ones at the remote tiers' measured accuracy
        return sum(s.local_correct if s.confidence >= t else sum(remote) / len(remote) for s in samples) / len(samples)
    assert point(up.values["cascade_threshold"] - 0.01) < 0.94  # one step less does not hold it
    top = cascade_policy(samples, 0.5, THRESHOLD, 0.96, 0.01, max_step=1.0)
    assert top is not None and top.values["cascade_threshold"] < 1.0 and "the most accurate" in top.reason


def test_a_threshold_within_the_labels_noise_of_the_floor_is_held_not_walked_up_by_a_dipping_bound():
    """The threshold in force meets the floor on the labels' point estimate but not at its lower bound, or misses
    it on the point estimate but not at its upper bound: held (a dead band: moving down takes the stricter bound,
    moving up a floor missed beyond the labels' noise), so noise in the labels does not walk it up; once its upper
    bound misses the floor, it goes up."""
    samples = [CascadeSample(s.confidence, s.local_correct, (i % 20 != 0) if s.confidence < 0.6 else None)
               for i, s in enumerate(_triage(3))]
    remote = [s.remote_correct for s in samples if s.remote_correct is not None]
    def point(t: float) -> float:
        return sum(s.local_correct if s.confidence >= t else sum(remote) / len(remote) for s in samples) / len(samples)
    floor = round(point(0.6) - 0.005, 3)  # met on the point estimate, with a lower bound some 0.03 under it
    assert cascade_policy(samples, 0.6, THRESHOLD, floor, 0.01, max_step=1.0) is None
    # A point under the floor, by less than the bound's margin: no evidence the floor is missed, held ...
    assert cascade_policy(samples, 0.6, THRESHOLD, round(point(0.6) + 0.005, 3), 0.01, max_step=1.0) is None
    # ... unless the pipeline's quality is under the floor beyond doubt: then the point estimate is enough.
    missed = cascade_policy(samples, 0.6, THRESHOLD, round(point(0.6) + 0.005, 3), 0.01, max_step=1.0,
                            quality_missed=True)
    assert missed is not None and missed.values["cascade_threshold"] > 0.6, missed
    up = cascade_policy(samples, 0.6, THRESHOLD, round(point(0.6) + 0.04, 3), 0.01, max_step=1.0)
    assert up is not None and up.values["cascade_threshold"] > 0.6, up


def _local_case(large_right: float = 0.97, small_right: float = 0.80,
                ) -> tuple[list[CascadeSample], list[RouteStats], list[RouteStats]]:
    """1000 labelled tasks per local route, as sure as each other (confidence uniform): the small route's kept
    answers right `small_right` of the time, the large one's `large_right`, at 0.05 and 0.15 USD per 1k; a cheap
    tier right 75% of the time at 0.04 USD per 1k calls, a dear one 97% at 0.66 (the samples name their tier)."""
    rng = np.random.default_rng(5)
    samples = []
    for route, right in (("small", small_right), ("large", large_right)):
        for _ in range(1000):
            confidence = float(rng.uniform(0, 1))
            tier = "cheap" if rng.random() < 0.5 else "dear"
            remote = bool(rng.random() < (0.75 if tier == "cheap" else 0.97))
            samples.append(CascadeSample(confidence, bool(rng.random() < right), remote, route, tier))
    local = [RouteStats("small", 1000, int(1000 * small_right), 1000, 0.05e-3),
             RouteStats("large", 1000, int(1000 * large_right), 1000, 0.15e-3)]
    tiers = [RouteStats("cheap", 1000, 750, 1000, 0.04e-3), RouteStats("dear", 1000, 970, 1000, 0.66e-3)]
    return samples, local, tiers


def test_a_cascades_local_routes_are_chosen_with_its_threshold_and_tiers_when_surer_answers_buy_a_cheaper_tier():
    """All on the small local route, the cheapest threshold and tiers holding the 0.80 floor cost 0.205 USD per
    1k; the large route, dearer by 0.1 USD per 1k but keeping answers right 97% of the time, lets the cheap tier
    take every escalation at a lower threshold: 0.102 in all, which no policy moving one step's knobs finds.
    With the large route no surer, or slow, nothing is proposed together."""
    samples, local, tiers = _local_case()
    knobs = (Knob("weights", {"small": 0.5, "large": 0.5}), Knob("float", 0.5, 0, 1),
             Knob("weights", {"cheap": 0.5, "dear": 0.5}))
    now_local, now_tiers = {"small": 1.0, "large": 0.0}, {"cheap": 0.3, "dear": 0.7}
    found = local_tiers_policy(samples, local, tiers, now_local, 0.5, now_tiers, *knobs, 0.80, "rank", "gen",
                               max_shift=1.0, max_step=0.2)
    assert found is not None
    rank, gen = found
    assert rank.step == "rank" and gen.step == "gen"
    assert rank.values["route_weights"]["large"] > 0.25 and gen.values["route_weights"]["cheap"] > 0.3
    assert "chosen together" in rank.reason and "keeps" in rank.reason
    # The two parts add up to the whole: the local mix's cost and quality at the cascade in force, the rest.
    total = (rank.predicted["cost_per_1k"] - rank.predicted["cost_per_1k_before"]
             + gen.predicted["cost_per_1k"] - gen.predicted["cost_per_1k_before"])
    assert total < -0.05 * rank.predicted["cost_per_1k_before"]
    assert gen.predicted["quality_before"] == pytest.approx(rank.predicted["quality"])
    assert gen.predicted["quality_lower_bound"] >= 0.80
    # What the model says, by hand: per route, the kept answers right plus the escalated at the tiers' accuracy.
    mix, threshold = rank.values["route_weights"], gen.values.get("cascade_threshold", 0.5)
    tier_mix = gen.values["route_weights"]
    escalated = [s for s in samples if s.confidence < threshold]
    accuracy = sum(w * sum(s.remote_correct for s in escalated if s.tier == t) / sum(s.tier == t for s in escalated)
                   for t, w in tier_mix.items())
    point = sum(w * (sum(s.local_correct for s in samples if s.route == r and s.confidence >= threshold)
                     + accuracy * sum(1 for s in escalated if s.route == r)) / 1000 for r, w in mix.items())
    assert gen.predicted["quality"] == pytest.approx(point)
    # Moves stay within their limits.
    small = local_tiers_policy(samples, local, tiers, now_local, 0.5, now_tiers, *knobs, 0.80, "rank", "gen",
                               max_shift=0.25, max_step=0.1)
    assert small is not None and small[0].values["route_weights"]["large"] <= 0.25 + 1e-9
    assert abs(small[1].values.get("cascade_threshold", 0.5) - 0.5) <= 0.1 + 1e-9
    # A large route no surer than the small one buys nothing; a slow one gains no weight.
    same, same_local, same_tiers = _local_case(large_right=0.80)
    assert local_tiers_policy(same, same_local, same_tiers, now_local, 0.5, now_tiers, *knobs, 0.80, "rank", "gen",
                              max_shift=1.0, max_step=0.2) is None
    assert local_tiers_policy(samples, local, tiers, now_local, 0.5, now_tiers, *knobs, 0.80, "rank", "gen",
                              max_shift=1.0, max_step=0.2, slow={"large"}) is None

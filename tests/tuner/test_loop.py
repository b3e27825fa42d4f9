"""The tuning loop: `decide` on constructed observations, and `tune_once` with its guardrails on a real store."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest

from tests.spans import COLUMNS, span_row
from tracetune.analyzer import SLO, load_prices, publish_prices, save_slo
from tracetune.tuner import decisions, versions
from tracetune.tuner.config import Knob, PipelineSpec
from tracetune.tuner.loop import LoopSettings, decide, look, tune_once
from tracetune.tuner.observe import Observation, RouteObservation, collect
from tracetune.tuner.policies import CascadeSample, TaskLatencies, mixture_quantile

SPEC = PipelineSpec("shop", {
    "clean": {},
    "score": {"cache_enabled": Knob("bool", False), "cache_ttl_seconds": Knob("float", 600.0, 0, 86_400, "s"),
              "cache_max_entries": Knob("int", 1000, 1, 1_000_000)},
    "escalate": {"cascade_threshold": Knob("float", 0.5, 0, 1), "max_concurrency": Knob("int", 8, 1, 64),
                 "timeout_seconds": Knob("float", 10.0, 0.01, 600)},
}, {"p95_ms": 500.0, "quality_floor": 0.8}, {"escalate": "score"})
SLO_SHOP = SLO(pipeline="shop", p95_ms=500.0, quality_floor=0.8)


def _observation(**score: int) -> Observation:
    obs = Observation("shop", 300.0, requests=3000, p95_ms=120.0)
    obs.steps["score"] = {"a": RouteObservation(spans=3000, p95_ms=40.0, **score)}
    return obs


def test_decide_turns_the_cache_on_for_a_duplicate_heavy_stream():
    obs = _observation(hashed=3000, distinct_inputs=900, bypass=3000)
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, obs)
    assert plan.changes["score"]["cache_enabled"] is True
    assert plan.changes["score"].get("cache_ttl_seconds", 600.0) <= 3600.0
    assert any(reason.startswith("score: ") for reason in plan.reasons)


def test_decide_leaves_a_stream_without_repeats_alone():
    assert decide(SPEC, SPEC.defaults(), SLO_SHOP, _observation(hashed=3000, distinct_inputs=3000)).changes == {}


def test_a_clamped_change_says_so_and_files_its_predictions_under_the_proposal():
    obs = _observation()
    obs.steps["escalate"] = {"llm": RouteObservation(spans=600, cost=6.0, p95_ms=300.0)}
    obs.cascade_samples["escalate"] = [CascadeSample(c / 100, c >= 30, True if c < 50 else None) for c in range(100)
                                       for _ in range(10)]
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, obs, LoopSettings(max_relative_change=0.05))
    threshold = plan.changes["escalate"]["cascade_threshold"]
    assert threshold == pytest.approx(0.5 * 0.95)  # 5% of 0.5 at most
    assert "clamped" in next(r for r in plan.reasons if r.startswith("escalate:"))
    assert "escalate.proposal.quality" in plan.predicted and "escalate.quality" not in plan.predicted


def test_decide_halves_concurrency_for_a_provider_answering_429():
    obs = _observation()
    obs.steps["escalate"] = {"llm": RouteObservation(spans=400, retried=40, errors=4, p95_ms=300.0)}
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, obs)
    assert plan.changes["escalate"]["max_concurrency"] == 4
    # Every 429 retried to an answer, p95 inside its target: nothing an objective needs is bought by waiting.
    obs.steps["escalate"] = {"llm": RouteObservation(spans=400, retried=40, p95_ms=300.0)}
    assert "escalate" not in decide(SPEC, SPEC.defaults(), SLO_SHOP, obs).changes
    # p95 over its target: a lowered limit goes back toward the default (at most doubled in one decision),
    # never lower.
    late = _observation()
    late.p95_ms = 900.0
    late.steps["escalate"] = {"llm": RouteObservation(spans=400, retried=40, errors=4, p95_ms=300.0)}
    lowered = SPEC.merge(SPEC.defaults(), {"escalate": {"max_concurrency": 2}})
    assert decide(SPEC, lowered, SLO_SHOP, late).changes["escalate"]["max_concurrency"] == 4
    assert "max_concurrency" not in decide(SPEC, SPEC.defaults(), SLO_SHOP, late).changes.get("escalate", {})


def test_decide_lowers_the_cascade_threshold_only_as_far_as_the_quality_floor_allows():
    obs = _observation()
    obs.steps["escalate"] = {"llm": RouteObservation(spans=600, cost=6.0, p95_ms=300.0)}  # 0.01 per call
    # The local model is right above confidence 0.3 and wrong below; the remote one is always right.
    obs.cascade_samples["escalate"] = [CascadeSample(c / 100, c >= 30, True if c < 50 else None) for c in range(100)
                                       for _ in range(10)]
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, obs, LoopSettings(max_relative_change=1.0))
    threshold = plan.changes["escalate"]["cascade_threshold"]
    assert threshold < 0.5  # cheaper: fewer escalations ...
    assert threshold >= 0.3 - 1e-9 or 1 - (0.3 - threshold) >= 0.8  # ... but quality stays at the floor or above
    assert plan.predicted["escalate.quality"] >= 0.8


def test_a_p95_missed_by_escalations_lowers_the_threshold_as_far_as_predicted_and_no_further():
    """Half the tasks escalate and take 200-1200 ms, local ones ~100 ms: p95 ~1100 ms against a 1000 ms target.
    The plan lowers the threshold to the lowest one whose predicted p95 (judged at p96) meets the target and
    whose quality holds the floor beyond the stricter (99%) bound a cost move needs, and files the prediction
    with the plan."""
    n = 2000
    obs = _observation()
    obs.p95_ms = 1100.0
    obs.quality, obs.labelled = 1.0, n
    obs.steps["escalate"] = {"llm": RouteObservation(spans=n // 2, cost=10.0, p95_ms=1150.0)}
    obs.cascade_samples["escalate"] = [CascadeSample(i / n, i / n >= 0.3, True) for i in range(n)]
    local, escalated = np.linspace(80, 120, n), np.linspace(200, 1200, n)
    obs.task_latency["escalate"] = TaskLatencies(local, {"llm": escalated})
    slo = SLO(pipeline="shop", p95_ms=1000.0, quality_floor=0.8)
    plan = decide(SPEC, SPEC.defaults(), slo, obs)
    # Expected, computed directly: every grid threshold, its share, its mixture p96 and its quality bound (the
    # escalated answers all right, measured: their own margin is small beside the kept ones', so a plain Wilson
    # bound on the whole at 99% is within a grid step of it).
    inside, proven = [], []
    for t in np.round(np.arange(0, 1.001, 0.01), 2):
        share = sum(s.confidence < t for s in obs.cascade_samples["escalate"]) / n
        p96 = mixture_quantile([(1 - share, local), (share, escalated)], 0.96)
        correct = sum(1 if s.confidence < t else s.local_correct for s in obs.cascade_samples["escalate"])
        z = 2.326
        lower = (correct / n + z ** 2 / (2 * n) - z * np.sqrt(correct / n * (1 - correct / n) / n
                 + z ** 2 / (4 * n * n))) / (1 + z ** 2 / n)
        if p96 <= 1000:
            inside.append(t)
            if lower >= 0.8:
                proven.append(t)
    assert max(inside) == pytest.approx(0.2)
    found = plan.changes["escalate"]["cascade_threshold"]
    assert found == pytest.approx(min(proven), abs=0.011) and found < max(inside)
    share = found  # confidences even over [0, 1)
    assert plan.predicted["escalate.p95_ms"] == pytest.approx(
        mixture_quantile([(1 - share, local), (share, escalated)], 0.95))
    assert plan.after["p95_ms"] == plan.predicted["escalate.p95_ms"] <= 1000  # the plan's p95, as predicted
    assert plan.predicted["escalate.quality_lower_bound"] >= 0.8
    assert plan.summary.startswith("Restoring p95 first.") and "-> " in plan.summary.split("p95")[-1]


# ---- tune_once on a real store -------------------------------------------------------------------

def _spans(client, n: int, distinct: int, cache: str = "bypass") -> None:
    """`n` tasks of pipeline shop over the last 20 s: a root and a `score` step whose inputs repeat."""
    now = time.time_ns()
    rows = []
    for i in range(n):
        trace = f"{i:032x}"
        start = now - (n - i) * (20_000_000_000 // n)
        rows.append(span_row(start, trace_id=trace, span_id=f"{2 * i + 1:016x}", name="shop", kind="Server",
                             attrs={"tracetune.pipeline": "shop"}, duration=30_000_000, status="Unset"))
        rows.append(span_row(start + 1000, trace_id=trace, span_id=f"{2 * i + 2:016x}", parent=f"{2 * i + 1:016x}",
                             name="score", attrs={"tracetune.pipeline": "shop", "tracetune.step": "score",
                                                  "tracetune.route": "a", "tracetune.cache": cache,
                                                  "tracetune.input_hash": f"{i % distinct:016x}"},
                             duration=20_000_000, status="Unset"))
    client.insert("otel_traces", rows, column_names=COLUMNS)


@pytest.fixture
def shop(client):
    versions.register(client, SPEC)
    save_slo(client, SLO_SHOP, "test")
    publish_prices(client, load_prices())
    return client


def test_tune_once_changes_the_config_records_why_and_then_cools_down(shop):
    _spans(shop, 400, distinct=100)
    seen = collect(shop, SPEC, 300)
    assert seen.requests == 400
    assert 20 <= seen.window_seconds < 60  # rates are per second of data (20 s of tasks), not per 300 s window
    settings = LoopSettings(min_requests=100, cooldown_seconds=300, window_seconds=30, canary_share=0)
    decision = tune_once(shop, "shop", settings)
    assert decision is not None and decision.kind == "tune"
    assert (decision.version_before, decision.version_after) == (1, 2)
    assert versions.latest(shop, "shop").steps["score"]["cache_enabled"] is True
    assert "score" in decision.reason and decision.predicted["before.requests"] == 400
    row = decisions.history(shop, "shop")[0]
    assert row["decision_id"] == decision.decision_id and row["config_after"]["steps"]["score"]["cache_enabled"]
    assert tune_once(shop, "shop", settings) is None  # cooling down
    later = datetime.now(UTC) + timedelta(seconds=400)
    tune_once(shop, "shop", settings, now=later)  # past the window: the effect of the first decision is observed
    assert decisions.history(shop, "shop")[-1]["observed"]["requests"] == 400


def test_collect_reads_the_latency_quantiles_lower_bounds(shop):
    """p95 and p99 with their one-sided 95% lower bounds over the window's requests: the quantiles at the levels
    `low_level` gives (the count of tasks under a quantile is binomial), which a target is missed beyond."""
    from tracetune.tuner.observe import low_level

    now, durations = time.time_ns(), np.arange(1, 401, dtype=float)  # 1 .. 400 ms
    shop.insert("otel_traces", [span_row(now - 10_000_000_000 + i * 1000, trace_id=f"{i + 1:032x}",
                                         span_id=f"{i + 1:016x}", name="shop", kind="Server",
                                         attrs={"tracetune.pipeline": "shop"}, duration=int(d * 1e6), status="Unset")
                                for i, d in enumerate(durations)], column_names=COLUMNS)
    seen = collect(shop, SPEC, 300)
    assert low_level(0.95, 400) == pytest.approx(0.95 - 1.6449 * (0.95 * 0.05 / 400) ** 0.5, abs=1e-4)
    assert seen.p95_ms == pytest.approx(np.quantile(durations, 0.95), abs=1)
    assert seen.p95_low_ms == pytest.approx(np.quantile(durations, low_level(0.95, 400)), abs=1)  # about 373 ms
    assert seen.p99_low_ms == pytest.approx(np.quantile(durations, low_level(0.99, 400)), abs=1)
    assert seen.p95_low_ms < seen.p95_ms - 5 and seen.p99_low_ms < seen.p99_ms - 2


def test_collect_counts_both_spellings_of_an_error_status(shop):
    """pdata writes `Error`, the proto enum name is `STATUS_CODE_ERROR`: both are failures, as in the analyzer."""
    now = time.time_ns()
    statuses = ["Error", "STATUS_CODE_ERROR", "Unset", "STATUS_CODE_UNSET", "Ok", "STATUS_CODE_OK"]
    rows = []
    for i, status in enumerate(statuses):
        trace, root = f"{i + 1:032x}", f"{2 * i + 1:016x}"
        rows.append(span_row(now - 1_000_000_000, trace_id=trace, span_id=root, name="shop", kind="Server",
                             attrs={"tracetune.pipeline": "shop"}, duration=30_000_000, status=status))
        rows.append(span_row(now - 999_000_000, trace_id=trace, span_id=f"{2 * i + 2:016x}", parent=root,
                             name="score", attrs={"tracetune.pipeline": "shop", "tracetune.step": "score",
                                                  "tracetune.route": "a"}, duration=20_000_000, status=status))
        # A failed batch says nothing about how long a good batch takes: only the four not failed are samples.
        rows.append(span_row(now - 998_000_000, trace_id=f"{100 + i:032x}", span_id=f"{100 + i:016x}", name="batch",
                             attrs={"tracetune.batch_pipeline": "shop", "tracetune.batch_of": "score",
                                    "tracetune.batch_size": "4"}, duration=10_000_000, status=status))
    shop.insert("otel_traces", rows, column_names=COLUMNS)
    seen = collect(shop, SPEC, 300)
    assert (seen.requests, seen.errors) == (6, 2)
    assert seen.steps["score"]["a"].errors == 2
    assert len(seen.batches["score"]) == 4


def test_collect_splits_task_latency_by_the_cascade(shop):
    """Each task's end-to-end latency, by the route its cascade step escalated it to; the tasks without the
    escalation are those kept local and the escalated ones less the cascade step's time."""
    now = time.time_ns()
    rows = []
    for i, (total_ms, remote_ms) in enumerate([(100, None), (200, None), (1000, 800), (1500, 800)]):
        trace, root = f"{i + 1:032x}", f"{2 * i + 1:016x}"
        start = now - 2_000_000_000 + i * 1_000_000
        rows.append(span_row(start, trace_id=trace, span_id=root, name="shop", kind="Server",
                             attrs={"tracetune.pipeline": "shop"}, duration=total_ms * 1_000_000, status="Unset"))
        if remote_ms is not None:
            rows.append(span_row(start + 1000, trace_id=trace, span_id=f"{2 * i + 2:016x}", parent=root,
                                 name="escalate", attrs={"tracetune.pipeline": "shop", "tracetune.step": "escalate",
                                                         "tracetune.route": "llm"},
                                 duration=remote_ms * 1_000_000, status="Unset"))
    shop.insert("otel_traces", rows, column_names=COLUMNS)
    latency = collect(shop, SPEC, 300).task_latency["escalate"]
    assert sorted(latency.local_ms) == pytest.approx([100, 200, 200, 700])
    assert {route: sorted(v) for route, v in latency.escalated_ms.items()} == {"llm": pytest.approx([1000, 1500])}


def test_tune_once_needs_enough_requests_and_leaves_a_frozen_pipeline_alone(shop):
    _spans(shop, 150, distinct=30)
    assert tune_once(shop, "shop", LoopSettings(min_requests=200, window_seconds=30)) is None
    assert tune_once(shop, "shop", LoopSettings(min_requests=100, window_seconds=300)) is None  # 20 s < half of 300
    decisions.set_state(shop, "shop", frozen=True, pinned=False, author="test", reason="hands off")
    assert tune_once(shop, "shop", LoopSettings(min_requests=100, window_seconds=30)) is None
    assert versions.latest(shop, "shop").version == 1
    decisions.set_state(shop, "shop", frozen=False, pinned=False, author="test", reason="go")
    assert tune_once(shop, "shop", LoopSettings(min_requests=100, window_seconds=30)) is not None


# ---- a missed objective first, no reversals on the same evidence, one sentence ----------------------

def _slow_escalations(p95: float) -> Observation:
    """Escalations take 900 ms; the local model is right above confidence 0.3, the remote one always."""
    obs = Observation("shop", 300.0, requests=3000, p95_ms=p95, cost_per_1k=6.0, quality=0.99, labelled=1000)
    obs.steps["score"] = {"a": RouteObservation(spans=3000, p95_ms=40.0)}
    obs.steps["escalate"] = {"llm": RouteObservation(spans=1500, cost=15.0, p95_ms=900.0)}
    obs.cascade_samples["escalate"] = [CascadeSample(c / 100, c >= 30, True if c < 50 else None) for c in range(100)
                                       for _ in range(10)]
    return obs


def test_a_missed_p95_is_restored_first_in_one_move_as_far_as_the_model_allows():
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, _slow_escalations(p95=950.0))  # max_relative_change 0.5
    assert plan.violated == ["p95"] and plan.reasons[0].startswith("restoring first: p95 950 ms over the 500 ms")
    threshold = plan.changes["escalate"]["cascade_threshold"]
    # The cheapest threshold the floor allows (0.8: about 0.12), in one move rather than 0.1 per decision.
    assert 0.1 < threshold < 0.2
    assert plan.summary.startswith("Restoring p95 first. Escalated fewer tasks (escalate threshold 0.5 -> "), \
        plan.summary
    assert "USD per 1k (-" in plan.summary and "p95 950 ms now (target 500 ms), not predicted" in plan.summary
    # The same data with p95 met: a cost cut of at most 0.1 per decision.
    relaxed = decide(SPEC, SPEC.defaults(), SLO_SHOP, _slow_escalations(p95=450.0))
    assert relaxed.violated == [] and relaxed.changes["escalate"]["cascade_threshold"] == pytest.approx(0.4)


def test_a_latency_target_is_missed_only_beyond_the_windows_noise():
    """A p95 over its target by less than its own lower bound's distance is no missed objective: nothing is
    restored first (a startup minute at 506 ms against 500 ms once sent a real run's first canary after it)."""
    from tracetune.tuner.loop import violations

    near = _slow_escalations(p95=506.0)
    near.p95_low_ms = 470.0
    assert violations(SLO_SHOP, near) == {}
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, near)
    assert plan.violated == [] and plan.changes["escalate"]["cascade_threshold"] == pytest.approx(0.4)
    near.p95_low_ms = 503.0  # over the target at its bound: missed, restored first
    assert decide(SPEC, SPEC.defaults(), SLO_SHOP, near).violated == ["p95"]
    slow = SLO(pipeline="shop", p99_ms=600.0)
    tail = Observation("shop", 300.0, requests=3000, p95_ms=300.0, p99_ms=650.0, p95_low_ms=290.0, p99_low_ms=590.0)
    assert violations(slow, tail) == {}
    tail.p99_low_ms = 610.0
    assert list(violations(slow, tail)) == ["p99"]


def test_a_knob_does_not_go_back_within_an_hour_on_the_same_evidence():
    from tracetune.tuner.loop import Move, evidence

    config = SPEC.merge(SPEC.defaults(), {"score": {"cache_enabled": True}})
    quiet = _observation(hashed=3000, distinct_inputs=3000)  # no repeats: the cache policy wants it off
    assert decide(SPEC, config, SLO_SHOP, quiet).changes == {"score": {"cache_enabled": False}}
    moves = {("score", "cache_enabled"): Move("score", "cache_enabled", False, True, 1000.0,
                                              evidence(quiet, SLO_SHOP, SPEC))}
    held = decide(SPEC, config, SLO_SHOP, quiet, moves=moves, now=1600.0)
    assert held.changes == {} and any(r.startswith("held score.cache_enabled (moved 10 min ago)")
                                      for r in held.reasons), held.reasons
    # An hour later it may go back; and with accuracy, a price or an objective changed beyond noise (below).
    assert decide(SPEC, config, SLO_SHOP, quiet, moves=moves, now=1000.0 + 3601).changes
    # Twice the load is no reason by itself: the cache's move had no predicted effect on cost for load to turn
    # around, and p95 is within its target either way.
    busier = _observation(hashed=3000, distinct_inputs=3000)
    busier.requests = 6000
    held = decide(SPEC, config, SLO_SHOP, busier, moves=moves, now=1600.0)
    assert held.changes == {} and any(
        r.startswith("held score.cache_enabled (moved 10 min ago; load 10.0 -> 20.0 req/s leaves what it was "
                     "predicted to do as it was)") for r in held.reasons), held.reasons
    # A reversal is a move the other way, not any move: moving on in the same direction is never held.
    assert Move("s", "k", 0.5, 0.4, 0.0, {}).reversed_by(0.4, 0.45)
    assert not Move("s", "k", 0.5, 0.4, 0.0, {}).reversed_by(0.4, 0.3)
    assert Move("s", "w", {"a": 0.8, "b": 0.2}, {"a": 0.55, "b": 0.45}, 0.0, {}).reversed_by(
        {"a": 0.55, "b": 0.45}, {"a": 0.8, "b": 0.2})


def test_a_route_mix_does_not_swing_back_on_a_change_of_load_alone():
    """A real run moved classify's int8 share 0.20 -> 0.45 -> 0.30 -> 0.55, each reversal let through by a
    14% change of load: load does not change what a route costs or how often it is right."""
    from tracetune.tuner.loop import Move, evidence

    then = _qa()
    config = QA.merge(QA.defaults(), {"rank": {"route_weights": {"small": 0.5, "large": 0.5}}})
    # Ten minutes ago the mix moved large 0.75 -> 0.5, predicted cheaper; now the policy wants it back.
    last = Move("rank", "route_weights", {"small": 0.25, "large": 0.75}, {"small": 0.5, "large": 0.5}, 1000.0,
                evidence(then, SLO_QA, QA), cost_effect=-0.01)
    busier = _qa()
    busier.requests = 2600  # 6.7 -> 8.7 req/s over 300 s: beyond noise (about 6 standard errors) and 30%
    plan = decide(QA, config, SLO_QA, busier, moves={("rank", "route_weights"): last}, now=1600.0)
    assert "rank" not in plan.changes, plan.changes
    assert any(r.startswith("held rank.route_weights (moved 10 min ago; load 6.7 -> 8.7 req/s leaves what it was "
                            "predicted to do as it was)") for r in plan.reasons), plan.reasons
    # A price that moved is evidence: it goes back, but while no objective is missed at most half as far as the
    # move it undoes (0.25 of traffic: 0.125 back, not the 0.25 its policy allows in one decision).
    dearer = {**evidence(then, SLO_QA, QA), "rank.small.unit_cost": 2.5e-8}  # small cost half as much then
    repriced = Move("rank", "route_weights", last.before, last.after, 1000.0, dearer, cost_effect=-0.01)
    plan = decide(QA, config, SLO_QA, busier, moves={("rank", "route_weights"): repriced}, now=1600.0)
    assert plan.changes["rank"]["route_weights"]["large"] == pytest.approx(0.625), plan.changes
    assert any(r.startswith("rank.route_weights goes back the way it moved 10 min ago: rank.small price")
               and "at most half of that move back" in r for r in plan.reasons), plan.reasons
    # A missed objective is restored as far as the models allow: no halving.
    slow = _qa(p99=4500.0)
    slow.requests = 2600
    plan = decide(QA, config, SLO_QA, slow, moves={("rank", "route_weights"): repriced}, now=1600.0)
    assert plan.violated == ["p99"] and plan.changes["rank"]["route_weights"]["large"] == pytest.approx(1.0)


def test_a_change_of_load_counts_where_it_turns_a_moves_predicted_effect_around():
    from tracetune.tuner.loop import Move, _hold_reversals
    from tracetune.tuner.plan import Plan

    def plan_going_back(cost_before: float, cost_after: float, p95: float = 300.0, without: float = 290.0) -> Plan:
        plan = Plan(changes={"s": {"batch_max_wait_ms": 5.0}}, reasons=["s: batching"], violated=["p95"] * (p95 > 500),
                    predicted={"s.compute_ms_per_request": cost_after, "s.compute_ms_per_request_before": cost_before},
                    before={"p95_ms": p95}, effects={"s": {"p95_ms": without}}, targets={"p95_ms": 500.0},
                    evidence={"rate": 20.0, "window_seconds": 300.0})
        plan._current["s"] = {"batch_max_wait_ms": 20.0}
        return plan

    # The wait went 5 -> 20 ms at 10 req/s, predicted to cut compute per request; at 20 req/s going back to 5 ms
    # is predicted to cut it too: at this load the move's effect on cost turned around.
    last = Move("s", "batch_max_wait_ms", 5.0, 20.0, 0.0, {"rate": 10.0, "window_seconds": 300.0}, cost_effect=-0.2)
    plan = plan_going_back(1.0, 0.9)
    _hold_reversals(plan, {("s", "batch_max_wait_ms"): last}, 600.0, LoopSettings())
    assert plan.changes == {"s": {"batch_max_wait_ms": 12.5}}, plan.reasons  # half of the 15 ms it moved
    assert "and at that load the move's predicted effect on cost changed sign" in plan.reasons[-1], plan.reasons
    # Going back predicted dearer: the load did not turn it around; held.
    plan = plan_going_back(1.0, 1.1)
    _hold_reversals(plan, {("s", "batch_max_wait_ms"): last}, 600.0, LoopSettings())
    assert plan.changes == {} and "leaves what it was predicted to do as it was" in plan.reasons[-1]
    # Dearer, but p95 is over the target with the move and predicted within it without: it goes back, as far as
    # its model says (an objective is missed).
    plan = plan_going_back(1.0, 1.1, p95=620.0, without=450.0)
    _hold_reversals(plan, {("s", "batch_max_wait_ms"): last}, 600.0, LoopSettings())
    assert plan.changes == {"s": {"batch_max_wait_ms": 5.0}} and "620 ms with the move is over the 500 ms target" \
        in plan.reasons[-1], plan.reasons


def test_a_threshold_going_back_up_because_the_one_in_force_lost_the_floor_is_not_held():
    """A cascade threshold lowered 20 minutes ago, on labels no different beyond noise: going back up is held,
    unless the policy says the threshold in force no longer holds the floor at its lower bound (quality first);
    and while quality is missed, a move raising it is not held back by a canary that moved it that way and was
    rolled back (for its other moves, or for want of tasks)."""
    from tracetune.tuner.loop import Move, Rejected, _hold_reversals, drop_rejected
    from tracetune.tuner.plan import Part, Plan

    def going_up(held: float) -> Plan:
        plan = Plan(changes={"g": {"cascade_threshold": 0.71}}, reasons=["g: toward the floor"],
                    predicted={"g.quality": 0.895, "g.quality_before": 0.885, "g.floor_held_before": held},
                    before={"quality": 0.885}, evidence={"rate": 2.0, "window_seconds": 300.0})
        plan._current["g"] = {"cascade_threshold": 0.61}
        return plan

    last = Move("g", "cascade_threshold", 0.9, 0.61, 0.0, {"rate": 2.0, "window_seconds": 300.0})
    held = going_up(1.0)
    _hold_reversals(held, {("g", "cascade_threshold"): last}, 1200.0, LoopSettings())
    assert held.changes == {} and held.reasons[-1].startswith("held g.cascade_threshold")
    lost = going_up(0.0)
    _hold_reversals(lost, {("g", "cascade_threshold"): last}, 1200.0, LoopSettings())
    assert lost.changes == {"g": {"cascade_threshold": 0.71}}
    assert "no longer holds the floor at its lower bound" in lost.reasons[-1], lost.reasons

    rejected = Rejected(1100.0, 3, {"g": {"cascade_threshold": 0.61}}, {"g": {"cascade_threshold": 0.62}})
    at = PipelineSpec("p", {"g": {"cascade_threshold": Knob("float", 0.61, 0, 1)}}, {}, {})
    for violated, kept in (([], {}), (["quality"], {"g": {"cascade_threshold": 0.71}})):
        plan = going_up(0.0)
        plan.violated = violated
        plan.parts = [Part("g", ("cascade_threshold",), 0.1, 0.01)]
        drop_rejected(plan, at.defaults(), rejected, 1200.0, LoopSettings())
        assert plan.changes == kept, (violated, plan.reasons)
    # Once the config in force moved on (to 1.0 since), going down to 0.65 is another move, not the one tried.
    down = Plan(changes={"g": {"cascade_threshold": 0.65}})
    down._current["g"] = {"cascade_threshold": 1.0}
    drop_rejected(down, at.merge(at.defaults(), {"g": {"cascade_threshold": 1.0}}), rejected, 1200.0,
                  LoopSettings())
    assert down.changes == {"g": {"cascade_threshold": 0.65}}, down.reasons


def test_evidence_changes_only_beyond_noise():
    from tracetune.tuner.loop import changed

    then = {"rate": 10.0, "window_seconds": 300.0, "c.fp32.correct": 883.0, "c.fp32.labelled": 1000.0}
    # 0.883 against 0.896 on 1000 labels each, 10 against 10.3 req/s: noise.
    assert changed(then, {**then, "rate": 10.3, "c.fp32.correct": 896.0}) is None
    assert changed(then, {**then, "c.fp32.correct": 950.0}) == "c.fp32 accuracy 0.883 -> 0.950"
    assert changed({**then, "e.llm.unit_cost": 1e-4}, {**then, "e.llm.unit_cost": 2e-4}).startswith("e.llm price")
    assert changed(then, {**then, "missed.p95": 1.0}) == "p95 now missed"
    # A route that lost its traffic answers a handful of labels: 0 of 2 right is no evidence.
    assert changed(then, {**then, "c.fp32.correct": 0.0, "c.fp32.labelled": 2.0}) is None


def test_the_loop_rebuilds_the_last_moves_from_its_audit(shop):
    from tracetune.tuner.loop import Moves

    _spans(shop, 400, distinct=100)
    settings = LoopSettings(min_requests=100, cooldown_seconds=0, window_seconds=30, canary_share=0)
    decision = tune_once(shop, "shop", settings)
    assert decision is not None and decision.predicted["evidence.rate"] > 0
    summary, _, details = decision.reason.partition("\n")
    assert summary.startswith("Turned score's cache on") and details.startswith("score: ")
    moves = Moves.from_history(decisions.history(shop, "shop"))
    move = moves[("score", "cache_enabled")]
    assert (move.before, move.after) == (False, True) and move.evidence["rate"] == decision.predicted["evidence.rate"]


def test_one_look_judges_a_canary_else_guards_decides_and_leaves_a_rejected_move_alone():
    """`look` is the step `tune_once` and the simulation both take: what it reads, and what it comes to."""
    import numpy as np

    from tracetune.tuner.canary import Arm
    from tracetune.tuner.loop import Rejected

    def never():
        raise AssertionError("read while it should not be")

    settings = LoopSettings(min_requests=100, cooldown_seconds=300, window_seconds=300)
    busy = _observation(hashed=3000, distinct_inputs=900, bypass=3000)  # repeats: the cache policy wants it on
    same = Arm.of(np.full(300, 50.0), np.full(300, 0.001))
    # A canary on trial is judged on its arms, and nothing is measured.
    out = look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 0.0, measure=never, trial_age=60.0,
               arms=lambda: (same, same))
    assert out.verdict is not None and out.verdict.action == "wait" and out.plan is None
    expired = look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 0.0, measure=never, trial_age=1800.0,
                   arms=lambda: (same, same))
    assert expired.verdict.action == "rollback"
    # Cooling down: nothing measured; too few requests: nothing decided.
    assert look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 0.0, measure=never, since_change=299.0).idle == \
        "cooling down"
    few = _observation(hashed=50, distinct_inputs=10, bypass=50)
    few.requests = 50
    assert look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 0.0, measure=lambda: few).idle == "too little data"
    # Enough: the plan the policies propose ...
    out = look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 0.0, measure=lambda: busy, since_change=301.0)
    assert out.plan is not None and out.plan.changes["score"]["cache_enabled"] is True
    # ... unless a canary moved that knob that way and was rolled back within the hour.
    rejected = Rejected(0.0, 2, {"score": {"cache_enabled": False}}, {"score": {"cache_enabled": True}})
    out = look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 600.0, measure=lambda: busy, rejected=lambda: rejected)
    assert out.plan is not None and "cache_enabled" not in out.plan.changes.get("score", {})
    assert any(r.startswith("left score.cache_enabled alone: canary version 2") for r in out.plan.reasons)
    later = look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 3601.0, measure=lambda: busy, rejected=lambda: rejected)
    assert later.plan is not None and later.plan.changes["score"]["cache_enabled"] is True


# ---- a cascade's routes judged by what they cost the pipeline ---------------------------------------------

QA = PipelineSpec("qa", {
    "rank": {"route_weights": Knob("weights", {"small": 0.5, "large": 0.5})},
    "gen": {"cascade_threshold": Knob("float", 0.7, 0, 1),
            "route_weights": Knob("weights", {"cheap": 0.5, "dear": 0.5}), "max_concurrency": Knob("int", 8, 1, 64)},
}, {"p95_ms": 2000.0, "p99_ms": 4000.0, "quality_floor": 0.9}, {"gen": "rank"})
SLO_QA = SLO(pipeline="qa", p95_ms=2000.0, p99_ms=4000.0, quality_floor=0.9)


def _qa(p95: float = 600.0, p99: float = 1500.0, retried: int = 0) -> Observation:
    """rank's small route is cheaper per call but unsure: 60% of its answers escalate, 10% of large's."""
    obs = Observation("qa", 300.0, requests=2000, p95_ms=p95, p99_ms=p99, cost_per_1k=0.3, quality=0.95,
                      labelled=2000)
    obs.steps["rank"] = {"small": RouteObservation(spans=1000, p95_ms=5.0, cost=0.00005, correct=720, labelled=1000),
                         "large": RouteObservation(spans=1000, p95_ms=15.0, cost=0.0002, correct=860, labelled=1000)}
    obs.steps["gen"] = {"cheap": RouteObservation(spans=350, p95_ms=400.0, cost=0.035, correct=330, labelled=350,
                                                  retried=retried),
                        "dear": RouteObservation(spans=350, p95_ms=900.0, cost=0.35, correct=345, labelled=350)}
    samples = []
    for route, unsure in (("small", 600), ("large", 100)):
        for i in range(1000):
            sure = i >= unsure
            samples.append(CascadeSample(0.9 if sure else 0.5, sure or i % 3 == 0, None if sure else True, route))
    obs.cascade_samples["gen"] = samples
    return obs


def test_a_rolled_back_canary_holds_back_only_the_moves_that_could_explain_what_it_failed():
    from tracetune.tuner.loop import Rejected

    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)
    plan = look(QA, QA.defaults(), SLO_QA, settings, 0.0, measure=_qa).plan
    tried = {step: {**QA.defaults().steps[step], **values} for step, values in plan.changes.items()}
    effects = plan.move_effects()  # rank's mix: cheaper and more often right; gen's: cheaper, less often right
    assert effects["move.rank.route_weights.quality_delta"] > 0 > effects["move.gen.route_weights.quality_delta"]

    def again(failed: set[str], effects=effects):
        rejected = Rejected(0.0, 2, QA.defaults().steps, tried, frozenset(failed), effects)
        return look(QA, QA.defaults(), SLO_QA, settings, 600.0, measure=_qa, rejected=lambda: rejected).plan

    # Rolled back for its quality: gen's cheaper mix is to blame; rank's, predicted to raise quality, is not.
    quality = again({"quality"})
    assert list(quality.changes) == ["rank"], quality.changes
    assert any(r.startswith("left gen.route_weights") and "rolled back for its quality" in r for r in quality.reasons)
    # Rolled back for what no move predicts (latency), for want of tasks or time, or for a cost every move was
    # predicted to lower (the predictions were wrong), or with no predictions on record: both held back.
    for failed, known in (({"latency"}, effects), (set(), effects), ({"cost"}, effects), ({"quality"}, {})):
        assert again(failed, known) is None, failed


CAS = PipelineSpec("c", {"local": {}, "gen": {"cascade_threshold": Knob("float", 0.9, 0, 1)}},
                   {"p95_ms": 2000.0, "quality_floor": 0.85}, {"gen": "local"})
SLO_CAS = SLO(pipeline="c", p95_ms=2000.0, quality_floor=0.85)


def _cas() -> Observation:
    """3000 labelled tasks, local answers right as often as they are sure, escalated ones (under 0.9) 97%."""
    obs = Observation("c", 300.0, requests=3000, p95_ms=800.0, cost_per_1k=1.0, quality=0.95, labelled=3000)
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.0, 1.0, 3000)
    obs.cascade_samples["gen"] = [CascadeSample(float(c), bool(rng.random() < c),
                                                bool(rng.random() < 0.97) if c < 0.9 else None) for c in confidence]
    escalated = int((confidence < 0.9).sum())
    obs.steps["local"] = {"": RouteObservation(spans=3000, p95_ms=5.0)}
    obs.steps["gen"] = {"": RouteObservation(spans=escalated, p95_ms=700.0, cost=escalated * 0.001,
                                             correct=int(0.97 * escalated), labelled=escalated)}
    return obs


def test_a_threshold_within_the_labels_noise_of_the_floor_goes_up_only_while_quality_is_missed():
    """The threshold in force a hair under the floor on its labels' point estimate, within their noise: held
    while the pipeline's quality is not missed beyond doubt (a first minute's labels are no evidence), and moved
    up, quality first, once it is."""
    from tracetune.tuner.policies import cascade_policy

    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)
    at = CAS.merge(CAS.defaults(), {"gen": {"cascade_threshold": 0.5}})
    point = cascade_policy(_cas().cascade_samples["gen"], 0.5, CAS.steps["gen"]["cascade_threshold"], 0.99, 0.001,
                           max_step=1.0, quality_missed=True).predicted["quality_before"]
    floor = round(point + 0.005, 3)
    spec = PipelineSpec("c", CAS.steps, {"p95_ms": 2000.0, "quality_floor": floor}, CAS.cascades)
    slo = SLO(pipeline="c", p95_ms=2000.0, quality_floor=floor)
    held = _cas()
    held.quality = floor - 0.005  # under the floor, not beyond doubt on 3000 labels
    assert "gen" not in decide(spec, at, slo, held, settings).changes
    missed = _cas()
    missed.quality = floor - 0.05  # beyond doubt
    plan = decide(spec, at, slo, missed, settings)
    assert plan.changes["gen"]["cascade_threshold"] > 0.5, plan.reasons


def test_a_cascades_tiers_are_judged_on_the_questions_its_threshold_escalates():
    """The cheap tier is right on 75% of all it answered in the window (mostly easy questions, escalated when
    the threshold was higher), but on 20% of the hard ones the threshold escalates now: it takes only the
    weight those allow. Judged on all its answers it would take more, with a lower threshold beside it, and
    the pipeline's quality would fall under the floor."""
    spec = PipelineSpec("t", {"local": {}, "gen": {"cascade_threshold": Knob("float", 0.3, 0, 1),
                                                   "route_weights": Knob("weights", {"cheap": 0.5, "dear": 0.5})}},
                        {"p95_ms": 2000.0, "quality_floor": 0.8}, {"gen": "local"})
    slo = SLO(pipeline="t", p95_ms=2000.0, quality_floor=0.8)
    obs = Observation("t", 300.0, requests=3000, p95_ms=800.0, cost_per_1k=1.0, quality=0.86, labelled=3000)
    rng = np.random.default_rng(2)
    samples = []
    for i, c in enumerate(rng.uniform(0.0, 1.0, 3000)):
        tier = ("cheap", "dear")[i % 2]
        right = rng.random() < (0.2 if tier == "cheap" else 0.97) if c < 0.3 else None
        samples.append(CascadeSample(float(c), bool(rng.random() < (0.97 if c >= 0.3 else 0.3)), right,
                                     tier=tier if c < 0.3 else ""))
    obs.cascade_samples["gen"] = samples
    obs.steps["local"] = {"": RouteObservation(spans=3000, p95_ms=5.0)}
    obs.steps["gen"] = {"cheap": RouteObservation(spans=1000, p95_ms=700.0, cost=0.1, correct=750, labelled=1000),
                        "dear": RouteObservation(spans=1000, p95_ms=700.0, cost=1.0, correct=970, labelled=1000)}
    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)
    changes = decide(spec, spec.defaults(), slo, obs, settings).changes.get("gen", {})
    threshold, cheap = changes.get("cascade_threshold", 0.3), changes.get("route_weights", {"cheap": 0.5})["cheap"]
    # The quality the config it sets has, from how the answers above were drawn: local answers right 97% of the
    # time over 0.3 and 30% under; the cheap tier right on 20% of the questions under 0.3, the dear one on 97%.
    kept = 0.97 * (1 - max(threshold, 0.3)) + 0.3 * max(0.0, 0.3 - threshold)
    assert kept + threshold * (0.2 * cheap + 0.97 * (1 - cheap)) >= 0.8, changes


def test_a_threshold_rolled_back_is_tried_again_half_the_way():
    """0.90 -> 0.80 rolled back for its quality: the next look tries 0.85 (the best threshold left within half
    the move), not nothing for an hour; that rolled back too, 0.875; a move the other way is not bounded."""
    from tracetune.tuner.loop import Rejected

    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)
    first = look(CAS, CAS.defaults(), SLO_CAS, settings, 0.0, measure=_cas).plan
    assert first.changes == {"gen": {"cascade_threshold": 0.8}}

    def after(tried: float, at: float = 600.0):
        rejected = Rejected(0.0, 2, {"gen": {"cascade_threshold": 0.9}}, {"gen": {"cascade_threshold": tried}},
                            frozenset({"quality"}), first.move_effects())
        return look(CAS, CAS.defaults(), SLO_CAS, settings, at, measure=_cas, rejected=lambda: rejected).plan

    half = after(0.8)
    assert half.changes == {"gen": {"cascade_threshold": 0.85}}
    assert any("moved gen.cascade_threshold 0.9 -> 0.85, half or less of its 0.9 -> 0.8" in r for r in half.reasons)
    assert after(0.85).changes == {"gen": {"cascade_threshold": 0.875}}
    assert after(0.8, at=3601.0).changes == {"gen": {"cascade_threshold": 0.8}}  # the hour is over
    assert after(0.95).changes == {"gen": {"cascade_threshold": 0.8}}  # an upward move bounds only upward
    # Up: in force 0.5, whose labels put quality at risk under a 0.93 floor (0.5 -> 0.6, the step limit); 0.5 -> 0.6
    # was rolled back (for want of time), so no higher than 0.55 (the declared default, 0.9, lies outside) ...
    low = CAS.merge(CAS.defaults(), {"gen": {"cascade_threshold": 0.5}})
    up = Rejected(0.0, 2, {"gen": {"cascade_threshold": 0.5}}, {"gen": {"cascade_threshold": 0.6}})
    strict = SLO(pipeline="c", p95_ms=2000.0, quality_floor=0.93)

    def at_risk() -> Observation:  # the pipeline at the floor, not beyond doubt over it (nor under it)
        obs = _cas()
        obs.quality = 0.93
        return obs

    assert look(CAS, low, strict, settings, 600.0, measure=at_risk).plan.changes["gen"]["cascade_threshold"] == 0.6
    plan = look(CAS, low, strict, settings, 600.0, measure=at_risk, rejected=lambda: up).plan
    assert 0.5 < plan.changes["gen"]["cascade_threshold"] <= 0.55
    # ... unless quality is missed: then going up is quality first, and not bounded.

    def missed() -> Observation:
        obs = _cas()
        obs.quality = 0.9
        return obs

    plan = look(CAS, low, strict, settings, 600.0, measure=missed, rejected=lambda: up).plan
    assert plan.changes["gen"]["cascade_threshold"] > 0.55


def test_a_cost_only_plan_whose_saving_no_canary_could_show_in_its_time_is_not_tried():
    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)
    busy = _qa()  # 2000 tasks in 300 s: a canary on 20% gets 4800 in twice its 1800 s
    out = look(QA, QA.defaults(), SLO_QA, settings, 0.0, measure=lambda: busy)
    assert out.plan is not None and out.plan.after["cost_per_1k"] < 0.65 * busy.cost_per_1k  # -40%
    quiet = _qa()
    quiet.window_seconds = 30_000.0  # the same tasks over 100 times as long: 48 in twice its time
    out = look(QA, QA.defaults(), SLO_QA, settings, 0.0, measure=lambda: quiet)
    assert out.plan is None and out.idle.startswith("saving too small to show: a canary on 20% of tasks would need "
                                                    "about "), out.idle
    assert "gets about 48 in its 3600 s (twice its 1800 s, running on)" in out.idle
    assert "Not tried: Sent more of rank to large" in out.idle
    # Straight to every task (no canary), it goes.
    assert look(QA, QA.defaults(), SLO_QA, LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300,
                                                        canary_share=0), 0.0, measure=lambda: quiet).plan is not None


def test_a_plan_too_small_to_show_tries_the_cascades_own_moves_when_their_adjusted_costs_would_show_them():
    """Turning the local step's cache on (saving nothing) beside a lower threshold: the plan changes a step
    outside the cascade, so its canary's costs cannot be adjusted for the escalations in force, and at this load
    (3000 tasks in 6000 s) its 6% saving is too small to show. The threshold alone, decided again with the local
    step as it is, escalates 6% of tasks differently: adjusted, that is shown in the canary's time, so it goes."""
    from tracetune.tuner.loop import unprovable

    spec = PipelineSpec("c", {
        "local": {"cache_enabled": Knob("bool", False), "cache_ttl_seconds": Knob("float", 600.0, 0, 86_400, "s"),
                  "cache_max_entries": Knob("int", 1000, 1, 1_000_000)},
        "gen": {"cascade_threshold": Knob("float", 0.5, 0, 1)}}, {"p95_ms": 2000.0, "quality_floor": 0.8},
        {"gen": "local"})
    slo = SLO(pipeline="c", p95_ms=2000.0, quality_floor=0.8)
    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)

    def quiet() -> Observation:
        obs = _cas()  # local answers right as often as they are sure; half the tasks escalate at 0.5
        obs.window_seconds = 6000.0
        obs.steps["local"] = {"": RouteObservation(spans=3000, p95_ms=5.0, cost=0.03, hashed=3000,
                                                   distinct_inputs=2400, misses=3000)}  # 20% repeat
        return obs

    whole = decide(spec, spec.defaults(), slo, quiet(), settings)
    assert set(whole.changes) == {"local", "gen"} and whole.changes["local"]["cache_enabled"] is True
    assert unprovable(whole, quiet(), settings, spec).startswith("saving too small to show")
    out = look(spec, spec.defaults(), slo, settings, 0.0, measure=quiet)
    assert out.plan is not None and out.plan.changes == {"gen": {"cascade_threshold": whole.changes["gen"][
        "cascade_threshold"]}}, out.idle


def test_a_tasks_cost_spread_comes_from_its_steps_routes():
    obs = Observation("p", 300.0, requests=1000, cost_per_1k=1.0)
    # One step every task calls at 0.0005 USD, one tenth of tasks escalating at 0.005 USD.
    obs.steps["local"] = {"m": RouteObservation(spans=1000, cost=0.5)}
    obs.steps["llm"] = {"big": RouteObservation(spans=100, cost=0.5)}
    assert obs.cost_spread() == pytest.approx((0.1 * 0.005 ** 2 - 0.0005 ** 2) ** 0.5)
    # Against the spread of simulated tasks with the same calls.
    rng = np.random.default_rng(3)
    tasks = 0.0005 + np.where(rng.random(200_000) < 0.1, 0.005, 0.0)
    assert obs.cost_spread() == pytest.approx(tasks.std(), rel=0.02)
    # Half the escalations answered by the cache, at no cost: the other half pay 0.01 each, spreading tasks wider.
    obs.steps["llm"] = {"big": RouteObservation(spans=100, hits=50, cost=0.5)}
    tasks = 0.0005 + np.where(rng.random(200_000) < 0.05, 0.01, 0.0)
    assert obs.cost_spread() == pytest.approx(tasks.std(), rel=0.02)
    assert Observation("p", 300.0).cost_spread() is None


def test_a_canary_of_cascades_alone_is_judged_on_the_spread_left_once_its_costs_are_adjusted():
    """The tasks a threshold move escalates differently, and the calls' own spread: not which tasks were hard."""
    from tracetune.tuner.loop import _moved
    from tracetune.tuner.observe import CascadeSample
    from tracetune.tuner.plan import Plan

    obs = Observation("shop", 300.0, requests=1000, cost_per_1k=1.0)
    obs.steps["score"] = {"m": RouteObservation(spans=1000, cost=0.5)}
    obs.steps["escalate"] = {"small": RouteObservation(spans=50, cost=0.2),
                             "large": RouteObservation(spans=50, cost=0.3)}
    obs.cascade_samples["escalate"] = [CascadeSample(i / 1000, None) for i in range(1000)]
    plan = Plan(changes={"escalate": {"cascade_threshold": 0.08}})
    plan._current["escalate"] = {"cascade_threshold": 0.1}
    assert _moved(plan, obs, SPEC) == {"escalate": pytest.approx(0.02)}  # confidences in [0.08, 0.1)
    calls = 0.05 * 0.004 ** 2 + 0.05 * 0.006 ** 2 - 0.1 * 0.005 ** 2  # the spread among the 100 calls
    assert obs.cost_spread(_moved(plan, obs, SPEC)) == pytest.approx((calls + 0.02 * 0.005 ** 2) ** 0.5)
    assert obs.cost_spread(_moved(plan, obs, SPEC)) < 0.55 * obs.cost_spread()
    # A plan that also changes the step whose confidences the cascade reads: its arms are compared as they are.
    plan.changes["score"] = {"cache_enabled": True}
    assert _moved(plan, obs, SPEC) is None


TIERS = PipelineSpec("tiers", {
    "rank": {"cache_enabled": Knob("bool", False)},
    "gen": {"cascade_threshold": Knob("float", 0.4, 0, 1),
            "route_weights": Knob("weights", {"cheap": 0.3, "dear": 0.7}), "cache_enabled": Knob("bool", True),
            "timeout_seconds": Knob("float", 10.0, 0.01, 600)},
}, {"p95_ms": 2000.0, "quality_floor": 0.8}, {"gen": "rank"})


def _tier_tasks(n: int, weights: dict[str, float], rng: np.random.Generator, threshold: float = 0.4):
    """`n` tasks of TIERS: rank on every task (0.0001 USD), gen on those rank is unsure of (confidence under
    `threshold`), on the tier a per-task draw picks under `weights` (0.0002 or 0.002 USD a call), 12% of its
    calls answered by the cache at no cost. (costs, draws, confidences, escalated, tiers, hits)."""
    from tracetune.base import routing

    u, confidence = rng.random(n), rng.random(n)
    escalated = confidence < threshold
    tiers = np.array(routing.picks(weights, u))
    hits = escalated & (rng.random(n) < 0.12)
    price = np.where(tiers == "cheap", 0.0002, 0.002)
    return 0.0001 + np.where(escalated & ~hits, price, 0.0), u, confidence, escalated, tiers, hits


def test_a_tier_move_is_judged_on_the_spread_left_once_the_tier_in_force_is_known():
    """The executor picks a task's tier by a draw fixed per task, and a canary's costs are adjusted for the tier
    the config in force takes: the spread among the tiers goes, and only the tasks the new weights send the
    other way, and the cache's hits, are left. The loop's estimate of that spread is the one the canary's cost test
    (`canary.Compared`) leaves on tasks drawn that way when it knows the config in force's tiers; knowing the
    canary's too, the test reads less, so the estimate is no smaller than what the canary reads."""
    from tracetune.base import routing
    from tracetune.tuner import canary
    from tracetune.tuner.config import PipelineConfig
    from tracetune.tuner.loop import _moved, _switched
    from tracetune.tuner.plan import Plan

    before, after = {"cheap": 0.3, "dear": 0.7}, {"cheap": 0.42, "dear": 0.58}
    assert routing.moves(before, after) == {("dear", "cheap"): pytest.approx(0.12)}
    rng, n = np.random.default_rng(11), 60_000
    base_costs, base_u, base_c, escalated, tiers, hits = _tier_tasks(n, before, rng)
    obs = Observation("tiers", 300.0, requests=n, cost_per_1k=1000 * base_costs.mean())
    obs.steps["rank"] = {"m": RouteObservation(spans=n, cost=0.0001 * n)}
    obs.steps["gen"] = {tier: RouteObservation(spans=int((escalated & (tiers == tier)).sum()),
                                               hits=int((hits & (tiers == tier)).sum()),
                                               cost=float((base_costs - 0.0001)[tiers == tier].sum()))
                        for tier in before}
    obs.cascade_samples["gen"] = [CascadeSample(c, None) for c in base_c[:5000]]
    plan = Plan(changes={"gen": {"route_weights": after}})
    plan._current["gen"] = {"route_weights": before}
    base_cfg = PipelineConfig("tiers", 1, {"gen": {"route_weights": before}})
    trial_cfg = PipelineConfig("tiers", 2, {"gen": {"route_weights": after}})
    also = PipelineConfig("tiers", 2, {"gen": {"route_weights": after}, "rank": {"cache_enabled": True}})
    same_costs, same_u, same_c, *_ = _tier_tasks(n, before, rng)
    trial_costs, trial_u, trial_c, *_ = _tier_tasks(n, after, rng)

    def spread_left(trial: PipelineConfig, costs: np.ndarray, u: np.ndarray, c: np.ndarray, both: bool = False
                    ) -> float:
        """The per-task spread of the difference `canary.Compared` reads, fitted on what the config in force fixes
        (`both`: and what the trial's does)."""
        columns = canary.both_covariates if both else canary.covariates
        x = columns(TIERS, base_cfg, trial, {"gen": np.concatenate([base_u, u])}, {"rank": np.concatenate([base_c, c])})
        arms = [canary.Arm.of(np.ones(n), arm, covariates=x[i * n:(i + 1) * n])
                for i, arm in enumerate((base_costs, costs))]
        return canary.Compared.of(*arms).per_task_spread()

    # The weights as they are, the tier known: what is left is whether a task escalates, and the cache's hits.
    assert obs.cost_spread(None, {"gen": {}}) == pytest.approx(spread_left(base_cfg, same_costs, same_u, same_c),
                                                               rel=0.05)
    # Escalation known too (a trial changing the cascade step alone, here its timeout): the cache's hits.
    timeout = PipelineConfig("tiers", 2, {"gen": {"route_weights": before, "timeout_seconds": 11.0}})
    assert obs.cost_spread({"gen": 0.0}, {"gen": {}}) == pytest.approx(
        spread_left(timeout, same_costs, same_u, same_c), rel=0.05)
    # And the 12% of escalations the move switches, counted as if every task of both arms could be: no less than
    # the adjustment leaves, a fifth more here (half the tasks on the canary).
    assert _switched(plan, TIERS) == {"gen": {("dear", "cheap"): pytest.approx(0.12)}}
    known = obs.cost_spread(_moved(plan, obs, TIERS), _switched(plan, TIERS))
    left = spread_left(trial_cfg, trial_costs, trial_u, trial_c)
    assert left < known < 1.25 * left
    assert spread_left(trial_cfg, trial_costs, trial_u, trial_c, both=True) < left  # what the canary's test reads
    assert known < obs.cost_spread(_moved(plan, obs, TIERS))  # the escalations alone known
    # A plan that also moves rank (whose confidences the cascade reads): the tier is known, the escalations not.
    plan.changes["rank"], plan._current["rank"] = {"cache_enabled": True}, {"cache_enabled": False}
    tier_only = obs.cost_spread(_moved(plan, obs, TIERS), _switched(plan, TIERS))
    assert _moved(plan, obs, TIERS) is None
    left = spread_left(also, trial_costs, trial_u, trial_c)
    assert left < tier_only < 1.25 * left
    assert known < tier_only < obs.cost_spread()
    # A route with no calls in the window has no cost to read: the spread as it is.
    plan.changes["gen"]["route_weights"] = {"cheap": 0.3, "dear": 0.5, "new": 0.2}
    assert obs.cost_spread(_moved(plan, obs, TIERS), _switched(plan, TIERS)) == pytest.approx(obs.cost_spread())


def test_a_cascades_local_route_is_priced_with_the_escalations_it_causes():
    plan = decide(QA, QA.defaults(), SLO_QA, _qa())
    # Per call small is 4x cheaper, but its answers escalate 6x as often to a tier costing 1000x a rank call.
    assert plan.changes["rank"]["route_weights"]["large"] == pytest.approx(0.75)


def test_a_cascade_at_its_providers_capacity_or_a_missed_p99_moves_as_far_as_the_models_allow():
    calm = decide(QA, QA.defaults(), SLO_QA, _qa())
    assert calm.violated == [] and calm.changes["rank"]["route_weights"]["large"] == pytest.approx(0.75)
    busy = decide(QA, QA.defaults(), SLO_QA, _qa(retried=20))  # 20 of 700 calls answered 429
    assert busy.changes["rank"]["route_weights"]["large"] == pytest.approx(1.0)
    slow = decide(QA, QA.defaults(), SLO_QA, _qa(p99=4500.0))
    assert slow.violated == ["p99"] and slow.changes["rank"]["route_weights"]["large"] == pytest.approx(1.0)


def test_a_cascades_samples_are_redrawn_for_the_local_mix_the_same_decision_sets():
    from tracetune.tuner.loop import _as_mixed
    from tracetune.tuner.plan import Plan

    samples = _qa().cascade_samples["gen"]
    plan = Plan()
    plan.changes["rank"] = {"route_weights": {"small": 0.25, "large": 0.75}}
    mixed = _as_mixed(samples, QA.defaults(), plan, "rank")
    assert sum(s.route == "large" for s in mixed) == 1000 and sum(s.route == "small" for s in mixed) == 333
    plan.changes["rank"] = {"route_weights": {"small": 0.0, "large": 1.0}}
    assert {s.route for s in _as_mixed(samples, QA.defaults(), plan, "rank")} == {"large"}
    assert _as_mixed(samples, QA.defaults(), Plan(), "rank") == samples  # no new mix: the samples as they are


def _tail(small: int) -> Observation:
    """p95 over its target because 40% of tasks escalate to tiers slower than it; rank's small route, as
    accurate as large and cheaper, served `small` of 2000 tasks (the only labelled answers it has): a
    threshold escalating 4% restores p95 and holds the floor on the labels of both routes."""
    rng = np.random.default_rng(2)
    obs = Observation("qa", 300.0, requests=2000, p95_ms=2600.0, p99_ms=3000.0, cost_per_1k=50.0, quality=0.95,
                      labelled=2000)
    large = 2000 - small
    obs.steps["rank"] = {"large": RouteObservation(spans=large, p95_ms=15.0, cost=0.0002 * large,
                                                   correct=int(0.93 * large), labelled=large),
                         "small": RouteObservation(spans=small, p95_ms=5.0, cost=0.00005 * small,
                                                   correct=int(0.93 * small), labelled=small)}
    obs.steps["gen"] = {"cheap": RouteObservation(spans=600, p95_ms=2400.0, cost=21.0, correct=570, labelled=600),
                        "dear": RouteObservation(spans=200, p95_ms=2900.0, cost=70.0, correct=195, labelled=200)}
    samples = []
    for route, n in (("large", large), ("small", small)):
        for i in range(n):
            confidence = rng.uniform(0.5, 1.0) if i % 25 else rng.uniform(0.0, 0.5)
            samples.append(CascadeSample(confidence, bool(rng.random() < (0.93 if confidence >= 0.5 else 0.5)),
                                         bool(rng.random() < 0.96) if confidence < 0.7 else None, route))
    obs.cascade_samples["gen"] = samples
    escalated = rng.uniform(2100, 3000, 800)
    obs.task_latency["gen"] = TaskLatencies(rng.uniform(50, 150, 1200), {"cheap": escalated[:600],
                                                                         "dear": escalated[600:]})
    return obs


def test_a_local_mix_that_would_leave_too_few_labels_to_restore_latency_waits_for_the_threshold_that_can():
    """Restoring a missed p95 comes first: rank's cheaper mix would leave the cascade only the 200 labelled
    answers of its small route, on which no threshold can be shown to hold the floor and restore p95; on the
    labels of the mix in force one can, so the threshold goes and the mix waits for a later decision."""
    plan = decide(QA, QA.defaults(), SLO_QA, _tail(200))
    assert plan.violated == ["p95"]
    assert "rank" not in plan.changes and plan.changes["gen"]["cascade_threshold"] < 0.7, plan.reasons
    assert plan.after["p95_ms"] <= 2000.0
    assert any(r.startswith("rank: route_weights waits for a later decision: on the labelled answers of the mix")
               for r in plan.reasons), plan.reasons
    # With labels enough on the new mix as well, both go in the one decision.
    both = decide(QA, QA.defaults(), SLO_QA, _tail(1000))
    assert "route_weights" in both.changes["rank"] and "cascade_threshold" in both.changes["gen"], both.reasons


def test_a_cache_resize_predicting_no_more_hits_is_not_tried():
    """A canary of a change with nothing to show could only run out of time while better moves wait."""
    on = SPEC.merge(SPEC.defaults(), {"score": {"cache_enabled": True, "cache_max_entries": 100_000}})
    obs = _observation(hashed=3000, distinct_inputs=900, hits=2100, misses=900)  # already hits every repeat
    plan = decide(SPEC, on, SLO_SHOP, obs)
    assert "score" not in plan.changes and any(r.startswith("score: cache size left as it is") for r in plan.reasons)
    # Turning a cache on, or a resize that predicts more hits, is still proposed.
    assert decide(SPEC, SPEC.defaults(), SLO_SHOP, obs).changes["score"]["cache_enabled"] is True


def test_a_cache_turned_on_is_priced_and_not_tried_alone_where_no_canary_could_show_its_saving():
    """Turning a cache on saves the calls it will answer: the plan says so, and a saving the canary's tasks
    could not show at this load and spread of per-task cost (calls of two very different prices) is not tried,
    as any other move that only saves cost; at a busier load it is."""
    from tracetune.tuner.loop import unprovable

    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)

    def obs(seconds: float) -> Observation:
        o = Observation("shop", seconds, requests=3000, p95_ms=120.0, cost_per_1k=1.0)
        o.steps["score"] = {"a": RouteObservation(spans=2700, p95_ms=40.0, cost=0.3, hashed=2700, misses=2700,
                                                  distinct_inputs=2430),  # 10% repeat
                            "b": RouteObservation(spans=300, p95_ms=40.0, cost=2.7, hashed=300, misses=300,
                                                  distinct_inputs=270)}
        return o

    busy = obs(30.0)
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, busy, settings)
    assert plan.changes["score"]["cache_enabled"] is True
    hits = plan.predicted.get("score.hit_ratio", plan.predicted.get("score.proposal.hit_ratio"))
    assert 0.05 < hits <= 0.1 and plan.after["cost_per_1k"] == pytest.approx(1.0 * (1 - hits))
    assert unprovable(plan, busy, settings, SPEC) == ""  # 3000 tasks in 30 s: shown in the canary's time
    quiet = obs(3000.0)  # the same tasks over 100 times as long
    assert unprovable(decide(SPEC, SPEC.defaults(), SLO_SHOP, quiet, settings), quiet, settings, SPEC).startswith(
        "saving too small to show")
    out = look(SPEC, SPEC.defaults(), SLO_SHOP, settings, 0.0, measure=lambda: quiet)
    assert out.plan is None and out.idle.startswith("saving too small to show"), out.idle


def test_a_batching_move_is_priced_by_compute_per_request_at_the_values_the_decision_sets():
    """A batched step's calls cost their share of a batch's compute: bigger batches are filed as the pipeline's
    saving, predicted for the values the decision sets (clamped half way, not the policy's best), so a saving no
    canary could show is "too small to show" instead of a canary that can only run its time out (a real triage
    run spent its last 5 minutes on one: -4% measured where about 98,000 canary tasks were needed)."""
    from tracetune.tuner.batching import BatchSample, fit_service_time, predict_batching
    from tracetune.tuner.loop import unprovable

    spec = PipelineSpec("feed", {"embed": {"batch_max_size": Knob("int", 4, 1, 64),
                                           "batch_max_wait_ms": Knob("float", 5.0, 0, 200, "ms")}, "llm": {}},
                        {"p95_ms": 2000.0})
    slo = SLO(pipeline="feed", p95_ms=2000.0)
    batches = [BatchSample(size, 20.0 + 4 * size) for size in (1, 2, 3, 4) for _ in range(10)]  # 20 ms a batch
    obs = Observation("feed", 60.0, requests=3000, p95_ms=100.0, cost_per_1k=1.0)  # 50 requests/s
    obs.steps["embed"] = {"a": RouteObservation(spans=3000, p95_ms=60.0, cost=3.0)}  # the whole cost
    obs.batches["embed"] = batches
    plan = decide(spec, spec.defaults(), slo, obs, LoopSettings())
    size, wait = plan.changes["embed"]["batch_max_size"], plan.changes["embed"]["batch_max_wait_ms"]
    assert "clamped" in next(r for r in plan.reasons if r.startswith("embed:"))
    model = fit_service_time(batches)
    now = predict_batching(model, 50.0, 4, 5.0)["compute_ms_per_request"]
    expected = predict_batching(model, 50.0, size, wait)["compute_ms_per_request"] / now
    assert expected < 0.99 and plan.after["cost_per_1k"] == pytest.approx(expected)
    best = plan.predicted["embed.proposal.compute_ms_per_request"] / now  # the policy's best, unclamped: 0.37
    assert best < 0.5 < expected
    # Beside a step of rare dear calls (half the cost), its -0.9% is too small for a canary to show.
    obs.cost_per_1k = 2.0
    obs.steps["llm"] = {"x": RouteObservation(spans=300, p95_ms=60.0, cost=3.0)}
    plan = decide(spec, spec.defaults(), slo, obs, LoopSettings())
    assert plan.after["cost_per_1k"] == pytest.approx(1.0 + expected)
    assert unprovable(plan, obs, LoopSettings(), spec).startswith("saving too small to show")


def test_a_plan_predicting_a_rise_of_cost_that_restores_nothing_is_not_tried():
    """`canary.judge` promotes a canary restoring no missed objective and buying no quality only on a saving
    shown: one predicted dearer could only run its time out. With no cost predicted (no model), it is tried."""
    from tracetune.tuner.loop import NO_SAVING, unprovable
    from tracetune.tuner.plan import Plan

    busy = Observation("shop", 30.0, requests=3000, p95_ms=120.0, cost_per_1k=1.0, quality=0.95, labelled=3000)
    plan = Plan(changes={"score": {"cache_enabled": True}})
    plan.before = {"cost_per_1k": 1.0, "quality": 0.95}
    plan.effects["score"] = {"cost_per_1k.delta": 0.1}
    said = unprovable(plan, busy, LoopSettings(), SPEC)
    assert said.startswith(NO_SAVING) and "+10.0% predicted" in said
    plan.violated = ["p95"]  # restoring a missed objective: tried whatever it costs
    assert unprovable(plan, busy, LoopSettings(), SPEC) == ""
    plan.violated, plan.effects["score"] = [], {}  # no cost predicted: not known, tried
    assert unprovable(plan, busy, LoopSettings(), SPEC) == ""


def test_moves_that_each_hold_the_floor_but_not_together_do_not_go_in_one_decision():
    """Two steps' moves, each costing a little quality within the floor, stack under it together: the one
    costing more waits, the other goes, and the reason says why; moves that together hold it all go; one
    step's moves that take it under wait too, and so do moves lowering a point estimate already under it."""
    from tracetune.tuner.loop import _hold_joint_floor
    from tracetune.tuner.plan import Part, Plan

    def plan(a: float, b: float) -> Plan:
        p = Plan(changes={"classify": {"route_weights": {"fp32": 0.3, "int8": 0.7}},
                          "escalate": {"cascade_threshold": 0.54}},
                 before={"quality": 0.940, "cost_per_1k": 0.004}, targets={"quality_floor": 0.93})
        p.effects = {"classify": {"quality.delta": a, "cost_per_1k.delta": -0.001},
                     "escalate": {"quality.delta": b, "cost_per_1k.delta": -0.0005}}
        p.parts = [Part("classify", ("route_weights",), -0.001, a),
                   Part("escalate", ("cascade_threshold",), -0.0005, b)]
        p.reasons = ["classify: cheaper mix", "escalate: lower threshold"]
        return p

    stacked = plan(-0.007, -0.006)  # 0.933 and 0.934 alone; 0.927 together
    _hold_joint_floor(stacked, 0.93)
    assert list(stacked.changes) == ["escalate"]
    assert stacked.after["quality"] == pytest.approx(0.934)
    assert any(r.startswith("classify: route_weights waits for a later decision") and "0.927" in r
               for r in stacked.reasons)
    holding = plan(-0.004, -0.005)  # 0.931 together: both go
    _hold_joint_floor(holding, 0.93)
    assert set(holding.changes) == {"classify", "escalate"}
    alone = plan(0.0, -0.02)  # one step's moves (e.g. a threshold and a tier mix) taking it to 0.920
    alone.changes.pop("classify")
    _hold_joint_floor(alone, 0.93)
    assert not alone.changes and any("cascade_threshold waits for a later decision: with its moves, quality "
                                     "0.920" in r for r in alone.reasons)
    under = plan(-0.007, 0.010)  # a point estimate under the floor: what lowers it waits, what raises it goes
    under.before["quality"] = 0.925
    _hold_joint_floor(under, 0.93)
    assert list(under.changes) == ["escalate"]


def test_stacked_moves_are_held_to_the_bound_of_their_sum_and_the_cheaper_mix_waits_before_the_restoring_one():
    """One step's threshold (restoring a missed p95) and tier mix, each holding the floor on its own lower bound:
    together their point estimate clears the floor but the bound of their sum does not, so the tier mix waits
    (a knob group, not the whole step) and the threshold, with its predicted p95, goes; a single move is judged
    on its policy's own bound."""
    from tracetune.tuner.loop import _hold_joint_floor
    from tracetune.tuner.plan import Part, Plan

    def plan(route_margin: float) -> Plan:
        p = Plan(changes={"escalate": {"cascade_threshold": 0.5, "route_weights": {"small": 0.7, "large": 0.3}}},
                 before={"quality": 0.95, "cost_per_1k": 0.5, "p95_ms": 2900.0}, violated=["p95"],
                 targets={"quality_floor": 0.88, "p95_ms": 2000.0})
        p.parts = [Part("escalate", ("cascade_threshold",), -0.2, -0.03, 0.04, 2200.0),
                   Part("escalate", ("route_weights",), -0.1, -0.02, route_margin)]
        p.effects = {"escalate": {"cost_per_1k.delta": -0.3, "quality.delta": -0.05, "p95_ms": 2200.0}}
        return p

    stacked = plan(0.02)  # 0.90 as predicted; its bound 0.90 - sqrt(0.04^2 + 0.02^2) = 0.855 < 0.88
    _hold_joint_floor(stacked, 0.88)
    assert stacked.changes == {"escalate": {"cascade_threshold": 0.5}}
    assert stacked.after == pytest.approx({"cost_per_1k": 0.3, "quality": 0.92, "p95_ms": 2200.0})
    assert any(r.startswith("escalate: route_weights waits for a later decision") and "(lower bound 0.855)" in r
               for r in stacked.reasons), stacked.reasons
    sure = plan(0.0)  # the tier mix's accuracy known exactly: 0.90 - 0.04 = 0.86 is still under: it waits all the same
    _hold_joint_floor(sure, 0.88)
    assert list(sure.changes["escalate"]) == ["cascade_threshold"]
    room = plan(0.02)
    room.before["quality"] = 0.99  # 0.94 - 0.045 = 0.895: both go
    _hold_joint_floor(room, 0.88)
    assert set(room.changes["escalate"]) == {"cascade_threshold", "route_weights"}


def test_moves_of_one_step_scale_its_cost_one_after_another_and_never_promise_more_than_all_of_it():
    """A tier mix saving 80% of a step's cost and a threshold saving 20% of it leave 16% of the step's cost,
    in whichever order they are filed (their sum would have predicted a negative cost); a move taken out
    again leaves what the other alone saves."""
    from tracetune.tuner.plan import Plan, combine_cost, pipeline_effect
    from tracetune.tuner.proposal import Proposal

    obs = Observation("shop", 300.0, requests=1000)
    mix = Proposal("escalate", {"route_weights": {"small": 1.0}}, "", {"cost_per_1k": 0.2, "cost_per_1k_before": 1.0,
                                                                      "escalation_share": 0.1})
    threshold = Proposal("escalate", {"cascade_threshold": 0.4}, "", {"cost_per_1k": 0.8, "cost_per_1k_before": 1.0,
                                                                      "escalation_share": 0.08})
    for order in ((mix, threshold), (threshold, mix)):
        plan = Plan(changes={"escalate": {"route_weights": {"small": 1.0}, "cascade_threshold": 0.4}},
                    before={"cost_per_1k": 1.0})
        parts = {id(p): pipeline_effect(plan, obs, p, share=1.0) for p in order}
        assert plan.after["cost_per_1k"] == pytest.approx(0.16)
        combine_cost(plan.effects["escalate"], parts[id(mix)], -1)
        assert plan.after["cost_per_1k"] == pytest.approx(0.8)


def test_decide_does_not_lower_a_quality_already_under_the_floor_on_too_few_labels_to_call_it_missed():
    obs = _observation()
    obs.steps["escalate"] = {"llm": RouteObservation(spans=600, cost=6.0, p95_ms=300.0)}
    # Right above confidence 0.45 locally, always remotely: a lower threshold is cheaper and costs quality.
    obs.cascade_samples["escalate"] = [CascadeSample(c / 100, c >= 45, True if c < 50 else None) for c in range(100)
                                       for _ in range(10)]
    obs.quality, obs.labelled = 0.79, 20  # under the 0.8 floor, on too few answers to be a missed objective
    plan = decide(SPEC, SPEC.defaults(), SLO_SHOP, obs, LoopSettings(max_relative_change=1.0))
    assert plan.violated == [] and "escalate" not in plan.changes
    assert any(r.startswith("escalate: cascade_threshold waits for a later decision") for r in plan.reasons), \
        plan.reasons
    obs.quality = 0.95  # well above it: the same cheaper threshold goes
    assert decide(SPEC, SPEC.defaults(), SLO_SHOP, obs, LoopSettings(max_relative_change=1.0)).changes["escalate"]


def test_loop_settings_take_their_defaults_and_values_from_the_settings(tmp_path):
    from tracetune.base import settings as settings_mod
    from tracetune.tuner import loop_settings

    defaults = settings_mod.load(config_file=tmp_path / "none.toml", environ={})
    assert loop_settings(defaults) == LoopSettings()
    chosen = settings_mod.load(config_file=tmp_path / "none.toml", environ={}, tuner_interval_seconds=7,
                               tuner_window_seconds=42, tuner_cooldown_seconds=9, tuner_min_requests=11,
                               cache_staleness_limit_seconds=13, tuner_canary_share=0.3,
                               tuner_canary_min_requests=17, tuner_canary_max_seconds=19,
                               tuner_approval_expiry_seconds=23, lease_seconds=29)
    assert loop_settings(chosen) == LoopSettings(
        interval_seconds=7, window_seconds=42, cooldown_seconds=9, min_requests=11, staleness_limit_seconds=13,
        canary_share=0.3, canary_min_requests=17, canary_max_seconds=19, approval_expiry_seconds=23,
        lease_seconds=29)


def test_moves_lowering_quality_wait_while_a_threshold_goes_up_for_a_floor_at_risk():
    """The threshold in force no longer holds the floor at its lower bound and goes up (quality first): a cheaper
    route mix that lowers quality waits, so the decision buys quality and is judged on doing so; without the
    floor at risk the two go together."""
    from tracetune.tuner.loop import _hold_at_risk
    from tracetune.tuner.plan import Part, Plan

    def plan(held: float) -> Plan:
        p = Plan(changes={"escalate": {"cascade_threshold": 0.65}, "score": {"route_weights": {"a": 1.0}}},
                 predicted={"escalate.floor_held_before": held}, before={"quality": 0.9, "cost_per_1k": 1.0})
        p.parts = [Part("escalate", ("cascade_threshold",), 0.1, 0.01), Part("score", ("route_weights",), -0.2, -0.005)]
        p.effects = {"escalate": {"cost_per_1k.delta": 0.1, "quality.delta": 0.01},
                     "score": {"cost_per_1k.delta": -0.2, "quality.delta": -0.005}}
        return p

    at_risk = plan(0.0)
    _hold_at_risk(at_risk)
    assert at_risk.changes == {"escalate": {"cascade_threshold": 0.65}}
    assert at_risk.after["quality"] == pytest.approx(0.91) and at_risk.figures()["moves.lowering_quality"] == 0.0
    assert any(r.startswith("score: route_weights waits for a later decision: it would lower quality while "
                            "escalate's threshold in force no longer holds the floor") for r in at_risk.reasons)
    safe = plan(1.0)
    _hold_at_risk(safe)
    assert set(safe.changes) == {"escalate", "score"} and safe.figures()["moves.lowering_quality"] == 1.0


def _labelled_task(rows: list, truth: list, i: int, start: int, route: str, confidence: float) -> None:
    trace, root = f"{i + 1:032x}", f"{3 * i + 1:016x}"
    rows.append(span_row(start, trace_id=trace, span_id=root, name="shop", kind="Server",
                         attrs={"tracetune.pipeline": "shop"}, duration=30_000_000, status="Unset"))
    rows.append(span_row(start + 1000, trace_id=trace, span_id=f"{3 * i + 2:016x}", parent=root, name="score",
                         attrs={"tracetune.pipeline": "shop", "tracetune.step": "score", "tracetune.route": route,
                                "tracetune.prediction": "yes" if confidence >= 0.3 else "no",
                                "tracetune.feature.confidence": f"{confidence:.4f}"},
                         duration=10_000_000, status="Unset"))
    if confidence < 0.5:
        rows.append(span_row(start + 2000, trace_id=trace, span_id=f"{3 * i + 3:016x}", parent=root, name="escalate",
                             attrs={"tracetune.pipeline": "shop", "tracetune.step": "escalate",
                                    "tracetune.route": "remote", "tracetune.prediction": "yes"},
                             duration=15_000_000, status="Unset"))
    truth.append(["shop", trace, "", "yes", "test"])


def test_collect_pools_the_cascades_labelled_answers_over_the_label_window_in_the_mix_of_the_window(shop):
    """Labelled answers from before the window count for the cascade, each local route's newest in the share it
    serves in the window (a route serving no longer is left out); the route figures and the pipeline's quality
    stay the window's."""
    now = time.time_ns()
    rows, truth = [], []
    i = 0
    for route, count in (("a", 300), ("b", 300), ("c", 100)):  # 10 to 5 minutes ago
        for k in range(count):
            _labelled_task(rows, truth, i, now - 600_000_000_000 + k * 1_000_000_000, route, (k % 100) / 100)
            i += 1
    for route, count in (("a", 20), ("b", 10)):  # in the last 30 s
        for k in range(count):
            _labelled_task(rows, truth, i, now - 30_000_000_000 + k * 1_000_000_000, route, (k % 10) / 10 + 0.05)
            i += 1
    shop.insert("otel_traces", rows, column_names=COLUMNS)
    shop.insert("tracetune_feedback", truth, column_names=["pipeline", "trace_id", "step", "label", "source"])

    alone = collect(shop, SPEC, 60)
    assert len([s for s in alone.cascade_samples["escalate"] if s.local_correct is not None]) == 30
    pooled = collect(shop, SPEC, 60, 3600)
    labelled = [s for s in pooled.cascade_samples["escalate"] if s.local_correct is not None]
    # a: 320 there, 20 now; b: 310 there, 10 now: b allows 31 per sample now, a only 16, so 16 each: 320 + 160.
    assert {r: sum(s.route == r for s in labelled) for r in "abc"} == {"a": 320, "b": 160, "c": 0}
    assert sum(s.remote_correct is not None for s in labelled) == sum(s.confidence < 0.5 for s in labelled) > 200
    assert pooled.labelled == alone.labelled == 30 and pooled.quality == alone.quality
    assert pooled.steps["score"]["a"].labelled == 20 and pooled.steps["score"]["b"].labelled == 10
    assert pooled.requests == 30


def test_pool_keeps_each_serving_routes_newest_in_the_windows_mix():
    from tracetune.tuner.observe import pool

    samples = [CascadeSample(i / 1000, True, route=r) for i, r in enumerate(["a", "b", "c"] * 100)]  # newest first
    kept = pool(samples, {"a": 10, "b": 5, "c": 0})
    assert [s.route for s in kept].count("a") == 100 and [s.route for s in kept].count("b") == 50
    assert all(s.route != "c" for s in kept)
    assert [s.confidence for s in kept if s.route == "b"] == [(3 * k + 1) / 1000 for k in range(50)]  # the newest
    assert pool(samples, {}) == []
    # Escalations: the newest in the window's tier mix keep their answers; a tier not serving now lends none.
    escalated = [CascadeSample(0.1, False, True, "a", "small") for _ in range(40)] + [
        CascadeSample(0.1, False, True, "a", "large") for _ in range(60)]  # the large tier served before
    kept = pool(escalated, {"a": 10}, {"small": 10})
    assert len(kept) == 100 and sum(s.remote_correct is not None for s in kept) == 40
    assert {s.tier for s in kept if s.remote_correct is None} == {""}
    both = pool(escalated, {"a": 10}, {"small": 5, "large": 5})  # 40 small allow 8 per sample now: 40 and 40
    assert [s.tier for s in both if s.remote_correct is not None].count("large") == 40


def test_a_move_paying_for_quality_waits_while_the_pipelines_quality_holds_its_floor_beyond_doubt():
    """A tier mix moving to the dearer tier because a step floor derived through bounds says so waits while the
    pipeline's quality holds the floor at its own lower bound; the cheaper move beside it goes. With the pipeline's
    quality near the floor (its bound under it) the quality move goes."""
    from tracetune.tuner.loop import _hold_unneeded_quality
    from tracetune.tuner.plan import Part, Plan

    def plan() -> Plan:
        p = Plan(changes={"gen": {"route_weights": {"small": 0.15, "large": 0.85}},
                          "rerank": {"route_weights": {"small": 0.75, "large": 0.25}}},
                 before={"quality": 0.92, "cost_per_1k": 0.15})
        p.parts = [Part("gen", ("route_weights",), 0.05, 0.01), Part("rerank", ("route_weights",), -0.01, -0.004)]
        p.effects = {"gen": {"cost_per_1k.delta": 0.05, "quality.delta": 0.01},
                     "rerank": {"cost_per_1k.delta": -0.01, "quality.delta": -0.004}}
        return p

    sure = plan()
    _hold_unneeded_quality(sure, Observation("c", 300.0, requests=700, quality=0.92, labelled=700), 0.88)
    assert list(sure.changes) == ["rerank"] and sure.after["cost_per_1k"] == pytest.approx(0.14)
    assert any(r.startswith("gen: route_weights left as it is: the move would pay +0.0500 USD per 1k for "
                            "quality, and the pipeline's quality 0.920 holds the 0.88 floor beyond doubt "
                            "(lower bound 0.901 on 700 labelled tasks)") for r in sure.reasons)
    near = plan()  # 0.895 on 700: the bound 0.874 is under the floor
    _hold_unneeded_quality(near, Observation("c", 300.0, requests=700, quality=0.895, labelled=700), 0.88)
    assert set(near.changes) == {"gen", "rerank"}
    unlabelled = plan()
    _hold_unneeded_quality(unlabelled, Observation("c", 300.0, requests=700), 0.88)
    assert set(unlabelled.changes) == {"gen", "rerank"}


def test_a_local_mix_saving_escalations_and_a_cheaper_tier_multiply_instead_of_adding_up():
    """A local route mix priced with the escalations it avoids (-0.003 of its -0.004) and a tier mix making each
    escalation 90% cheaper: the escalations it avoids would have cost a tenth, so the plan saves 0.0103 of
    0.012, not more than all of it (the sum said -0.013, shown as -100%)."""
    from tracetune.tuner.plan import Part, Plan, combine_cost

    def plan(chained: bool) -> Plan:
        p = Plan(changes={"classify": {"route_weights": {"fp32": 0.3, "int8": 0.7}},
                          "escalate": {"route_weights": {"small": 1.0, "large": 0.0}}},
                 before={"quality": 0.95, "cost_per_1k": 0.012})
        local = Part("classify", ("route_weights",), -0.004, -0.002, cost_before=0.002,
                     escalations=("escalate", -0.003) if chained else None)
        tier = Part("escalate", ("route_weights",), -0.009, 0.0, cost_before=0.010)
        p.parts = [local, tier]
        for part in p.parts:
            p.effects.setdefault(part.step, {})
            combine_cost(p.effects[part.step], part, +1)
        return p

    assert plan(False).after["cost_per_1k"] == pytest.approx(-0.001)
    together = plan(True)
    assert together.after["cost_per_1k"] == pytest.approx(0.0017)  # 0.001 local, 0.007 escalations at a tenth
    assert "-86%" in together.summary
    together.drop("escalate", "route_weights")  # without the tier's move, the mix's saving stands as priced
    assert together.after["cost_per_1k"] == pytest.approx(0.008)


def test_while_quality_is_missed_the_cascade_reads_the_windows_labels_not_the_hours_pool():
    """An hour of labels says threshold 0.7 holds the 0.85 floor; the window's, after the local model drifted, say
    it does not, and the window's quality misses the floor: the threshold goes up on the window's labels. Not
    missed, the pool decides (and holds)."""
    rng = np.random.default_rng(2)
    old = [CascadeSample(float(c), bool(rng.random() < c), bool(rng.random() < 0.97) if c < 0.7 else None,
                         recent=False) for c in rng.uniform(0, 1, 3000)]
    drifted = [CascadeSample(float(c), bool(rng.random() < c - 0.4), bool(rng.random() < 0.97) if c < 0.7 else None)
               for c in rng.uniform(0, 1, 600)]

    def obs(quality: float) -> Observation:
        o = Observation("c", 300.0, requests=600, p95_ms=800.0, cost_per_1k=1.0, quality=quality, labelled=600)
        o.cascade_samples["gen"] = drifted + old
        o.steps["local"] = {"": RouteObservation(spans=600, p95_ms=5.0)}
        o.steps["gen"] = {"": RouteObservation(spans=420, p95_ms=700.0, cost=0.42, correct=407, labelled=420)}
        return o

    config = CAS.merge(CAS.defaults(), {"gen": {"cascade_threshold": 0.7}})
    missed = decide(CAS, config, SLO_CAS, obs(0.78))
    assert missed.changes["gen"]["cascade_threshold"] > 0.7, missed.reasons
    assert "on 600 labelled tasks" in " ".join(missed.reasons)
    held = decide(CAS, config, SLO_CAS, obs(0.86))
    assert held.changes.get("gen", {}).get("cascade_threshold", 0.7) <= 0.7, held.reasons


def test_a_move_held_as_a_reversal_does_not_hold_back_the_move_it_was_stacked_with():
    """A simulated rag run (seed 3) moved generate's tiers to 0.9 large with a lower threshold; later the policies
    wanted both a little more small tier and a lower threshold, which together stack under the floor. The tier
    mix is a reversal on the same evidence and waits; the threshold, holding the floor alone, is not held back
    for it (before, the joint floor took the threshold out first and the decision changed nothing)."""
    from tracetune.tuner.loop import Move, _hold
    from tracetune.tuner.plan import Part, Plan

    weights = {"llm-small": 0.1, "llm-large": 0.9}
    plan = Plan(changes={"generate": {"cascade_threshold": 0.57,
                                      "route_weights": {"llm-small": 0.24, "llm-large": 0.76}}},
                before={"quality": 0.913, "cost_per_1k": 0.16}, targets={"quality_floor": 0.88},
                evidence={"rate": 2.0, "window_seconds": 300.0})
    plan.parts = [Part("generate", ("cascade_threshold",), -0.013, -0.012, 0.008),
                  Part("generate", ("route_weights",), -0.021, -0.012, 0.010)]
    plan.effects = {"generate": {"cost_per_1k.delta": -0.034, "quality.delta": -0.024}}
    plan._current = {"generate": {"cascade_threshold": 0.59, "route_weights": weights}}
    plan.reasons = ["generate: cheapest threshold", "generate: cheapest mix"]
    last = Move("generate", "route_weights", {"llm-small": 0.3, "llm-large": 0.7}, weights, 720.0,
                {"rate": 2.0, "window_seconds": 300.0})
    unlabelled = SimpleNamespace(quality=None, labelled=0)  # no quality evidence beyond the plan's own
    _hold(plan, unlabelled, 0.88, False, {("generate", "route_weights"): last}, 1800.0, LoopSettings())
    assert plan.changes == {"generate": {"cascade_threshold": 0.57}}, plan.reasons
    assert any(r.startswith("held generate.route_weights (moved 18 min ago") for r in plan.reasons), plan.reasons


def test_the_set_saving_the_most_is_the_other_rule_for_moves_stacked_under_the_floor():
    """A real rag run, 10 minutes in: threshold 0.70 -> 0.60 (-0.075 USD per 1k, quality 0.923 -> 0.899, its
    bound 0.886 over the 0.88 floor alone) and a tier mix moving 0.07 to the small tier (-0.019, -0.009) stack
    under the floor at their joint bound. The rule in force holds the move costing more quality, the threshold;
    the mix left was too small for a canary to show, and nothing changed for the rest of the run. The other
    rule (`look` asks for it then) keeps the set saving the most that holds the floor: the threshold."""
    from tracetune.tuner.loop import _hold_joint_floor
    from tracetune.tuner.plan import Part, Plan

    def plan() -> Plan:
        p = Plan(changes={"generate": {"cascade_threshold": 0.60,
                                       "route_weights": {"llm-small": 0.37, "llm-large": 0.63}}},
                 before={"quality": 0.923, "cost_per_1k": 0.209}, targets={"quality_floor": 0.88})
        p.parts = [Part("generate", ("cascade_threshold",), -0.075, -0.024, 0.013),
                   Part("generate", ("route_weights",), -0.019, -0.009, 0.020)]
        p.effects = {"generate": {"cost_per_1k.delta": -0.094, "quality.delta": -0.033}}
        return p

    least_quality = plan()
    _hold_joint_floor(least_quality, 0.88)
    assert list(least_quality.changes["generate"]) == ["route_weights"]
    most_saving = plan()
    _hold_joint_floor(most_saving, 0.88, most_saving=True)
    assert most_saving.changes == {"generate": {"cascade_threshold": 0.60}}
    assert most_saving.after["quality"] == pytest.approx(0.899)
    assert any(r.startswith("generate: route_weights waits for a later decision: with the other moves, quality "
                            "0.890 as predicted (lower bound 0.866)") for r in most_saving.reasons), most_saving.reasons
    both = plan()  # the two together over the floor: both go, either way
    both.parts[1].quality_margin = 0.001
    both.parts[0].quality_margin = 0.001
    _hold_joint_floor(both, 0.88, most_saving=True)
    assert set(both.changes["generate"]) == {"cascade_threshold", "route_weights"}


def test_a_cascades_local_routes_threshold_and_tiers_move_together_or_not_at_all():
    """rank's large route keeps more answers right, which lets gen escalate fewer tasks to a cheaper tier mix: one
    decision moves the three, each move's predicted effect its share of the whole. A hold that halves one of them
    (a reversal on new evidence) leaves the others predicted for a move that is not made: each step's own policy
    decides instead, and the decision says why."""
    from tracetune.tuner.loop import Move, evidence

    config = QA.merge(QA.defaults(), {"rank": {"route_weights": {"small": 0.5, "large": 0.5}}})
    plan = decide(QA, config, SLO_QA, _qa())
    assert plan.changes["rank"]["route_weights"]["large"] > 0.5 and "route_weights" in plan.changes["gen"]
    assert any("chosen together" in r for r in plan.reasons), plan.reasons
    assert plan.after["cost_per_1k"] < plan.before["cost_per_1k"]
    effects = plan.move_effects()
    assert effects["move.rank.route_weights.quality_delta"] > 0 > effects["move.gen.route_weights.quality_delta"]
    # Dropping the local move drops the moves chosen for it; dropping one of those leaves the local move, whose
    # effect was predicted at the cascade in force.
    plan.drop("rank", "route_weights")
    assert plan.changes == {}
    again = decide(QA, config, SLO_QA, _qa())
    again.drop("gen", "route_weights")
    assert "rank" in again.changes
    # Halved as a reversal on a new price: decided again without the move together.
    dearer = {**evidence(_qa(), SLO_QA, QA), "rank.small.unit_cost": 2.5e-8}
    last = Move("rank", "route_weights", {"small": 0.25, "large": 0.75}, {"small": 0.5, "large": 0.5}, 1000.0, dearer,
                cost_effect=-0.01)
    held = decide(QA, config, SLO_QA, _qa(), moves={("rank", "route_weights"): last}, now=1600.0)
    assert not any("chosen together:" in r for r in held.reasons)
    assert any("chosen together, but a hold took some of them out or changed them" in r for r in held.reasons)
    assert held.changes["rank"]["route_weights"]["large"] == pytest.approx(0.625)


def test_a_surer_local_route_that_pays_for_a_cheaper_tier_is_not_held_as_quality_the_pipeline_does_not_need():
    """The local move alone costs more and raises quality the pipeline does not need (its quality holds the
    floor beyond doubt), which alone would wait; chosen with the cheaper tier it pays for, the three cost less."""
    from tests.tuner.test_policies import _local_case

    samples, local, tiers = _local_case(small_right=0.7)
    spec = PipelineSpec("qa", QA.steps, {"p95_ms": 2000.0, "quality_floor": 0.8}, QA.cascades)
    slo = SLO(pipeline="qa", p95_ms=2000.0, quality_floor=0.8)
    obs = Observation("qa", 300.0, requests=2000, p95_ms=600.0, p99_ms=1500.0, cost_per_1k=0.3, quality=0.845,
                      labelled=2000)
    obs.steps["rank"] = {r.route: RouteObservation(spans=1000, p95_ms=5.0, cost=1000 * r.compute_cost_per_request,
                                                   correct=r.correct, labelled=r.labelled) for r in local}
    obs.steps["gen"] = {t.route: RouteObservation(spans=500, p95_ms=400.0, cost=500 * t.compute_cost_per_request,
                                                  correct=t.correct, labelled=t.labelled) for t in tiers}
    obs.cascade_samples["gen"] = samples
    config = spec.merge(spec.defaults(), {"rank": {"route_weights": {"small": 0.75, "large": 0.25}},
                                          "gen": {"cascade_threshold": 0.5,
                                                  "route_weights": {"cheap": 0.3, "dear": 0.7}}})
    plan = decide(spec, config, slo, obs, LoopSettings(max_traffic_shift=1.0, max_threshold_step=0.2))
    rank = next(p for p in plan.parts if p.step == "rank")
    assert rank.cost_delta > 0 and rank.quality_delta > 0  # alone, it pays for quality
    assert plan.changes["rank"]["route_weights"]["large"] > 0.25 and plan.changes["gen"]["route_weights"]["cheap"] > 0.3
    assert plan.after["cost_per_1k"] < plan.before["cost_per_1k"]


def test_a_rolled_back_local_move_leaves_the_cascades_own_moves_to_its_own_policies():
    """A canary that moved rank's mix toward the large route was rolled back for want of tasks: the next plan
    chosen together (that mix again, with gen's tiers) loses its local move, so gen's tiers, predicted with it,
    go too; the steps' own policies then decide, and gen's cheaper tier mix goes alone."""
    from tracetune.tuner.loop import Rejected

    settings = LoopSettings(min_requests=10, cooldown_seconds=300, window_seconds=300)
    first = look(QA, QA.defaults(), SLO_QA, settings, 0.0, measure=_qa).plan
    assert any("chosen together" in r for r in first.reasons)
    tried = {**QA.defaults().steps, "rank": {"route_weights": first.changes["rank"]["route_weights"]}}
    rejected = Rejected(0.0, 2, QA.defaults().steps, tried, frozenset(), first.move_effects())
    plan = look(QA, QA.defaults(), SLO_QA, settings, 600.0, measure=_qa, rejected=lambda: rejected).plan
    assert plan is not None and "rank" not in plan.changes and "route_weights" in plan.changes["gen"], plan
    assert not any("chosen together:" in r for r in plan.reasons)

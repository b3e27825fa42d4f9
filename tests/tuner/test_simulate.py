"""The simulator: deterministic, faithful to its calibration, and the four-arm comparison on the demo workload."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from tracetune.analyzer import SLO
from tracetune.demo import load, triage
from tracetune.tuner import calibration, simulate
from tracetune.tuner.batching import BatchSample, ServiceModel
from tracetune.tuner.config import PipelineSpec
from tracetune.tuner.observe import Observation, RouteObservation
from tracetune.tuner.policies import CascadeSample


class _Classifier:
    labels = ["billing", "login"]

    def predict(self, texts):
        return [("billing", 1.0) for _ in texts]

    def token_lengths(self, texts):
        return [1 for _ in texts]


class _Tier:
    def classifier(self, labels):
        return lambda text: labels[0]


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    """The demo's declaration (an Effect for follow-ups, two LLM tiers), without models or services."""
    return triage.build({v: _Classifier() for v in triage.VARIANTS}, llm={t: _Tier() for t in triage.LLM_TIERS},
                        crm_url="http://127.0.0.1:9").spec()


def workload(minutes: float, rate: float = 20.0, duplicates: float = 0.2, pattern: str = "step",
             seed: int = 1) -> simulate.Workload:
    plan = load.LoadPlan(rate=rate, duration=minutes * 60, pattern=pattern, duplicate_ratio=duplicates, seed=seed)
    return simulate.Workload(tuple(load.arrivals(plan, random.Random(seed))), minutes * 60, duplicates, seed=seed)


def static(config=None) -> simulate.Arm:
    return simulate.Arm("static", "static", config)


def test_same_seed_same_numbers_other_seed_other_numbers(spec):
    w = workload(6, rate=10)
    first = simulate.simulate(spec, calibration.DEMO, w, simulate.Arm("tuner", "tuner"))
    again = simulate.simulate(spec, calibration.DEMO, w, simulate.Arm("tuner", "tuner"))
    assert first == again
    other = simulate.simulate(spec, calibration.DEMO, workload(6, rate=10, seed=2), simulate.Arm("tuner", "tuner"))
    assert other["cost_per_1k"] != first["cost_per_1k"]


def test_escalation_share_and_quality_follow_the_confidence_tables(spec):
    """Escalations = share of confidences under the threshold; quality = right above it + tier accuracy below."""
    cal = calibration.DEMO
    only_fp32 = {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}, "cache_enabled": False},
                 "escalate": {"cascade_threshold": 0.7, "route_weights": {"llm-small": 1.0, "llm-large": 0.0}}}
    row = simulate.simulate(spec, cal, workload(20, rate=10, duplicates=0.0, pattern="steady"), static(only_fp32),
                            skip_seconds=0)
    route, tier = cal.routes["fp32"], cal.tiers["llm-small"]
    u = np.linspace(0, 1, 200_001)
    levels = np.linspace(0, 1, calibration.LEVELS)
    right = np.interp(u, levels, route.confidence_right)
    wrong = np.interp(u, levels, route.confidence_wrong)
    p_right_below, p_wrong_below = (right < 0.7).mean(), (wrong < 0.7).mean()
    escalated = route.accuracy * p_right_below + (1 - route.accuracy) * p_wrong_below
    quality = route.accuracy * (1 - p_right_below) + escalated * tier.accuracy
    sim = simulate.simulate(spec, cal, workload(20, rate=10, duplicates=0.0, pattern="steady"), static(only_fp32),
                            skip_seconds=0)
    assert sim == row
    per_call = row["cost_by_step"]["escalate"] / 1000
    price = (tier.input_tokens * 0.15 + tier.output_tokens * 0.60) / 1e6  # standin-small, analyzer/prices.toml
    assert per_call / price == pytest.approx(escalated, abs=0.01)
    assert row["quality"] == pytest.approx(quality, abs=0.01)


def test_a_tier_is_right_by_the_confidence_of_the_tasks_it_is_sent(spec):
    """A tier right 0.5 on tasks under 0.5 confidence and 0.98 above: the simulated quality at a threshold is each
    escalated task's own bin, not the tier's mean (the mean would overrate a low threshold's hard tasks)."""
    route = calibration.DEMO.routes["fp32"]
    tier = replace(calibration.DEMO.tiers["llm-small"], accuracy=0.9, by_confidence=((0.0, 0.5), (0.5, 0.98)))
    cal = replace(calibration.DEMO, tiers={**calibration.DEMO.tiers, "llm-small": tier})
    u = np.linspace(0, 1, 200_001)
    levels = np.linspace(0, 1, calibration.LEVELS)
    right, wrong = np.interp(u, levels, route.confidence_right), np.interp(u, levels, route.confidence_wrong)
    for threshold in (0.5, 0.8):
        config = {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}, "cache_enabled": False},
                  "escalate": {"cascade_threshold": threshold, "route_weights": {"llm-small": 1.0, "llm-large": 0.0}}}
        row = simulate.simulate(spec, cal, workload(20, rate=10, duplicates=0.0, pattern="steady"), static(config),
                                skip_seconds=0)

        def share(table, lo, hi):
            return ((table >= lo) & (table < hi)).mean()

        hard = route.accuracy * share(right, 0, 0.5) + (1 - route.accuracy) * share(wrong, 0, 0.5)
        easy = route.accuracy * share(right, 0.5, threshold) + (1 - route.accuracy) * share(wrong, 0.5, threshold)
        kept = route.accuracy * share(right, threshold, 2)
        assert row["quality"] == pytest.approx(kept + 0.5 * hard + 0.98 * easy, abs=0.01)
    assert tier.accuracy_at(0.49) == 0.5 and tier.accuracy_at(0.5) == 0.98
    assert calibration.DEMO.tiers["llm-small"].accuracy_at(0.1) == calibration.DEMO.tiers["llm-small"].accuracy


def test_cache_hits_follow_the_duplicate_ratio(spec):
    """One route, cache on: about every repeated input hits (a repeat of a ticket still in the batcher misses)."""
    one_route = {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}}}
    sim = simulate._Simulation(spec, calibration.DEMO, workload(10, rate=10, duplicates=0.3, pattern="steady"),
                               None, static(one_route), simulate.load_prices(), simulate.LoopSettings(), 5.0, 1)
    sim.run()
    cache = np.asarray(sim.model_spans.data["cache"])
    assert (cache == 0).mean() == pytest.approx(0.3, abs=0.03)
    off = simulate._Simulation(spec, calibration.DEMO, workload(10, rate=10, duplicates=0.3, pattern="steady"), None,
                               static({"classify": {**one_route["classify"], "cache_enabled": False}}),
                               simulate.load_prices(), simulate.LoopSettings(), 5.0, 1)
    off.run()
    assert set(off.model_spans.data["cache"]) == {2}  # bypass


def test_queueing_grows_near_saturation(spec):
    """A slow model route at 50% and at 95% of its capacity: the step's latency grows far faster than the load."""
    slow = replace(calibration.DEMO, routes={**calibration.DEMO.routes, "fp32": replace(
        calibration.DEMO.routes["fp32"], service=ServiceModel(20.0, 0.0), service_sigma=0.0)})
    config = {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}, "batch_max_size": 1, "cache_enabled": False},
              "escalate": {"cascade_threshold": 0.0}}
    p95 = {}
    for rate in (25, 47.5):  # capacity: 1 / 20 ms = 50 req/s
        sim = simulate._Simulation(spec, slow, workload(5, rate=rate, duplicates=0.0, pattern="steady"), None,
                                   static(config), simulate.load_prices(), simulate.LoopSettings(), 5.0, 1)
        sim.run()
        p95[rate] = float(np.quantile(sim.model_spans.data["duration"], 0.95))
    assert p95[25] < 80
    assert p95[47.5] > 4 * p95[25]


def test_rate_limits_show_as_retried_calls(spec):
    """Escalating everything to a tier limited to 2 req/s: 429s, retried, visible as `retried` in the window."""
    tight = replace(calibration.DEMO, tiers={**calibration.DEMO.tiers, "llm-large": replace(
        calibration.DEMO.tiers["llm-large"], rate_limit_rps=2.0)})
    config = {"escalate": {"cascade_threshold": 1.0, "route_weights": {"llm-small": 0.0, "llm-large": 1.0}}}
    sim = simulate._Simulation(spec, tight, workload(6, rate=5, duplicates=0.0, pattern="steady"), None, static(config),
                               simulate.load_prices(), simulate.LoopSettings(), 5.0, 1)
    sim.run()
    obs = sim.observe(360.0)
    large = obs.steps["escalate"]["llm-large"]
    assert large.retried > 0.3 * large.spans
    assert large.p95_ms > 1000  # a 429 costs a Retry-After of at least one second


def test_a_call_cut_by_its_timeout_is_billed_and_one_refused_with_429_is_not(spec):
    """Every task escalated to llm-large (about 700 ms, 5 req/s) at 10 req/s, with a 0.3 s timeout: a call the
    provider took and the client stopped waiting for still ran there and is billed, at the tier's price; one
    answered 429, with no time left to retry, ran nothing and costs nothing. Either way the local answer stands."""
    config = {"escalate": {"cascade_threshold": 1.0, "route_weights": {"llm-small": 0.0, "llm-large": 1.0},
                           "cache_enabled": False, "timeout_seconds": 0.3}}
    sim = simulate._Simulation(spec, calibration.DEMO, workload(3, rate=10, duplicates=0.0, pattern="steady"), None,
                               static(config), simulate.load_prices(), simulate.LoopSettings(), 5.0, 1)
    sim.run()
    spans = {k: np.asarray(v) for k, v in sim.cascade_spans.data.items()}
    failed = spans["error"].astype(bool)
    cut = failed & (spans["duration"] >= 299.0)  # waited until the timeout
    refused = failed & (spans["duration"] < 50.0)  # a 429's round trip, no retry fits in 0.3 s
    assert cut.sum() > 100 and refused.sum() > 100
    assert spans["cost"][cut] == pytest.approx(np.full(cut.sum(), sim.token_price["llm-large"]))
    assert sim.token_price["llm-large"] > 0 and not spans["cost"][refused].any()


def test_observation_reads_like_collect(spec):
    """The tuner arm's input: requests, per-route spans with costs and labels, batches, cascade samples, quality."""
    sim = simulate._Simulation(spec, calibration.DEMO, workload(8, rate=10), None, simulate.Arm("default"),
                               simulate.load_prices(), simulate.LoopSettings(label_window_seconds=300), 5.0, 1)
    sim.run()
    obs = sim.observe(480.0)
    assert obs.window_seconds == pytest.approx(300, abs=1)
    assert 5000 < obs.requests < 5800  # minutes 3-8: 10 req/s for one, then 20 req/s (the step at minute 4)
    classify = obs.steps["classify"]
    assert set(classify) == {"fp32", "int8"}
    assert sum(r.spans for r in classify.values()) == obs.requests
    assert all(r.labelled == r.spans and r.cost > 0 for r in classify.values())
    assert obs.batches["classify"] and all(b.size >= 1 for b in obs.batches["classify"])
    samples = obs.cascade_samples["escalate"]
    assert len(samples) == obs.requests
    escalated = sum(r.spans for r in obs.steps["escalate"].values())
    assert sum(s.confidence < 0.6 for s in samples) == pytest.approx(escalated, abs=5)
    latency = obs.task_latency["escalate"]  # every task: without the escalation, and by the tier it went to
    assert len(latency.local_ms) == obs.requests
    assert {tier: len(v) for tier, v in latency.escalated_ms.items()} == pytest.approx(
        {tier: r.spans for tier, r in obs.steps["escalate"].items()}, abs=5)
    assert min(map(min, latency.escalated_ms.values())) > min(latency.local_ms)
    assert obs.steps["create_followup"]["crm"].spans == pytest.approx(0.23 * obs.requests, rel=0.15)
    assert 0.9 < obs.quality < 1
    assert obs.cost_per_1k == pytest.approx(1000 * sum(r.cost for s in obs.steps.values() for r in s.values())
                                            / obs.requests)
    # Over an hour's label window, the cascade's samples are every task since the start in the window's route
    # mix (observe.pool); the rest stays the window's.
    sim.settings = replace(sim.settings, label_window_seconds=3600)
    pooled = sim.observe(480.0)
    assert (pooled.requests, pooled.quality) == (obs.requests, obs.quality)
    share = {r: sum(s.route == r for s in pooled.cascade_samples["escalate"]) / len(pooled.cascade_samples["escalate"])
             for r in classify}
    assert len(pooled.cascade_samples["escalate"]) > 1.15 * obs.requests  # of 7,001 tasks in all
    assert share == pytest.approx({r: classify[r].spans / obs.requests for r in classify}, abs=0.01)


def test_from_observation_fits_the_routes_it_sees(spec):
    obs = Observation("ticket_triage", 300.0, requests=1000)
    obs.steps["classify"] = {"fp32": RouteObservation(spans=800, correct=720, labelled=800)}
    obs.steps["escalate"] = {"llm-small": RouteObservation(spans=100, correct=80, labelled=100)}
    obs.steps["create_followup"] = {"crm": RouteObservation(spans=100)}
    obs.cascade_samples["escalate"] = [CascadeSample(0.9, True)] * 200 + [CascadeSample(0.3, False)] * 50
    batches = {("classify", "fp32"): [BatchSample(s, 2.0 + 3.0 * s) for s in (1, 2, 3, 4) for _ in range(10)]}
    latencies = {("escalate", "llm-small"): {"spans": 100, "p50_ms": 200.0, "p90_ms": 400.0, "input_tokens": 120,
                                             "output_tokens": 3, "model": "standin-small"},
                 ("create_followup", "crm"): {"spans": 100, "p50_ms": 30.0, "p90_ms": 45.0}}
    cal = calibration.from_observation(obs, spec, latencies, batches)
    fp32 = cal.routes["fp32"]
    assert (fp32.service.base_ms, fp32.service.per_item_ms) == pytest.approx((2.0, 3.0))
    assert fp32.accuracy == pytest.approx(0.9)
    assert fp32.confidence_wrong[0] == pytest.approx(0.3) and fp32.confidence_right[-1] == pytest.approx(0.9)
    assert cal.routes["int8"] == calibration.DEMO.routes["int8"]  # no spans: as it was
    small = cal.tiers["llm-small"]
    assert (small.median_ms, small.accuracy, small.input_tokens) == (200.0, 0.8, 120)
    assert small.sigma == pytest.approx(np.log(2) / 1.2816, rel=1e-3)
    assert cal.effect_share == pytest.approx(0.1) and cal.effect_median_ms == 30.0


def test_oracle_picks_the_cheapest_config_inside_the_slo(spec):
    w = workload(12, rate=10)
    grid = [{"escalate": {"cascade_threshold": t, "route_weights": {"llm-small": s, "llm-large": 1 - s}}}
            for t in (0.3, 0.5, 0.6) for s in (0.7, 1.0)]
    best, rows = simulate.oracle(spec, calibration.DEMO, w, grid=grid)
    slo = SLO(spec.pipeline, **spec.slo)
    feasible = [r for r in rows if r["slo_windows"] >= 0.99 and r["quality"] >= slo.quality_floor]
    assert best["feasible"] and best["cost_per_1k"] == min(r["cost_per_1k"] for r in feasible)
    assert len(feasible) < len(rows)  # threshold 0.3 escalates too little to hold the floor
    assert best["grid_config"]["escalate"]["cascade_threshold"] == 0.5


def test_every_arm_on_a_few_virtual_minutes(spec):
    """Small-scale and seeded (the 3-seed, two-pipeline comparison is bench/tuner.py's): on 12 minutes of the
    demo's load the tuner's first change goes through a canary and is promoted on a cost shown lower, the
    SLO holds in every window after warm-up, and the baselines run under the same workload."""
    slo = SLO(spec.pipeline, **spec.slo)
    w = workload(12)
    rows = {arm.name: simulate.simulate(spec, calibration.DEMO, w, arm, slo=slo)
            for arm in (simulate.Arm("default"), simulate.Arm("tuner", "tuner"), simulate.Arm("aimd", "aimd"))}
    default, tuner, aimd = rows["default"], rows["tuner"], rows["aimd"]
    kinds = [d["kind"] for d in tuner["decisions"]]
    assert kinds[:2] == ["canary_start", "canary_promote"] and tuner["canaries"]["promoted"] >= 1
    assert tuner["cost_per_1k_half"] < 0.7 * default["cost_per_1k_half"]
    assert tuner["slo_windows"] >= 0.99 and default["slo_windows"] >= 0.99
    assert tuner["quality_after"] >= slo.quality_floor
    # AIMD moves every numeric knob, not only batch size (which moves compute, about 1% of the cost)
    assert aimd["changes"] >= 1
    assert aimd["config"]["escalate"]["cascade_threshold"] != triage.CASCADE_THRESHOLD


def test_from_observation_fits_a_pipeline_of_another_shape():
    """rag_answering: two model steps (embed, rerank), plain steps, no side effect. Each reranker gets its own
    confidence tables (pooled, both would escalate alike), embed its own batch time, the plain steps their
    measured time, and the side effect's share is 0 (the base's is not carried over)."""
    from tracetune.demo import rag

    same = lambda items: items
    spec = rag.build(None, None, {r: same for r in rag.RERANKERS}, llm={t: same for t in rag.LLM_TIERS}).spec()
    base = replace(calibration.DEMO, routes={"rerank-small": calibration.DEMO.routes["int8"],
                                             "rerank-large": calibration.DEMO.routes["fp32"]},
                   models={"embed": {"fp32": calibration.DEMO.routes["fp32"]}})
    obs = Observation("rag_answering", 300.0, requests=1000)
    obs.steps["embed"] = {"fp32": RouteObservation(spans=800)}
    obs.steps["retrieve"] = {"": RouteObservation(spans=1000)}
    obs.steps["rerank"] = {"rerank-small": RouteObservation(spans=500, correct=300, labelled=500),
                           "rerank-large": RouteObservation(spans=500, correct=450, labelled=500)}
    obs.steps["generate"] = {"llm-large": RouteObservation(spans=300, correct=270, labelled=300)}
    obs.cascade_samples["generate"] = (
        [CascadeSample(0.5, True, route="rerank-small")] * 300 + [CascadeSample(0.2, False, route="rerank-small")] * 200
        + [CascadeSample(0.95, True, route="rerank-large")] * 450
        + [CascadeSample(0.6, False, route="rerank-large")] * 50)
    batches = {("embed", "fp32"): [BatchSample(s, 1.0 + 2.0 * s) for s in (1, 2, 4, 8) for _ in range(10)],
               ("rerank", "rerank-large"): [BatchSample(s, 5.0 + 10.0 * s) for s in (1, 2, 3, 4) for _ in range(10)]}
    latencies = {("retrieve", ""): {"spans": 1000, "p50_ms": 1.7, "p90_ms": 2.5},
                 ("generate", "llm-large"): {"spans": 300, "p50_ms": 900.0, "p90_ms": 1500.0, "input_tokens": 310,
                                             "output_tokens": 12, "model": "standin-large"}}
    cal = calibration.from_observation(obs, spec, latencies, batches, base)
    small, large = cal.routes["rerank-small"], cal.routes["rerank-large"]
    assert (small.accuracy, large.accuracy) == (0.6, 0.9)
    assert small.confidence_right[-1] == pytest.approx(0.5) and large.confidence_right[0] == pytest.approx(0.95)
    assert small.confidence_wrong[0] == pytest.approx(0.2) and large.confidence_wrong[0] == pytest.approx(0.6)
    assert (large.service.base_ms, large.service.per_item_ms) == pytest.approx((5.0, 10.0))
    embed = cal.models["embed"]["fp32"]
    assert (embed.service.base_ms, embed.service.per_item_ms) == pytest.approx((1.0, 2.0))
    assert cal.plain_ms["retrieve"] == 1.7 and cal.effect_share == 0.0
    tier = cal.tiers["llm-large"]
    assert (tier.median_ms, tier.accuracy, tier.input_tokens, tier.output_tokens) == (900.0, 0.9, 310, 12)


def test_from_answers_fits_routes_whose_steps_carry_no_labels():
    """Steps whose answers are not labels (rag's dicts) leave only final answers: each route's confidences are
    all kept (its escalation share at 0.9 is the real one), its accuracy where it stood is the real one, and
    each tier's accuracy is what its escalated tasks got right."""
    rng = np.random.default_rng(3)
    confidence = np.round(rng.beta(4, 2, 2000), 4)
    escalated = confidence < 0.9
    right = np.where(escalated, rng.random(2000) < 0.6, rng.random(2000) < 0.8)
    answers = [calibration.Answer("fp32", float(c), "llm-large" if e else "", bool(r))
               for c, e, r in zip(confidence, escalated, right, strict=True)]
    routes, tiers = calibration._from_answers(answers, dict(calibration.DEMO.routes), dict(calibration.DEMO.tiers))
    fp32 = routes["fp32"]
    levels = np.linspace(0, 1, calibration.LEVELS)
    below = (fp32.accuracy * np.interp(0.9, fp32.confidence_right, levels)
             + (1 - fp32.accuracy) * np.interp(0.9, fp32.confidence_wrong, levels))
    assert below == pytest.approx(escalated.mean(), abs=0.03)
    stood_right = 1 - np.interp(0.9, fp32.confidence_right, levels)
    stood_wrong = 1 - np.interp(0.9, fp32.confidence_wrong, levels)
    stood = fp32.accuracy * stood_right / (fp32.accuracy * stood_right + (1 - fp32.accuracy) * stood_wrong)
    assert stood == pytest.approx(right[~escalated].mean(), abs=0.05)  # 21-level tables: coarse in the tail
    assert tiers["llm-large"].accuracy == pytest.approx(right[escalated].mean(), abs=1e-3)
    assert routes["int8"] == calibration.DEMO.routes["int8"]  # no answers of its own: as it was


def test_a_tier_is_fitted_by_the_confidence_of_the_tasks_it_was_sent(spec):
    """The answers a tier gave, by the model step's confidence (right 0.55 under 0.5, 0.95 above): the fit keeps
    each band's own accuracy, so a lower threshold is not credited with the tier's mean; too few answers for two
    bins leave the mean alone."""
    rng = np.random.default_rng(4)
    confidence = np.round(rng.uniform(0.2, 0.9, 600), 4)
    right = np.where(confidence < 0.5, rng.random(600) < 0.55, rng.random(600) < 0.95)
    answers = [calibration.Answer("fp32", float(c), "llm-small", bool(r)) for c, r in zip(confidence, right,
                                                                                         strict=True)]
    obs = Observation(pipeline="support_triage", window_seconds=600, requests=600)
    cal = calibration.from_observation(obs, spec, {}, {}, calibration.DEMO, answers)
    small = cal.tiers["llm-small"]
    assert len(small.by_confidence) == 6 and small.by_confidence[0][0] == 0.0
    hard = [a for a in answers if a.confidence < 0.45]
    assert small.accuracy_at(0.3) == pytest.approx(np.mean([a.right for a in hard]), abs=0.08)
    assert small.accuracy_at(0.3) < 0.7 and small.accuracy_at(0.8) > 0.85
    assert small.accuracy_at(0.99) == small.by_confidence[-1][1]  # past what was escalated: the last band
    assert cal.tiers["llm-large"].by_confidence == ()  # no answers of its own
    few = calibration.from_observation(obs, spec, {}, {}, calibration.DEMO, answers[:70])
    assert few.tiers["llm-small"].by_confidence == ()
    with pytest.raises(ValueError, match="by_confidence"):
        replace(cal, tiers={"llm-small": replace(small, by_confidence=((0.5, 0.9), (0.1, 0.9)))}).validate()

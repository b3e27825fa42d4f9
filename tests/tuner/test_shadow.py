"""Shadow trials in the tuner: `judge` on constructed samples, and the loop's hook on a real store (start a trial
instead of a canary for a quality move, judge a running one from `tune_once`, remember a rejection)."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.spans import COLUMNS, span_row
from tests.tuner.test_decisions import tuner  # noqa: F401 - the fixture
from tests.tuner.test_loop import SPEC, _spans, shop  # noqa: F401 - shop is a fixture
from tracetune.analyzer import SLO
from tracetune.tuner import approval, canary, decisions, shadow, versions
from tracetune.tuner.config import Approval, Knob, PipelineSpec
from tracetune.tuner.loop import LoopSettings, tune_once
from tracetune.tuner.observe import collect
from tracetune.tuner.plan import Plan

FLOOR = SLO(pipeline="shop", p95_ms=500.0, quality_floor=0.9)


def _samples(n: int = 300, agree: float = 1.0, labelled: int = 0, shadow_wrong: int = 0, real_wrong: int = 0,
             cost: float = 0.001, real_cost: float = 0.001, ms: float = 20.0, seed: int = 1) -> shadow.Samples:
    rng = random.Random(seed)
    found = shadow.Samples()
    for _ in range(n):
        found.answers.append(("a", "a") if rng.random() < agree else ("b", "a"))
        found.ms.append((ms * (1 + rng.random()), 20.0 * (1 + rng.random())))
        found.costs.append((cost * rng.random() * 2, real_cost * rng.random() * 2))
    found.labelled = [(i >= shadow_wrong, i < shadow_wrong or i >= shadow_wrong + real_wrong) for i in range(labelled)]
    found.spent = sum(c for c, _ in found.costs)
    return found


def test_wilson_and_the_sign_test_give_the_textbook_numbers():
    low, high = shadow.wilson(90, 100)
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)  # Wilson 95% for 90/100
    # 12 of 15 discordant pairs against the shadow: P(X >= 12 | 15, 1/2) = (455 + 105 + 15 + 1) / 2^15.
    assert shadow.sign_test_p(12, 3) == pytest.approx(576 / 32768)
    assert shadow.sign_test_p(0, 0) == 1.0 and shadow.sign_test_p(0, 5) == 1.0


def test_a_shadow_waits_for_its_samples_and_is_rejected_when_time_or_the_cap_runs_out_first():
    few = _samples(n=50)
    assert shadow.judge(few, FLOOR, min_samples=200).action == "wait"
    expired = shadow.judge(few, FLOOR, min_samples=200, expired=True)
    assert expired.action == "reject" and "time ran out with 50 shadowed tasks" in expired.reason
    capped = shadow.judge(few, FLOOR, min_samples=200, capped=True)
    assert capped.action == "reject" and "cost cap was reached" in capped.reason


def test_a_shadow_no_worse_passes_with_its_comparison_in_words_and_figures():
    verdict = shadow.judge(_samples(agree=0.97, labelled=100, shadow_wrong=3, real_wrong=3), FLOOR, min_samples=200)
    assert verdict.action == "pass", verdict.reason
    assert verdict.reason.startswith("shadow passed: agrees on ")
    assert verdict.figures["shadow.samples"] == 300 and verdict.figures["shadow.labelled"] == 100
    assert verdict.figures["shadow.quality"] == verdict.figures["shadow.real_quality"] == 0.97
    assert {"shadow.agreement_lower", "shadow.steps_cost_per_1k", "shadow.real_steps_cost_per_1k",
            "shadow.steps_p95_ms", "shadow.real_steps_p95_ms"} <= set(verdict.figures)


def test_a_shadow_less_often_right_on_the_same_tasks_under_the_floor_is_rejected():
    # 100 labelled tasks: the shadow misses 12 the config in force got right (and gets none it missed).
    verdict = shadow.judge(_samples(agree=0.88, labelled=100, shadow_wrong=12), FLOOR, min_samples=200)
    assert verdict.action == "reject" and "less often right on the same tasks: 0.880 against 1.000" in verdict.reason
    assert verdict.figures["p.quality"] < 0.05
    # Above the floor, the same difference is allowed (the canary's rule: no worse than the floor needs).
    lenient = SLO(pipeline="shop", quality_floor=0.8)
    assert shadow.judge(_samples(agree=0.88, labelled=100, shadow_wrong=12), lenient, min_samples=200).action == "pass"
    # On too few labels it is no evidence; then agreement decides.
    few = shadow.judge(_samples(agree=0.88, labelled=20, shadow_wrong=12), FLOOR, min_samples=200)
    assert few.action == "pass" and "shadow.quality" not in few.figures


def test_without_labels_a_shadow_that_beyond_doubt_disagrees_is_rejected():
    verdict = shadow.judge(_samples(agree=0.6), FLOOR, min_samples=200)
    assert verdict.action == "reject" and "agrees with the config in force on" in verdict.reason
    assert shadow.judge(_samples(agree=0.85), FLOOR, min_samples=200).action == "pass"


def test_a_dearer_shadow_is_rejected_unless_it_restores_a_missed_objective():
    dearer = _samples(cost=0.002, real_cost=0.001)
    verdict = shadow.judge(dearer, FLOOR, min_samples=200)
    assert verdict.action == "reject" and "dearer" in verdict.reason and verdict.figures["p.dearer"] < 0.05
    assert shadow.judge(dearer, FLOOR, min_samples=200, restoring=True).action == "pass"
    assert shadow.judge(_samples(cost=0.001, real_cost=0.001), FLOOR, min_samples=200).action == "pass"


def test_a_shadow_whose_changed_steps_alone_pass_the_p95_target_is_rejected():
    verdict = shadow.judge(_samples(ms=400.0), FLOOR, min_samples=200)
    assert verdict.action == "reject" and "over the 500 ms target" in verdict.reason


# ---- the loop's hook, on a real store -------------------------------------------------------------------

SETTINGS = shadow.ShadowSettings(share=0.5, min_samples=50, max_seconds=600, cost_cap_usd_per_hour=2.0)


def _plan(threshold: float) -> Plan:
    return Plan(changes={"escalate": {"cascade_threshold": threshold}}, reasons=["escalate: a test move"],
                _current={"escalate": {"cascade_threshold": 0.5}})


def _shadow_runs(client, trial: shadow.Trial, n: int, shadow_right: float, real_right: float = 1.0) -> None:
    """`n` shadow runs of `trial` as an executor records them, each beside a labelled real task."""
    now = time.time_ns()
    rows, truth = [], []
    for i in range(n):
        real, own = f"{i + 1:032x}", f"{i + 1:08x}{'5' * 24}"
        right = i < shadow_right * n
        rows.append(span_row(now - 1_000_000 * (n - i), trace_id=own, span_id=f"{i + 1:016x}", name="shop shadow",
                             attrs={"tracetune.shadow": str(trial.trial), "tracetune.shadow_pipeline": "shop",
                                    "tracetune.shadow_of": real,
                                    "tracetune.shadow_answer": "yes" if right else "no",
                                    "tracetune.shadow_real_answer": "yes" if i < real_right * n else "no",
                                    "tracetune.shadow_ms": "12", "tracetune.shadow_real_ms": "10",
                                    "tracetune.shadow_cost_usd": "0.001", "tracetune.shadow_real_cost_usd": "0.001"},
                             duration=12_000_000))
        truth.append(["shop", real, "", "yes", "test"])
    client.insert("otel_traces", rows, column_names=COLUMNS)
    client.insert("tracetune_feedback", truth, column_names=["pipeline", "trace_id", "step", "label", "source"])


def test_a_quality_move_starts_a_shadow_instead_of_a_canary_and_is_served_beside_the_config(shop):  # noqa: F811
    config = versions.latest(shop, "shop")
    _spans(shop, 300, distinct=300)
    obs = collect(shop, SPEC, 300)
    handled, decision = shadow.before_trial(shop, SPEC, config, _plan(0.3), obs, LoopSettings(), datetime.now(UTC),
                                            settings=SETTINGS)
    assert handled and decision.kind == "shadow_start"
    assert decision.version_before == decision.version_after == config.version  # nothing served to users changed
    assert decision.config_after["steps"]["escalate"]["cascade_threshold"] == 0.3
    assert decision.reason.startswith("Shadowing on 50% of tasks before a canary (it changes "
                                      "escalate.cascade_threshold")
    trial = shadow.running(shop, "shop")
    served = shadow.served(shop, config)
    assert served["id"] == trial.trial and served["share"] == 0.5 and served["cost_cap_usd_per_hour"] == 2.0
    assert served["steps"] == {"escalate": {"cascade_threshold": 0.3}} and served["answer_step"] == "score"
    assert versions.latest(shop, "shop") == config
    decisions.set_state(shop, "shop", frozen=True, pinned=False, reason="hold on", author="test")
    assert shadow.served(shop, config) is None  # a freeze stops the shadow at once
    decisions.set_state(shop, "shop", frozen=False, pinned=False, reason="go on", author="test")
    assert shadow.served(shop, config)["id"] == trial.trial
    # A plan without a quality move is not the shadow's: the loop tries it as before.
    cache = Plan(changes={"score": {"cache_enabled": True}})
    shadow.finish(shop, trial, "cancelled", "test")
    assert shadow.before_trial(shop, SPEC, config, cache, obs, LoopSettings(), datetime.now(UTC),
                               settings=SETTINGS) == (False, None)
    # Nor with the share at 0 (the default): straight to the canary.
    assert shadow.before_trial(shop, SPEC, config, _plan(0.3), obs, LoopSettings(), datetime.now(UTC),
                               settings=shadow.ShadowSettings()) == (False, None)


def test_tune_once_judges_a_running_shadow_and_a_passing_one_goes_on_to_its_canary(shop):  # noqa: F811
    config = versions.latest(shop, "shop")
    _spans(shop, 400, distinct=100)  # enough tasks for a look; its own plan would turn the cache on
    obs = collect(shop, SPEC, 300)
    shadow.before_trial(shop, SPEC, config, _plan(0.3), obs, LoopSettings(), datetime.now(UTC), settings=SETTINGS)
    trial = shadow.running(shop, "shop")
    settings = LoopSettings(min_requests=100, cooldown_seconds=300, window_seconds=30, canary_share=0.2)
    assert tune_once(shop, "shop", settings) is None  # the shadow waits for its 50 runs; no canary meanwhile
    assert [d["kind"] for d in decisions.history(shop, "shop")][:1] == ["shadow_start"]
    _shadow_runs(shop, trial, 60, shadow_right=0.98, real_right=0.97)
    decision = tune_once(shop, "shop", settings)
    assert decision is not None and decision.kind == "canary_start", decision
    assert decision.reason.startswith("Trying on 20% of tasks after its shadow trial passed")
    assert decision.config_after["steps"]["escalate"]["cascade_threshold"] == 0.3  # the shadowed plan, not the cache
    passed = decisions.last_decision(shop, "shop", ("shadow_pass",))
    assert passed["observed"]["shadow.samples"] == 60 and passed["observed"]["shadow.labelled"] == 60
    figures = json.loads(passed["reason"].split("\n", 1)[1])
    assert figures["shadow_trial"] == trial.trial and figures["shadow.quality"] == pytest.approx(59 / 60)
    assert shadow.running(shop, "shop") is None


def test_in_approve_mode_a_passing_shadow_waits_as_a_proposal_instead_of_starting_its_canary(shop):  # noqa: F811
    config = versions.latest(shop, "shop")
    approval.set_policy(shop, SPEC, Approval(mode="approve"), "test", "launch week")
    _spans(shop, 400, distinct=100)
    obs = collect(shop, SPEC, 300)
    shadow.before_trial(shop, SPEC, config, _plan(0.3), obs, LoopSettings(), datetime.now(UTC), settings=SETTINGS)
    trial = shadow.running(shop, "shop")
    _shadow_runs(shop, trial, 60, shadow_right=0.98, real_right=0.97)
    settings = LoopSettings(min_requests=100, cooldown_seconds=300, window_seconds=30, canary_share=0.2)
    decision = tune_once(shop, "shop", settings)
    assert decision is not None and decision.kind == "proposal", decision  # the operator decides, with evidence
    assert [d["kind"] for d in decisions.history(shop, "shop")][:2] == ["proposal", "shadow_pass"]
    waiting = approval.proposals(shop, "shop", "pending")
    assert len(waiting) == 1 and waiting[0].changes == {"escalate": {"cascade_threshold": 0.3}}
    assert canary.running(shop, "shop") is None and versions.latest(shop, "shop") == config


def test_a_rejected_shadow_is_not_tried_again_the_same_way_within_the_hour(shop):  # noqa: F811
    config = versions.latest(shop, "shop")
    _spans(shop, 300, distinct=300)
    obs = collect(shop, SPEC, 300)
    shadow.before_trial(shop, SPEC, config, _plan(0.3), obs, LoopSettings(), datetime.now(UTC), settings=SETTINGS)
    trial = shadow.running(shop, "shop")
    _shadow_runs(shop, trial, 60, shadow_right=0.7)  # wrong on 18 tasks the config in force got right
    handled, decision = shadow.before_trial(shop, SPEC, config, None, None, LoopSettings(), datetime.now(UTC),
                                            settings=SETTINGS)
    assert handled and decision.kind == "shadow_reject"
    assert decision.reason.startswith("shadow rejected: less often right on the same tasks: 0.700 against 1.000")
    assert decision.config_before["steps"]["escalate"]["cascade_threshold"] == 0.3
    assert versions.latest(shop, "shop") == config and shadow.served(shop, config) is None
    # The same move again is left out (and the plan, empty now, tries nothing); the other way is shadowed.
    again = _plan(0.35)
    assert shadow.before_trial(shop, SPEC, config, again, obs, LoopSettings(), datetime.now(UTC),
                               settings=SETTINGS) == (True, None)
    assert not again.changes and "was rejected" in again.reasons[-1]
    later = datetime.now(UTC) + timedelta(hours=2)
    _, other = shadow.before_trial(shop, SPEC, config, _plan(0.7), obs, LoopSettings(), later, settings=SETTINGS)
    assert other.kind == "shadow_start"


def test_a_rejected_shadow_holds_back_only_the_knobs_it_changed_not_one_the_config_moved_since(client):
    tiers = PipelineSpec("tiers", {"escalate": {
        "cascade_threshold": Knob("float", 0.5, 0, 1),
        "route_weights": Knob("weights", {"small": 0.5, "large": 0.5})}}, {"quality_floor": 0.8}, {})
    base, _ = versions.register(client, tiers)
    # A shadow of threshold 0.5 -> 0.3 was rejected; its candidate (before) against the config in force (after).
    candidate = {**tiers.merge(base, {"escalate": {"cascade_threshold": 0.3}}).to_dict(), "version": base.version}
    decisions.record(client, decisions.Decision("tiers", "shadow_reject", base.version, base.version, candidate,
                                                base.to_dict(), "shadow rejected: a test"))
    # An operator moved the tiers since; a plan moving them back (and the threshold down again) comes next.
    moved = versions.change(client, tiers, {"escalate": {"route_weights": {"small": 0.8, "large": 0.2}}},
                            author="alice", reason="a hand change")
    plan = Plan(changes={"escalate": {"cascade_threshold": 0.35, "route_weights": {"small": 0.5, "large": 0.5}}},
                reasons=["escalate: a test move"],
                _current={"escalate": {"cascade_threshold": 0.5, "route_weights": {"small": 0.8, "large": 0.2}}})
    assert shadow._drop_rejected(client, tiers, moved, plan, datetime.now(UTC)) == ["escalate.cascade_threshold"]
    assert plan.changes == {"escalate": {"route_weights": {"small": 0.5, "large": 0.5}}}


def test_a_shadow_against_a_version_no_longer_in_force_is_cancelled(shop):  # noqa: F811
    config = versions.latest(shop, "shop")
    _spans(shop, 300, distinct=300)
    obs = collect(shop, SPEC, 300)
    shadow.before_trial(shop, SPEC, config, _plan(0.3), obs, LoopSettings(), datetime.now(UTC), settings=SETTINGS)
    changed = versions.change(shop, SPEC, {"escalate": {"max_concurrency": 4}}, author="test", reason="by hand")
    assert shadow.served(shop, changed) is None  # executors stop shadowing at once
    _, decision = shadow.before_trial(shop, SPEC, changed, None, None, LoopSettings(), datetime.now(UTC),
                                      settings=SETTINGS)
    assert decision.kind == "shadow_cancel" and shadow.running(shop, "shop") is None


def test_executors_are_served_the_shadow_beside_the_config_and_a_hand_change_ends_it(tuner):  # noqa: F811
    tuner.register()
    url = f"{tuner.url}/v1/pipelines/triage/config"
    before = httpx.get(url)
    assert before.json()["shadow"] is None
    base = versions.latest(tuner.client, "triage")
    trial = shadow.start(tuner.client, "triage", base, {"escalate": {"cascade_threshold": 0.3}}, 0.25,
                         {"answer_step": "classify", "unit_costs": {"escalate.llm": 0.0004}, "max_seconds": 600,
                          "cost_cap_usd_per_hour": 0.5}, "a test")
    served = httpx.get(url, headers={"If-None-Match": before.headers["etag"]})
    assert served.status_code == 200 and served.headers["etag"] == f'"triage-v1-s{trial.trial}"'
    body = served.json()
    assert body["version"] == 1 and body["steps"]["escalate"]["cascade_threshold"] == 0.45  # in force, unchanged
    assert body["canary"] is None
    assert {k: body["shadow"][k] for k in ("id", "base_version", "share", "steps", "answer_step", "unit_costs",
                                           "cost_cap_usd_per_hour")} == {
        "id": trial.trial, "base_version": 1, "share": 0.25, "steps": {"escalate": {"cascade_threshold": 0.3}},
        "answer_step": "classify", "unit_costs": {"escalate.llm": 0.0004}, "cost_cap_usd_per_hour": 0.5}
    assert body["shadow"]["until"] == pytest.approx(trial.started_at.timestamp() + 600)
    assert httpx.get(url, headers={"If-None-Match": served.headers["etag"]}).status_code == 304
    assert [p["version"] for p in httpx.get(f"{tuner.url}/v1/pipelines").json()] == [1]  # no version of its own

    changed = tuner.patch({"steps": {"classify": {"batch_max_size": 16}}, "reason": "by hand"})
    assert changed.status_code == 200
    after = httpx.get(url, headers={"If-None-Match": served.headers["etag"]})
    assert after.status_code == 200 and after.json()["shadow"] is None and after.headers["etag"] == '"triage-v2"'


def _cascade_spans(client, n: int = 600) -> None:
    """`n` labelled tasks of shop over the last 20 s: `score` sure and right above confidence 0.2, the cascade
    answering (right) below the 0.5 threshold; so the loop proposes escalating fewer tasks, a quality move."""
    rng = random.Random(3)
    now = time.time_ns()
    rows, truth = [], []
    for i in range(n):
        trace, root = f"{i + 1:032x}", f"{3 * i + 1:016x}"
        start = now - (n - i) * (20_000_000_000 // n)
        confidence = rng.random()
        rows.append(span_row(start, trace_id=trace, span_id=root, name="shop", kind="Server",
                             attrs={"tracetune.pipeline": "shop"}, duration=30_000_000, status="Unset"))
        rows.append(span_row(start + 1000, trace_id=trace, span_id=f"{3 * i + 2:016x}", parent=root, name="score",
                             attrs={"tracetune.pipeline": "shop", "tracetune.step": "score", "tracetune.route": "a",
                                    "tracetune.prediction": "yes" if confidence >= 0.2 else "no",
                                    "tracetune.feature.confidence": f"{confidence:.4f}"},
                             duration=10_000_000, status="Unset"))
        if confidence < 0.5:
            rows.append(span_row(start + 2000, trace_id=trace, span_id=f"{3 * i + 3:016x}", parent=root,
                                 name="escalate", attrs={"tracetune.pipeline": "shop", "tracetune.step": "escalate",
                                                         "tracetune.route": "remote", "tracetune.prediction": "yes"},
                                 duration=15_000_000, status="Unset"))
        truth.append(["shop", trace, "", "yes", "test"])
    client.insert("otel_traces", rows, column_names=COLUMNS)
    client.insert("tracetune_feedback", truth, column_names=["pipeline", "trace_id", "step", "label", "source"])


def test_tune_once_shadows_its_cascade_move_before_any_canary_when_shadows_are_on(shop):  # noqa: F811
    _cascade_spans(shop)
    settings = LoopSettings(min_requests=100, cooldown_seconds=0, window_seconds=30, canary_share=0.2)
    shadow.configure(SETTINGS)
    try:
        started = tune_once(shop, "shop", settings)
    finally:
        shadow.configure(shadow.ShadowSettings())
    assert started is not None and started.kind == "shadow_start", started
    assert "escalate.cascade_threshold" in started.reason and started.predicted["before.requests"] == 600
    trial = shadow.running(shop, "shop")
    assert trial.steps["escalate"]["cascade_threshold"] < 0.5 and trial.plan["answer_step"] == "score"
    assert versions.latest(shop, "shop").version == 1 and canary.running(shop, "shop") is None
    # Off (the default), the same plan goes to its canary as before.
    shadow.finish(shop, trial, "cancelled", "test")
    tried = tune_once(shop, "shop", settings)
    assert tried is not None and tried.kind == "canary_start"
    assert tried.config_after["steps"]["escalate"]["cascade_threshold"] == trial.steps["escalate"]["cascade_threshold"]

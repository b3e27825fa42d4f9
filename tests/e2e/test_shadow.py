"""Shadow trials with real processes: store, collector, tuner and the demo's executor as processes; the LLM and
CRM stand-ins as real HTTP servers in the test (an LLM that is always right and quick, so the config in force
answers the same inputs the same way twice).

The same tickets are sent twice, without and then with a shadow trial of a higher cascade threshold on every
task: the answers and what the CRM receives must be the same, while the shadow escalates tickets the config in
force keeps, records its own answers, and is judged (agreement, labelled quality, latency, cost) in the audit.
A second trial with a tiny cost cap stops shadowing once the cap is spent. No user figure counts shadow spans.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_settings
from tests.servers import ThreadServer, _ready, start_process, stop_process, wait_until
from tracetune import store
from tracetune.analyzer import (
    cost_per_1k,
    cost_per_request,
    feature_samples,
    latency,
    load_prices,
    pipelines,
    publish_prices,
    request_counts,
    step_stats,
)
from tracetune.demo.corpus import CATEGORIES, generate
from tracetune.demo.standins import classify_by_keywords, create_crm_app, create_llm_app
from tracetune.demo.triage import LLM_WEIGHTS
from tracetune.tuner import decisions, observe, shadow, versions
from tracetune.tuner.loop import LoopSettings
from tracetune.tuner.plan import Plan

PIPELINE = "ticket_triage"
N = 80

SHADOW_SPANS_SQL = """
SELECT count(), countIf(ParentSpanId = ''), sum(toUInt64OrZero(SpanAttributes['tracetune.llm.input_tokens']))
FROM otel_traces WHERE SpanAttributes['tracetune.shadow'] = {trial:String}
"""
ALL_ROOTS_SQL = "SELECT count() FROM otel_traces WHERE ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] != ''"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir) -> Iterator[dict]:
    """The processes and the in-test stand-ins; the tuner's loop is off (the test drives the shadow's hook)."""
    home = tmp_path_factory.mktemp("shadow")
    settings = make_settings(home / "home", collector_flush_seconds=0.2, executor_config_poll_seconds=0.3,
                             tuner_interval_seconds=0)
    shutil.copytree(models_dir, settings.models_dir)
    procs = {}
    with ThreadServer(create_llm_app(latency_ms=2, latency_sigma=0, accuracy=1.0, rate_limit_rps=0),
                      port=settings.llm_port), \
            ThreadServer(create_crm_app(latency_ms=1), port=settings.crm_port) as crm:
        try:
            for name, url in (("store", f"{settings.store_url}/ping"),
                              ("collector", f"{settings.collector_url}/health"),
                              ("tuner", f"{settings.tuner_url}/health"),
                              ("executor", f"{settings.executor_url}/health")):
                log = home / f"{name}.log"
                procs[name] = start_process([name], settings, log)
                wait_until(lambda url=url, proc=procs[name], log=log: _ready(url, proc, log), 90, 0.2, f"{name} ready")
            client = store.connect(settings, ensure_schema=False)
            publish_prices(client, load_prices())
            yield {"settings": settings, "client": client, "crm": crm.url, "logs": home}
        finally:
            for proc in reversed(list(procs.values())):
                stop_process(proc)


def _tickets() -> list[tuple[str, str]]:
    """Tickets the LLM stand-in reads the same way every time (it guesses at random on the rest)."""
    found = [(t.text, t.category) for t in generate(600, seed=11) if classify_by_keywords(t.text, CATEGORIES)]
    return found[:N]


def _send(settings, prefix: str, tickets: list[tuple[str, str]]) -> dict[str, dict]:
    headers = {"Authorization": f"Bearer {settings.secret('executor')}"}
    answers = {}
    with httpx.Client(timeout=30) as http:
        for i, (text, _) in enumerate(tickets):
            response = http.post(f"{settings.executor_url}/v1/pipelines/{PIPELINE}/tasks", headers=headers,
                                 json={"text": text, "task_id": f"{prefix}-{i}", "tenant": "acme"})
            assert response.status_code == 200, response.text
            answers[f"{prefix}-{i}"] = response.json()
    return answers


def _followups(crm: str, prefix: str) -> list[dict]:
    """What the CRM stored for the tasks of one batch, without the field that names the task."""
    stored = httpx.get(f"{crm}/v1/followups").json()["data"]
    mine = [f["data"] for f in stored if str(f["data"].get("task_id", "")).startswith(f"{prefix}-")]
    return sorted(({k: v for k, v in f.items() if k != "task_id"} for f in mine), key=repr)


def _metric(settings, name: str, **labels: str) -> float:
    text = httpx.get(f"{settings.executor_url}/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _start(client, changes: dict, **options) -> shadow.Trial:
    """Start a shadow trial of `changes` the way the loop's hook does, on the measured unit costs."""
    spec, config = versions.latest_spec(client, PIPELINE), versions.latest(client, PIPELINE)
    obs = observe.collect(client, spec, 600)
    current = {step: {knob: config.knob(step, knob) for knob in values} for step, values in changes.items()}
    plan = Plan(changes=changes, before=obs.summary(), reasons=[f"{step}: a test move" for step in changes],
                _current=current)
    handled, decision = shadow.before_trial(client, spec, config, plan, obs, LoopSettings(canary_share=0.2),
                                            datetime.now(UTC), settings=shadow.ShadowSettings(**options))
    assert handled and decision is not None and decision.kind == "shadow_start", decision
    return shadow.running(client, PIPELINE)


def _change(settings, steps: dict, reason: str) -> int:
    """Change the config in force by hand, as an operator does, and wait for the executor to run it: its version."""
    token = {"Authorization": f"Bearer {settings.secret('tuner')}"}
    changed = httpx.patch(f"{settings.tuner_url}/v1/pipelines/{PIPELINE}/config", headers=token,
                          json={"steps": steps, "reason": reason})
    assert changed.status_code == 200, changed.text
    version = changed.json()["version"]
    wait_until(lambda: httpx.get(f"{settings.executor_url}/health").json()["pipelines"][PIPELINE] == version,
               20, 0.1, "the executor on the new version")
    return version


def _applied(stack, trial: shadow.Trial) -> None:
    health = f"{stack['settings'].executor_url}/health"
    wait_until(lambda: httpx.get(health).json()["shadows"].get(PIPELINE) == trial.trial, 20, 0.1,
               "the executor on the shadow")


def _judge(client) -> decisions.Decision | None:
    spec, config = versions.latest_spec(client, PIPELINE), versions.latest(client, PIPELINE)
    return shadow.before_trial(client, spec, config, None, None, LoopSettings(canary_share=0.2), datetime.now(UTC))[1]


def test_a_shadow_trial_changes_no_answer_and_no_side_effect_and_records_its_comparison(stack):
    settings, client, crm = stack["settings"], stack["client"], stack["crm"]
    token = {"Authorization": f"Bearer {settings.secret('tuner')}"}
    tuner = f"{settings.tuner_url}/v1/pipelines/{PIPELINE}"
    wait_until(lambda: httpx.get(f"{tuner}/config").status_code == 200, 30, 0.2, "the demo declared")
    # One classifier route, so the config in force answers the same ticket the same way every time, and one LLM
    # tier, so an escalation costs the same on either side and the shadow is dearer by its extra escalations
    # alone (with two tiers drawn at random, the dearer tier's draws could hide them on 80 tasks).
    version = _change(settings, {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}, "cache_enabled": False},
                                 "escalate": {"route_weights": {"llm-small": 0.0, "llm-large": 1.0}}},
                      "one route for the test")
    tickets = _tickets()
    crm_calls = lambda: httpx.get(f"{crm}/stats").json()["requests"]
    calls_before = crm_calls()
    without = _send(settings, "a", tickets)
    calls_without = crm_calls() - calls_before
    escalated_without = sum(a["result"]["escalated"] for a in without.values())
    assert 0 < escalated_without < N  # the default threshold escalates some tickets, not all
    wait_until(lambda: observe.collect(client, versions.latest_spec(client, PIPELINE), 600).requests >= N, 30, 0.3,
               "the first batch in the store")

    trial = _start(client, {"escalate": {"cascade_threshold": 0.95}}, share=1.0, min_samples=N, max_seconds=600,
                   cost_cap_usd_per_hour=100.0)
    served = httpx.get(f"{tuner}/config").json()["shadow"]
    assert served["id"] == trial.trial and served["steps"] == {"escalate": {"cascade_threshold": 0.95}}
    assert served["unit_costs"]["escalate.llm-small"] > 0 and served["unit_costs"]["escalate.llm-large"] > 0
    _applied(stack, trial)
    calls_before = crm_calls()
    with_shadow = _send(settings, "b", tickets)

    # Every answer the user sees is the same, and the CRM received exactly what it did without the shadow.
    def seen(answers: dict[str, dict]) -> list[dict]:
        return [{k: v for k, v in a["result"].items() if k not in ("followup_id", "reply")} for a in answers.values()]
    assert seen(with_shadow) == seen(without)
    assert [bool(a["result"].get("followup_id")) for a in with_shadow.values()] == \
           [bool(a["result"].get("followup_id")) for a in without.values()]
    assert _followups(crm, "b") == _followups(crm, "a") and _followups(crm, "a")
    wait_until(lambda: shadow.samples(client, trial, "classify").n >= N, 30, 0.3, "the shadow runs in the store")
    assert crm_calls() - calls_before == calls_without  # not one call more, once every shadow run is done

    # The shadow ran on every task of the second batch, escalated more of them, and recorded what it answered.
    wait_until(lambda: shadow.samples(client, trial, "classify").n >= N, 30, 0.3, "the shadow runs in the store")
    found = shadow.samples(client, trial, "classify")
    assert (found.n, found.failed) == (N, 0)
    assert sum(real for _, real in found.costs) > 0 and found.spent > sum(real for _, real in found.costs)
    shadow_spans, shadow_roots, tokens = client.query(SHADOW_SPANS_SQL, parameters={"trial": str(trial.trial)}) \
        .result_rows[0]
    assert shadow_roots == N and shadow_spans > N and tokens > 0  # its own LLM calls, with their tokens

    # Labels for the second batch's tasks (the tickets' true categories), as users send them.
    labels = [{"trace_id": answer["trace_id"], "label": category}
              for answer, (_, category) in zip(with_shadow.values(), tickets, strict=True)]
    assert httpx.post(f"{tuner}/feedback", headers=token, json=labels).status_code == 200
    decision = _judge(client)
    assert decision is not None and decision.kind == "shadow_reject", (
        decision, [(r["kind"], r["reason"][:300], r["observed"]) for r in httpx.get(f"{tuner}/decisions").json()[:4]])
    assert decision.reason.startswith("shadow rejected: ") and "dearer" in decision.reason, decision.reason
    rows = httpx.get(f"{tuner}/decisions").json()
    judged = next(r for r in rows if r["kind"] == "shadow_reject")
    observed = judged["observed"]
    assert observed["shadow.samples"] == N and observed["shadow.labelled"] == N
    assert 0 < observed["shadow.agreement"] <= 1 and observed["shadow.quality"] >= observed["shadow.real_quality"]
    assert observed["shadow.steps_cost_per_1k"] > observed["shadow.real_steps_cost_per_1k"]
    assert observed["shadow.cost_usd"] > 0
    assert '"shadow.agreement"' in judged["reason"]  # the comparison in words and as JSON
    assert any(r["kind"] == "shadow_start" for r in rows)
    assert httpx.get(f"{tuner}/config").json()["shadow"] is None  # a rejected trial is no longer served
    assert versions.latest(client, PIPELINE).version == version  # nor did it change the config in force

    # No user figure counts the shadow: tasks, per-step spans (escalations), cost per task, SLO request counts.
    wait_until(lambda: client.query(ALL_ROOTS_SQL).result_rows[0][0] >= 2 * N, 20, 0.3, "both batches stored")
    escalated = escalated_without + sum(a["result"]["escalated"] for a in with_shadow.values())
    roots = latency(client, 600, by=("pipeline",), pipeline=PIPELINE, steps="roots", source="raw")
    assert roots["requests"].to_list() == [2 * N]
    for source in ("raw", "rollup"):
        stats = step_stats(client, 600, pipeline=PIPELINE, source=source)
        counts = dict(zip(stats["step"].to_list(), stats["requests"].to_list(), strict=True))
        assert counts["escalate"] == escalated and counts["classify"] == 2 * N, (source, counts)
    assert cost_per_request(client, 600, pipeline=PIPELINE).height == 2 * N
    per_task = cost_per_1k(client, 600, pipeline=PIPELINE)["requests"].to_list()
    assert per_task == [2 * N]
    assert pipelines(client, 600) == [PIPELINE]
    counted = request_counts(client, PIPELINE, [600], source="raw")
    assert counted["total"].to_list() == [2 * N]
    now = datetime.now(UTC)  # drift reads the escalated answers of users' tasks only
    drift = feature_samples(client, PIPELINE, "escalate", "category",
                            (now - timedelta(hours=2), now - timedelta(hours=1)),
                            (now - timedelta(minutes=30), now + timedelta(minutes=1)))
    assert len(drift["current"]) == escalated


def test_the_shadow_cost_cap_holds(stack):
    settings, client = stack["settings"], stack["client"]
    # Both tiers in force (the module's first test leaves the large one alone), so the trial below moves them.
    _change(settings, {"escalate": {"route_weights": LLM_WEIGHTS}}, "both tiers for the test")
    spec = versions.latest_spec(client, PIPELINE)
    # The cap is priced from the large tier's calls measured in the window (a tier with none measured is priced
    # as its step's dearest measured one, the small tier here): the module's first test makes some, but this test
    # may run first or on an xdist worker (and stack) of its own, so it sends tickets until one is measured.
    def large_measured() -> bool:
        route = observe.collect(client, spec, 600).steps.get("escalate", {}).get("llm-large")
        return route is not None and route.cost > 0
    for batch in range(5):
        if large_measured():
            break
        _send(settings, f"warm{batch}", _tickets())
        with contextlib.suppress(AssertionError):
            wait_until(large_measured, 10, 0.5, "a call to the large tier measured")
    assert large_measured()
    unit = shadow.unit_costs(spec, observe.collect(client, spec, 600))["escalate.llm-large"]
    cap = 1.5 * unit  # two escalations to the large tier an hour
    # Every escalation to the dearer tier: the shadow runs escalate for the tickets the config in force escalates.
    trial = _start(client, {"escalate": {"route_weights": {"llm-small": 0.0, "llm-large": 1.0}}}, share=1.0,
                   min_samples=N, max_seconds=600, cost_cap_usd_per_hour=cap)
    outcomes = lambda: {outcome: _metric(settings, "tracetune_shadow_tasks_total", pipeline=PIPELINE, outcome=outcome)
                        for outcome in ("ran", "failed", "capped", "busy", "expired")}
    before = outcomes()
    _applied(stack, trial)
    answers = _send(settings, "c", _tickets())
    assert sum(a["result"]["escalated"] for a in answers.values()) > 2  # more escalations than the cap pays for
    done = lambda: {k: v - before[k] for k, v in outcomes().items()}
    wait_until(lambda: sum(done().values()) == N, 30, 0.2, "every sampled task shadowed or skipped")
    ran = done()["ran"]
    wait_until(lambda: shadow.samples(client, trial).n == ran, 20, 0.3, "the shadow runs in the store")
    found = shadow.samples(client, trial)
    assert cap <= found.spent <= cap + unit  # the run that crossed the cap is the only one past it
    assert done()["capped"] > 0 and found.n < N  # then it stopped shadowing
    assert _metric(settings, "tracetune_shadow_cost_usd_total", pipeline=PIPELINE) >= found.spent - 1e-12
    # The tuner sees the cap spent too and ends the trial on what it has: too few tasks for a verdict.
    decision = _judge(client)
    assert decision is not None and decision.kind == "shadow_reject", decision
    assert "cost cap was reached" in decision.reason

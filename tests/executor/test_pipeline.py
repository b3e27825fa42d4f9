"""The ticket-triage demo pipeline (built on the public runtime) on real ONNX models, with the LLM and
CRM stand-ins as real servers: spans and attributes, routing, the confidence cascade, safe side
effects, live config changes from the tuner."""

from __future__ import annotations

import random
import threading

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.servers import ThreadServer, wait_until
from tracetune import store
from tracetune.base import routing
from tracetune.demo import triage
from tracetune.demo.corpus import generate
from tracetune.demo.models import TicketClassifier
from tracetune.demo.standins import create_crm_app, create_llm_app
from tracetune.executor import ChatClient, DeadLetters, RetryPolicy, StepError
from tracetune.executor.tuning import ConfigPoller
from tracetune.tuner.api import create_app


@pytest.fixture(scope="module")
def classifiers(models_dir):
    return {v: TicketClassifier(models_dir, variant=v) for v in ("fp32", "int8")}


@pytest.fixture(scope="module")
def remote():
    """The stand-in LLM (fast, accurate, generous rate limit) and a CRM that fails each key's first call."""
    with ThreadServer(create_llm_app(latency_ms=5, accuracy=1.0, rate_limit_rps=1000)) as llm, \
            ThreadServer(create_crm_app(fail_first=1, latency_ms=1)) as crm:
        yield llm.url, crm.url


def make_pipeline(classifiers, remote, dead_letters=None, crm_url=None, seed=0):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    llm_url, default_crm = remote
    llm = {route: ChatClient(llm_url + "/v1", model, policy=RetryPolicy(max_attempts=3, base_delay=0.01))
           for route, model in (("llm-small", "standin-small"), ("llm-large", "standin-large"))}
    pipeline = triage.build(classifiers, llm=llm, crm_url=crm_url or default_crm, dead_letters=dead_letters,
                            policy=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05), seed=seed,
                            tracer=provider.get_tracer("test"))
    return pipeline, exporter


def with_config(pipeline, **steps):
    """Apply knob values by step and knob name, as a new version from the tuner would."""
    spec = pipeline.spec()
    config = spec.merge(pipeline.config, steps)
    pipeline.apply_config(config)
    return config


NO_ESCALATION = {"cascade_threshold": 0.0}


def test_a_task_is_one_root_span_with_a_child_span_per_step(classifiers, remote):
    pipeline, exporter = make_pipeline(classifiers, remote)
    with_config(pipeline, escalate=NO_ESCALATION)  # no escalation in this test
    task = pipeline.run("I was charged twice for my pro subscription, urgent", tenant="acme", task_id="t-1")
    answer = pipeline.result(task)
    assert answer["category"] == "billing" and answer["priority"] == "P1" and answer["followup_id"]
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "ticket_triage")
    steps = [s for s in spans if s.attributes.get("tracetune.step")]
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time)] == \
        ["normalize", "classify", "prioritize", "create_followup", "draft_reply"]
    assert all(s.parent.span_id == root.context.span_id for s in steps)
    assert root.attributes["tracetune.pipeline"] == "ticket_triage" and root.attributes["tracetune.tenant"] == "acme"
    assert root.attributes["tracetune.config_version"] == 1
    assert task.trace_id == f"{root.context.trace_id:032x}"
    classify = next(s for s in steps if s.name == "classify")
    assert classify.attributes["tracetune.route"] in ("fp32", "int8")
    assert classify.attributes["tracetune.cache"] == "miss"
    assert classify.attributes["tracetune.batch_size"] == 1 and classify.attributes["tracetune.queue_ms"] >= 0
    batch = next(s for s in spans if s.name.startswith("batch classify"))
    assert [link.context.span_id for link in batch.links] == [classify.context.span_id]
    assert batch.attributes["tracetune.batch_of"] == "classify"
    assert batch.attributes["tracetune.route"] == classify.attributes["tracetune.route"]
    followup = next(s for s in steps if s.name == "create_followup")
    assert followup.attributes["tracetune.retries"] == 1  # the CRM stand-in failed the first attempt
    assert followup.attributes["tracetune.idempotency_key"]

    exporter.clear()
    # The same task again (a client retry): the CRM returns the same follow-up instead of a second one.
    again = pipeline.run("I was charged twice for my pro subscription, urgent", tenant="acme", task_id="t-1")
    assert pipeline.result(again)["followup_id"] == answer["followup_id"]
    # The cache is per route and keyed on normalised text: a hit whenever the same route comes up again.
    with_config(pipeline, classify={"route_weights": {classify.attributes["tracetune.route"]: 1.0}})
    exporter.clear()
    pipeline.run("I WAS charged twice for my pro   subscription, urgent")
    hit = next(s for s in exporter.get_finished_spans() if s.name == "classify")
    assert hit.attributes["tracetune.cache"] == "hit" and "tracetune.batch_size" not in hit.attributes
    pipeline.close()


def test_bad_input_fails_its_step_with_an_error_status(classifiers, remote):
    pipeline, exporter = make_pipeline(classifiers, remote)
    with pytest.raises(StepError, match="empty ticket") as failure:
        pipeline.run("   ")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["normalize"].status.status_code == StatusCode.ERROR
    assert spans["ticket_triage"].status.status_code == StatusCode.ERROR
    assert failure.value.trace_id == f"{spans['ticket_triage'].context.trace_id:032x}"
    assert "classify" not in spans
    pipeline.close()


def test_route_weights_are_respected_statistically(classifiers, remote):
    pipeline, exporter = make_pipeline(classifiers, remote, seed=11)
    with_config(pipeline, classify={"route_weights": {"fp32": 0.3, "int8": 0.7}, "cache_enabled": False},
                escalate=NO_ESCALATION)
    n = 250  # the draws' uniformity is tested over 20,000 in tests/tracetune/test_routing.py; here, routes follow them
    for ticket in generate(n, seed=21):
        pipeline.run(ticket.text)
    spans = [s for s in exporter.get_finished_spans() if s.name == "classify"]
    routes = [s.attributes["tracetune.route"] for s in spans]
    share = routes.count("int8") / n
    sigma = (0.7 * 0.3 / n) ** 0.5
    assert abs(share - 0.7) < 4 * sigma, share  # a binomial 4-sigma band: fails ~1 in 15,000 runs
    # Each task's route is its draw at the step against the weights (no task id: from its root span, the step's
    # parent), what a canary's covariates read.
    weights = {"fp32": 0.3, "int8": 0.7}
    assert routes == [routing.pick(weights, routing.draw(routing.key("", f"{s.context.trace_id:032x}",
                                                                      f"{s.parent.span_id:016x}"), "classify"))
                      for s in spans]
    with_config(pipeline, classify={"route_weights": {"fp32": 1.0, "int8": 0.0}})
    exporter.clear()
    for ticket in generate(50, seed=22):
        pipeline.run(ticket.text)
    assert {s.attributes["tracetune.route"] for s in exporter.get_finished_spans() if s.name == "classify"} == {"fp32"}
    pipeline.close()


def test_cascade_escalates_exactly_the_tickets_below_the_threshold(classifiers, remote):
    pipeline, exporter = make_pipeline(classifiers, remote)
    threshold = 0.8
    with_config(pipeline, escalate={"cascade_threshold": threshold}, classify={"cache_enabled": False})
    tasks = [pipeline.run(t.text) for t in generate(150, seed=31, typo_rate=0.1)]
    spans = exporter.get_finished_spans()
    escalated_traces = {s.context.trace_id for s in spans if s.name == "escalate"}
    for task in tasks:
        below = task.confidence["classify"] < threshold
        assert pipeline.result(task)["escalated"] == below
        assert (int(task.trace_id, 16) in escalated_traces) == below
    assert 0 < len(escalated_traces) < len(tasks)  # the threshold splits this set
    escalate = next(s for s in spans if s.name == "escalate")
    tiers = {"llm-small": "standin-small", "llm-large": "standin-large"}
    assert tiers[escalate.attributes["tracetune.route"]] == escalate.attributes["gen_ai.request.model"]
    assert escalate.attributes["tracetune.llm.input_tokens"] > 0
    assert "gen_ai.usage.input_tokens" not in escalate.attributes  # on the call's CLIENT span alone
    [call] = [s for s in spans if s.parent is not None and s.parent.span_id == escalate.context.span_id]
    assert (call.name, call.kind.name) == (f"chat {escalate.attributes['gen_ai.request.model']}", "CLIENT")
    assert call.attributes["gen_ai.usage.input_tokens"] == escalate.attributes["tracetune.llm.input_tokens"]
    pipeline.close()


def test_followup_that_exhausts_retries_fails_the_task_and_is_dead_lettered(classifiers, remote, db_settings):
    with ThreadServer(create_crm_app(failure_rate=1.0, latency_ms=1)) as broken:
        letters = DeadLetters(lambda: store.connect(db_settings, ensure_schema=False))
        pipeline, exporter = make_pipeline(classifiers, remote, dead_letters=letters, crm_url=broken.url)
        with pytest.raises(StepError, match="dead-lettered"):
            pipeline.run("urgent: my account is locked after too many login attempts", task_id="task-dead-1")
        pipeline.close()
    client = store.connect(db_settings, ensure_schema=False)
    rows = client.query("SELECT task_id, step, attempts FROM tracetune_dead_letters").result_rows
    assert rows == [("task-dead-1", "create_followup", 3)]
    step = next(s for s in exporter.get_finished_spans() if s.name == "create_followup")
    assert step.status.status_code == StatusCode.ERROR


def test_config_change_mid_load_applies_without_errors(classifiers, remote, db_settings):
    """The executor registers the pipeline's declaration; a change made through the tuner API reaches
    the knobs by name while tasks run, without a failed task."""
    pipeline, exporter = make_pipeline(classifiers, remote)
    with ThreadServer(create_app(lambda: store.connect(db_settings), token="t0ken")) as tuner:
        poller = ConfigPoller(tuner.url, pipeline, token="t0ken", interval=0.1).start()
        assert pipeline.config.version == 1  # the declared defaults, stored by the tuner
        spec = httpx.get(f"{tuner.url}/v1/pipelines/ticket_triage/spec").json()
        assert spec["steps"]["classify"]["route_weights"]["default"] == {"fp32": 0.8, "int8": 0.2}
        assert spec["steps"]["escalate"]["cascade_threshold"]["default"] == triage.CASCADE_THRESHOLD
        assert spec["steps"]["escalate"]["route_weights"]["default"] == {"llm-small": 0.7, "llm-large": 0.3}
        tickets = [t.text for t in generate(200, seed=5)]
        errors, done = [], threading.Event()

        def load():
            rng = random.Random(1)
            while not done.is_set():
                try:
                    pipeline.run(rng.choice(tickets))
                except Exception as exc:  # noqa: BLE001 - any failure at all is a defect here
                    errors.append(exc)

        workers = [threading.Thread(target=load) for _ in range(6)]
        for w in workers:
            w.start()
        wait_until(lambda: len(exporter.get_finished_spans()) > 200, 60, message="load running")
        steps = {"classify": {"batch_max_size": 16, "batch_max_wait_ms": 2.0, "cache_enabled": False,
                              "route_weights": {"int8": 1.0}},
                 "escalate": {"max_concurrency": 4}}
        change = httpx.patch(f"{tuner.url}/v1/pipelines/ticket_triage/config", json={
            "reason": "mid-load change", "steps": steps}, headers={"Authorization": "Bearer t0ken"})
        assert change.status_code == 200, change.text
        assert change.json()["version"] == 2
        wait_until(lambda: pipeline.config.version == 2, 20, message="version 2 applied")
        mark = len(exporter.get_finished_spans())
        wait_until(lambda: len(exporter.get_finished_spans()) > mark + 200, 60, message="load after change")
        done.set()
        for w in workers:
            w.join(30)
        poller.stop()

    assert errors == []
    classify_step = next(s for s in pipeline.steps if s.name == "classify")
    escalate_step = next(s for s in pipeline.steps if s.name == "escalate")
    assert all(b.max_size == 16 and b.max_wait_ms == 2.0 and b.bucket_by_length
               for b in classify_step.batchers.values())
    assert escalate_step.limiter.limit == 4
    assert poller.not_modified > 0  # polling between changes was answered with 304
    after = exporter.get_finished_spans()[mark:]
    roots = [s for s in after if s.name == "ticket_triage"]
    assert roots and all(s.attributes["tracetune.config_version"] == 2 for s in roots[-20:])
    classify = [s for s in after if s.name == "classify"]
    assert all(s.attributes["tracetune.cache"] == "bypass" for s in classify[-20:])  # cache switched off
    assert all(s.attributes["tracetune.route"] == "int8" for s in classify[-20:])
    pipeline.close()


def test_the_declaration_names_every_knob_the_demo_has(classifiers, remote):
    spec = make_pipeline(classifiers, remote)[0].spec()
    assert {step: set(knobs) for step, knobs in spec.steps.items() if knobs} == {
        "classify": {"route_weights", "batch_max_size", "batch_max_wait_ms", "length_bucketing", "cache_enabled",
                     "cache_ttl_seconds", "cache_max_entries"},
        "escalate": {"cascade_threshold", "route_weights", "cache_enabled", "cache_ttl_seconds", "cache_max_entries",
                     "max_concurrency", "timeout_seconds"},
        "create_followup": {"max_concurrency", "timeout_seconds"},
    }
    assert spec.slo == triage.SLO


def test_escalations_go_to_the_llm_tier_the_weights_pick(classifiers, remote):
    pipeline, exporter = make_pipeline(classifiers, remote, seed=3)
    tickets = [t.text for t in generate(120, seed=41)]
    tiers = {"llm-small": "standin-small", "llm-large": "standin-large"}

    def escalations(weights: dict[str, float], texts: list[str] = tickets) -> list:
        with_config(pipeline, escalate={"cascade_threshold": 1.0, "route_weights": weights},
                    classify={"cache_enabled": False})
        exporter.clear()
        for text in texts:
            pipeline.run(text)
        return [s for s in exporter.get_finished_spans() if s.name == "escalate"]

    default = escalations(triage.LLM_WEIGHTS)
    assert len(default) == len(tickets)  # every confidence is below 1.0
    for span in default:
        assert tiers[span.attributes["tracetune.route"]] == span.attributes["gen_ai.request.model"]
        assert span.attributes["tracetune.llm.input_tokens"] > 30 and span.attributes["tracetune.cache"] == "bypass"
    large = sum(s.attributes["tracetune.route"] == "llm-large" for s in default) / len(default)
    assert abs(large - 0.3) < 4 * (0.3 * 0.7 / len(default)) ** 0.5, large
    assert {s.attributes["tracetune.route"] for s in escalations({"llm-small": 1.0, "llm-large": 0.0}, tickets[:30])} \
        == {"llm-small"}
    assert {s.attributes["gen_ai.request.model"] for s in escalations({"llm-small": 0.0, "llm-large": 1.0},
                                                                     tickets[:30])} == {"standin-large"}
    pipeline.close()


def test_the_escalate_cache_once_switched_on_answers_a_repeat_without_tokens(classifiers, remote):
    pipeline, exporter = make_pipeline(classifiers, remote)
    spec = pipeline.spec().steps["escalate"]
    assert spec["cache_enabled"].default is False  # off until the owner or the tuner switches it on
    with_config(pipeline, escalate={"cascade_threshold": 1.0, "cache_enabled": True,
                                    "route_weights": {"llm-small": 1.0, "llm-large": 0.0}})
    completions = lambda: httpx.get(f"{remote[0]}/stats").json()["models"]["standin-small"]["completions"]
    before = completions()
    first, again = (pipeline.run("where is my parcel, the tracking has not moved") for _ in range(2))
    assert pipeline.result(first)["category"] == pipeline.result(again)["category"] == "shipping"
    miss, hit = [s for s in exporter.get_finished_spans() if s.name == "escalate"]
    assert (miss.attributes["tracetune.cache"], hit.attributes["tracetune.cache"]) == ("miss", "hit")
    assert miss.attributes["tracetune.llm.input_tokens"] > 0 and "tracetune.llm.input_tokens" not in hit.attributes
    assert completions() == before + 1
    pipeline.close()

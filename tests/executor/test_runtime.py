"""The public executor runtime on its own (no demo): what a pipeline declares, how the tuner's configs
reach its steps by knob name, cascades and concurrency limits, metrics by pipeline and step, the task
API, loading pipelines by import string, and the CLI's one-line refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
import numpy as np
import pytest
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.servers import ThreadServer
from tracetune.base import settings as settings_mod
from tracetune.executor import (
    Batching,
    Cache,
    Cascade,
    ChatClient,
    Effect,
    Infer,
    InputError,
    Pipeline,
    Remote,
    RetryPolicy,
    Step,
    StepError,
)
from tracetune.executor.api import create_app
from tracetune.executor.cache import TTLCache
from tracetune.executor.limits import Limiter, LimitTimeout
from tracetune.executor.runner import PipelineLoadError, load_pipeline, load_pipelines
from tracetune.tuner.config import ConfigError, PipelineConfig, PipelineSpec

NO_WAIT = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0, sleep=lambda _: None)

TASK_TOKEN = "t0ken"


def _post(url: str, **kwargs) -> httpx.Response:
    """A task call with the executor's bearer token."""
    headers = {"Authorization": f"Bearer {TASK_TOKEN}", **kwargs.pop("headers", {})}
    return httpx.post(url, headers=headers, **kwargs)



def upper(texts: list[str]) -> list[str]:
    return [t.upper() for t in texts]


def scored(texts: list[str]) -> list[tuple[str, float]]:
    """A local model whose confidence is the input itself: "0.3" -> ("local", 0.3)."""
    return [("local", float(t)) for t in texts]


def with_config(pipeline: Pipeline, **steps) -> PipelineConfig:
    """Apply knob values by step and knob name as the tuner's next version would."""
    config = pipeline.spec().merge(pipeline.config, steps)
    pipeline.apply_config(config)
    return config


def spans(exporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def close_after():
    """Pipelines a test builds, closed (batcher threads, clients) when it ends."""
    pipelines: list[Pipeline] = []
    yield pipelines.append
    for pipeline in pipelines:
        pipeline.close()


# ---- the declaration ---------------------------------------------------------------------------

def test_spec_lists_each_steps_knobs_with_the_constructor_values_as_defaults(tracer):
    tracer, _ = tracer
    pipeline = Pipeline("declared", [
        Step("plain", lambda task: None),
        Infer("classify", {"small": upper, "large": upper}, weights={"small": 3, "large": 1},
              batching=Batching(max_size=4, max_wait_ms=7, length=len),
              cache=Cache(enabled=False, ttl_seconds=30, max_entries=100)),
        Cascade("escalate", after="classify", remote=None, threshold=0.3,
                limits=Remote(max_concurrency=5, timeout_seconds=2.5)),
        Effect("notify", "http://127.0.0.1:9/v1/notes", lambda task: {},
               limits=Remote(max_concurrency=3, timeout_seconds=1.5)),
    ], slo={"p95_ms": 250.0}, tracer=tracer)
    spec = pipeline.spec()
    declared = {step: {name: (knob.kind, knob.default) for name, knob in knobs.items()}
                for step, knobs in spec.steps.items()}
    assert declared == {
        "plain": {},
        "classify": {"route_weights": ("weights", {"small": 3.0, "large": 1.0}),
                     "batch_max_size": ("int", 4), "batch_max_wait_ms": ("float", 7.0),
                     "length_bucketing": ("bool", True), "cache_enabled": ("bool", False),
                     "cache_ttl_seconds": ("float", 30.0), "cache_max_entries": ("int", 100)},
        "escalate": {"cascade_threshold": ("float", 0.3), "max_concurrency": ("int", 5),
                     "timeout_seconds": ("float", 2.5)},
        "notify": {"max_concurrency": ("int", 3), "timeout_seconds": ("float", 1.5)},
    }
    assert spec.slo == {"p95_ms": 250.0}
    # Until the tuner speaks, the config in force is version 0: the declared defaults.
    assert pipeline.config.version == 0
    assert pipeline.config.steps == {step: {name: default for name, (_, default) in knobs.items()}
                                     for step, knobs in declared.items() if knobs}
    # The declaration survives the JSON trip to the tuner.
    assert PipelineSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # One variant: nothing to weigh; no length function: nothing to bucket.
    assert set(Infer("lone", {"only": upper}, batching=Batching()).knobs()) == {"batch_max_size", "batch_max_wait_ms"}
    pipeline.close()


# ---- configs reach the steps by knob name ------------------------------------------------------

def test_batch_knobs_reach_the_batchers(tracer, close_after):
    tracer, exporter = tracer
    sizes: list[int] = []

    def shout(texts: list[str]) -> list[str]:
        sizes.append(len(texts))
        return upper(texts)

    step = Infer("shout", {"only": shout}, batching=Batching(max_size=8, max_wait_ms=5, length=len),
                 result_timeout=5)
    pipeline = Pipeline("batching", [step], tracer=tracer)
    close_after(pipeline)
    with_config(pipeline, shout={"batch_max_size": 3, "batch_max_wait_ms": 10_000.0, "length_bucketing": False})
    batcher = step.batchers["only"]
    assert (batcher.max_size, batcher.max_wait_ms, batcher.bucket_by_length) == (3, 10_000.0, False)
    # Three tasks of different length buckets: they run as one batch as soon as the third arrives. Had
    # the size stayed 8 (or bucketing on), they would wait out the 10 s and the result timeout (5 s).
    with ThreadPoolExecutor(3) as pool:
        tasks = list(pool.map(pipeline.run, ["a", "b" * 40, "c" * 80]))
    assert sizes == [3]
    assert [t.data["shout"] for t in tasks] == ["A", "B" * 40, "C" * 80]
    assert [s.attributes["tracetune.batch_size"] for s in spans(exporter, "shout")] == [3, 3, 3]


def test_route_weights_reach_the_router(tracer, close_after):
    tracer, exporter = tracer
    pipeline = Pipeline("routing", [Infer("pick", {"a": upper, "b": upper}, seed=7)], tracer=tracer)
    close_after(pipeline)
    with_config(pipeline, pick={"route_weights": {"a": 0.2, "b": 0.8}})
    n = 800
    routes = [pipeline.run("x").routes["pick"] for _ in range(n)]
    share = routes.count("b") / n
    assert abs(share - 0.8) < 4 * (0.8 * 0.2 / n) ** 0.5, share  # a binomial 4-sigma band
    assert [s.attributes["tracetune.route"] for s in spans(exporter, "pick")] == routes
    with_config(pipeline, pick={"route_weights": {"a": 1.0}})  # routes left out weigh 0
    assert {pipeline.run("x").routes["pick"] for _ in range(50)} == {"a"}


def test_cache_switch_and_a_shorter_ttl_reach_the_cache(tracer, close_after):
    tracer, exporter = tracer
    now = [0.0]
    calls: list[str] = []

    def measure(texts: list[str]) -> list[int]:
        calls.extend(texts)
        return [len(t) for t in texts]

    step = Infer("measure", {"m": measure}, cache=Cache(ttl_seconds=600))
    step.cache.store = TTLCache(step.cache.store.max_entries, step.cache.store.ttl_seconds, clock=lambda: now[0])
    pipeline = Pipeline("caching", [step], tracer=tracer)
    close_after(pipeline)

    def outcome(text: str) -> str:
        exporter.clear()
        pipeline.run(text)
        return spans(exporter, "measure")[0].attributes["tracetune.cache"]

    assert [outcome("Hello  World"), outcome("hello world")] == ["miss", "hit"]
    with_config(pipeline, measure={"cache_enabled": False})
    assert outcome("hello world") == "bypass"
    with_config(pipeline, measure={"cache_enabled": True})
    assert outcome("hello world") == "hit"  # entries survive switching the cache off and on
    assert calls == ["Hello  World", "hello world"]
    now[0] = 100.0
    assert outcome("hello world") == "hit"
    with_config(pipeline, measure={"cache_ttl_seconds": 50.0})  # stored at 0: now past a 50 s TTL
    assert [outcome("hello world"), outcome("hello world")] == ["miss", "hit"]


def test_the_cascade_threshold_decides_which_tasks_escalate(tracer, close_after):
    tracer, _ = tracer
    pipeline = Pipeline("thresholds", [Infer("guess", {"m": scored}),
                                       Cascade("check", after="guess", remote=lambda text: "remote", threshold=0.5)],
                        tracer=tracer)
    close_after(pipeline)
    confidences = ["0.1", "0.3", "0.6", "0.9"]

    def escalated() -> list[bool]:
        tasks = [pipeline.run(c) for c in confidences]
        for task in tasks:
            assert task.data["guess"] == ("remote" if task.escalated else "local")
            assert task.escalated in ({}, {"guess": "local"})
        return [bool(t.escalated) for t in tasks]

    assert escalated() == [True, True, False, False]
    with_config(pipeline, check={"cascade_threshold": 0.7})
    assert escalated() == [True, True, True, False]
    with_config(pipeline, check={"cascade_threshold": 0.0})
    assert escalated() == [False, False, False, False]


def test_numpy_confidences_feed_the_cascade(tracer, close_after):
    tracer, _ = tracer
    local = Infer("guess", {"m": lambda texts: [(np.str_("local"), np.float32(0.25)) for _ in texts]})
    pipeline = Pipeline("numpy_conf", [local, Cascade("check", after="guess", remote=lambda text: "remote")],
                        tracer=tracer)
    close_after(pipeline)
    task = pipeline.run("x")
    assert task.confidence["guess"] == pytest.approx(0.25)
    assert task.escalated == {"guess": "local"} and task.data["guess"] == "remote"


def test_numpy_values_are_recorded_as_features(tracer, close_after):
    tracer, exporter = tracer
    pipeline = Pipeline("numpy_feature", [Infer("count", {"m": lambda texts: [np.int64(len(t)) for t in texts]},
                                                feature="length")], tracer=tracer)
    close_after(pipeline)
    pipeline.run("four")
    assert spans(exporter, "count")[0].attributes.get("tracetune.feature.length") == 4


def test_concurrency_knobs_resize_the_limiters(tracer, close_after):
    tracer, _ = tracer
    cascade = Cascade("escalate", after="guess", remote=lambda text: "remote",
                      limits=Remote(max_concurrency=2, timeout_seconds=1))
    effect = Effect("notify", "http://127.0.0.1:9/v1/notes", lambda task: {},
                    limits=Remote(max_concurrency=8, timeout_seconds=5))
    pipeline = Pipeline("limits", [Infer("guess", {"m": scored}), cascade, effect], tracer=tracer)
    close_after(pipeline)
    with_config(pipeline, escalate={"max_concurrency": 5, "timeout_seconds": 3.0},
                notify={"max_concurrency": 1, "timeout_seconds": 0.5})
    assert (cascade.limiter.limit, cascade.timeout) == (5, 3.0)
    assert (effect.effect.max_concurrency, effect.effect.timeout) == (1, 0.5)


@pytest.mark.parametrize("steps, where", [
    ({"nosuch": {"batch_max_size": 2}}, "steps.nosuch"),
    ({"plain": {"anything": 1}}, "steps.plain"),  # a step without knobs takes none
    ({"classify": {"nosuch": 1}}, "steps.classify.nosuch"),
    ({"classify": {"batch_max_size": 0}}, "steps.classify.batch_max_size must be between 1 and 1024"),
    ({"classify": {"batch_max_size": 2.5}}, "steps.classify.batch_max_size must be a whole number"),
    ({"classify": {"cache_enabled": "no"}}, "steps.classify.cache_enabled must be true or false"),
    ({"classify": {"route_weights": {"c": 1.0}}}, "steps.classify.route_weights names routes ['c']"),
    ({"classify": {"route_weights": {"a": 0.0, "b": 0.0}}}, "steps.classify.route_weights must give"),
    ({"escalate": {"cascade_threshold": 1.5}}, "steps.escalate.cascade_threshold must be between 0 and 1"),
    # A good change next to a bad one: neither is applied.
    ({"escalate": {"cascade_threshold": 0.9, "max_concurrency": 6},
      "classify": {"batch_max_size": 5000}}, "steps.classify.batch_max_size"),
])
def test_a_config_that_does_not_fit_raises_naming_the_knob_and_changes_nothing(tracer, close_after, steps, where):
    tracer, _ = tracer
    infer = Infer("classify", {"a": scored, "b": scored}, batching=Batching(max_size=4), cache=Cache())
    cascade = Cascade("escalate", after="classify", remote=lambda text: "remote", threshold=0.5)
    pipeline = Pipeline("strict", [Step("plain"), infer, cascade], tracer=tracer)
    close_after(pipeline)
    good = with_config(pipeline, classify={"batch_max_size": 6})

    with pytest.raises(ConfigError, match=re.escape(where)):
        pipeline.apply_config(PipelineConfig("strict", 2, steps))
    assert pipeline.config == good and pipeline.config.version == 1
    assert all(b.max_size == 6 for b in infer.batchers.values())
    assert infer.cache.enabled and infer.weights == {"a": 1.0, "b": 1.0}
    assert (cascade.threshold, cascade.limiter.limit) == (0.5, 8)


# ---- cascades ----------------------------------------------------------------------------------

def overloaded_llm() -> Starlette:
    async def completions(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def test_a_failing_remote_keeps_the_local_answer_and_marks_the_span(tracer, close_after):
    tracer, exporter = tracer
    with ThreadServer(overloaded_llm()) as llm:
        chat = ChatClient(llm.url, "remote-model", policy=NO_WAIT)
        pipeline = Pipeline("fallback", [Infer("guess", {"m": scored}),
                                         Cascade("ask", after="guess", remote=chat.classifier(["local", "other"]))],
                            tracer=tracer)
        close_after(pipeline)
        failed_before = sample("tracetune_cascade_total", pipeline="fallback", step="ask", outcome="failed")
        task = pipeline.run("0.2")
    assert task.data["guess"] == "local" and task.escalated == {}
    ask = spans(exporter, "ask")[0]
    assert ask.attributes["tracetune.escalation"] == "failed"
    assert ask.status.status_code == StatusCode.ERROR
    assert ask.status.description.startswith("remote model failed, local answer kept: remote-model at ")
    assert "failed after 2 attempts: HTTP 503" in ask.status.description
    assert [e.name for e in ask.events] == ["exception"]
    assert spans(exporter, "fallback")[0].status.status_code != StatusCode.ERROR  # the task itself succeeded
    assert sample("tracetune_cascade_total", pipeline="fallback", step="ask", outcome="failed") == failed_before + 1


def test_a_remote_taking_timeout_gets_the_configured_timeout(tracer, close_after):
    tracer, _ = tracer
    seen: list[float] = []

    def remote(text: str, timeout: float) -> str:
        seen.append(timeout)
        return "remote"

    pipeline = Pipeline("timeouts", [Infer("guess", {"m": scored}),
                                     Cascade("ask", after="guess", remote=remote, limits=Remote(timeout_seconds=10))],
                        tracer=tracer)
    close_after(pipeline)
    assert pipeline.run("0.1").data["guess"] == "remote"
    with_config(pipeline, ask={"timeout_seconds": 42.0})
    pipeline.run("0.1")
    # What is left of the step's timeout when the call starts: all of it, less a moment.
    assert 9 < seen[0] <= 10 and 41 < seen[1] <= 42


def test_the_cascade_holds_at_most_max_concurrency_remote_calls(tracer, close_after):
    tracer, exporter = tracer
    lock, gate = threading.Lock(), threading.Event()
    in_flight, peak = [0], [0]

    def slow(text: str) -> str:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        gate.wait(10)
        with lock:
            in_flight[0] -= 1
        return "remote"

    pipeline = Pipeline("bounded", [Infer("guess", {"m": scored}),
                                    Cascade("ask", after="guess", remote=slow,
                                            limits=Remote(max_concurrency=8, timeout_seconds=10))], tracer=tracer)
    close_after(pipeline)
    # The tuner lowers the limit; the slot wait is bounded by the step's timeout.
    with_config(pipeline, ask={"max_concurrency": 2, "timeout_seconds": 0.3})
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(pipeline.run, "0.1") for _ in range(5)]
        try:
            # Two calls hold the slots until the gate opens, so the first three tasks to finish are the
            # ones that found both slots busy (without the limit all five would block on the gate).
            first = [f.result() for _, f in zip(range(3), as_completed(futures, timeout=10), strict=False)]
            assert peak[0] == 2 and all(t.data["guess"] == "local" and not t.escalated for t in first)
        finally:
            gate.set()
        tasks = [f.result(10) for f in futures]
    assert sum(t.data["guess"] == "remote" for t in tasks) == 2 and peak[0] == 2
    outcomes = sorted(s.attributes["tracetune.escalation"] for s in spans(exporter, "ask"))
    assert outcomes == ["answered"] * 2 + ["failed"] * 3
    assert all("all 2 slots stayed busy for 0.3 s" in s.status.description
               for s in spans(exporter, "ask") if s.attributes["tracetune.escalation"] == "failed")


# ---- the concurrency limiter -------------------------------------------------------------------

def test_resizing_a_limiter_up_lets_waiters_in():
    limiter = Limiter(1)
    waiting, acquired = threading.Event(), threading.Event()

    def take_a_slot() -> None:
        waiting.set()
        with limiter.slot(timeout=30):
            acquired.set()

    with limiter.slot():
        waiter = threading.Thread(target=take_a_slot)
        waiter.start()
        waiting.wait(5)
        threading.Event().wait(0.05)  # let the waiter block on the full limiter (ordering, not an assertion)
        limiter.resize(2)
        assert acquired.wait(5)  # not the 30 s the waiter would otherwise sit out
        assert limiter.limit == 2
    waiter.join(5)
    assert limiter.in_use == 0


def test_a_slot_that_stays_busy_raises_limit_timeout():
    limiter = Limiter(2)
    with limiter.slot(), limiter.slot():
        limiter.resize(1)  # never interrupts the two holders
        assert limiter.in_use == 2
        with pytest.raises(LimitTimeout, match="all 1 slots stayed busy for 0.05 s"):
            with limiter.slot(timeout=0.05):
                pass
    with limiter.slot(timeout=0.05) as waited:
        assert waited >= 0 and limiter.in_use == 1
    assert limiter.in_use == 0
    with pytest.raises(ValueError, match="at least 1"):
        limiter.resize(0)


# ---- side effects ------------------------------------------------------------------------------

def notes_app() -> tuple[Starlette, list[tuple[str, dict]]]:
    """A service that files notes, refusing the text "bad" with a 422."""
    seen: list[tuple[str, dict]] = []

    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        key = request.headers.get("idempotency-key", "")
        seen.append((key, body))
        if body.get("text") == "bad":
            return JSONResponse({"error": {"message": "text is not allowed"}}, status_code=422)
        return JSONResponse({"id": f"n-{len(seen)}"}, status_code=201)

    return Starlette(routes=[Route("/v1/notes", create, methods=["POST"])]), seen


def test_an_effect_posts_the_payload_once_per_task_and_a_refusal_fails_the_task(tracer, close_after):
    tracer, exporter = tracer
    app, seen = notes_app()
    with ThreadServer(app) as notes:
        pipeline = Pipeline("notes", [Effect("notify", notes.url + "/v1/notes", lambda task: {"text": task.text},
                                             policy=NO_WAIT)], tracer=tracer)
        close_after(pipeline)
        assert pipeline.run("hello", task_id="t-1").data["notify"] == {"id": "n-1"}
        pipeline.run("hello", task_id="t-1")  # a resubmitted task sends the same key
        pipeline.run("hello", task_id="t-2")
        with pytest.raises(StepError, match=r"was refused \(422 is not retryable.*text is not allowed"):
            pipeline.run("bad", task_id="t-3")
    keys = [key for key, _ in seen]
    assert len(keys) == 4 and keys[0] == keys[1] and len(set(keys)) == 3  # the refusal was not retried
    assert seen[0][1] == {"text": "hello"}
    notify = spans(exporter, "notify")
    assert notify[0].attributes["tracetune.idempotency_key"] == keys[0]
    assert notify[-1].status.status_code == StatusCode.ERROR


# ---- metrics -----------------------------------------------------------------------------------

def test_metrics_are_labelled_by_pipeline_and_step(tracer, close_after):
    tracer, _ = tracer

    def build(name: str) -> Pipeline:
        pipeline = Pipeline(name, [Infer("classify", {"a": upper, "b": upper}, weights={"a": 1.0, "b": 0.0},
                                         cache=Cache()), Step("tidy")], tracer=tracer)
        close_after(pipeline)
        return pipeline

    def counts(pipeline: str) -> dict[str, float]:
        step = {"pipeline": pipeline, "step": "classify"}
        return {"miss": sample("tracetune_cache_requests_total", **step, result="miss"),
                "hit": sample("tracetune_cache_requests_total", **step, result="hit"),
                "route_a": sample("tracetune_route_requests_total", **step, route="a"),
                "ok": sample("tracetune_tasks_total", pipeline=pipeline, status="ok"),
                "tidy": sample("tracetune_step_duration_seconds_count", pipeline=pipeline, step="tidy")}

    reviews, digest = build("reviews"), build("digest")  # the same step names in two pipelines
    before = {name: counts(name) for name in ("reviews", "digest")}
    reviews.run("Great")
    reviews.run("great")
    digest.run("great")
    delta = {name: {k: v - before[name][k] for k, v in counts(name).items()} for name in before}
    assert delta == {"reviews": {"miss": 1, "hit": 1, "route_a": 2, "ok": 2, "tidy": 2},
                     "digest": {"miss": 1, "hit": 0, "route_a": 1, "ok": 1, "tidy": 1}}
    assert sample("tracetune_cache_hit_ratio", pipeline="reviews", step="classify") == 0.5

    def knob(pipeline: str, name: str) -> float | None:
        return REGISTRY.get_sample_value("tracetune_knob_value",
                                         {"pipeline": pipeline, "step": "classify", "knob": name})

    assert knob("reviews", "cache_ttl_seconds") == 600 and knob("reviews", "route_weights.b") == 0  # the defaults
    with_config(reviews, classify={"cache_enabled": False, "cache_ttl_seconds": 60.0,
                                   "route_weights": {"a": 0.25, "b": 0.75}})
    assert (knob("reviews", "cache_enabled"), knob("reviews", "cache_ttl_seconds")) == (0, 60)
    assert (knob("reviews", "route_weights.a"), knob("reviews", "route_weights.b")) == (0.25, 0.75)
    assert knob("digest", "cache_ttl_seconds") == 600 and knob("digest", "cache_enabled") == 1
    assert REGISTRY.get_sample_value("tracetune_config_version", {"pipeline": "reviews"}) == 1


# ---- the task API ------------------------------------------------------------------------------

@pytest.fixture
def task_api(tracer):
    """The task API on a real server, for a pipeline taking {"text": str, "stars": int}."""
    tracer, exporter = tracer

    def check(task) -> None:
        if not 1 <= task.data["stars"] <= 5:
            raise InputError(f"stars must be between 1 and 5, got {task.data['stars']}")

    def score(task) -> None:
        task.data["score"] = np.int64(task.data["stars"] * 2)

    pipeline = Pipeline("ratings", [
        Step("check", check),
        Infer("length", {"np": lambda texts: [np.float32(len(t)) / np.float32(4) for t in texts]}),
        Step("score", score),
    ], inputs={"text": str, "stars": int}, tracer=tracer)
    with ThreadServer(create_app({pipeline.name: pipeline}, max_in_flight=8, token=TASK_TOKEN)) as server:
        yield server.url, exporter
    pipeline.close()


def test_the_task_api_answers_the_pipeline_result_as_json(task_api):
    url, exporter = task_api
    reply = _post(f"{url}/v1/pipelines/ratings/tasks",
                       json={"text": "solid work", "stars": 4, "task_id": "t-1", "tenant": "acme"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["task_id"] == "t-1" and re.fullmatch(r"[0-9a-f]{32}", body["trace_id"])
    assert body["result"] == {"length": 2.5, "score": 8}  # numpy scalars as JSON numbers
    root = spans(exporter, "ratings")[0]
    assert root.attributes["tracetune.tenant"] == "acme" and root.attributes["tracetune.task_id"] == "t-1"
    assert f"{root.context.trace_id:032x}" == body["trace_id"]
    generated = _post(f"{url}/v1/pipelines/ratings/tasks", json={"text": "ok", "stars": 3}).json()
    assert uuid.UUID(generated["task_id"])
    assert httpx.get(f"{url}/health").json()["pipelines"] == {"ratings": 0}


@pytest.mark.parametrize("body, field", [
    ({"text": "no stars"}, '"stars"'),
    ({"text": "wrong type", "stars": "four"}, '"stars"'),
    ({"stars": 3}, '"text"'),
])
def test_the_task_api_refuses_a_body_without_the_declared_inputs(task_api, body, field):
    url, exporter = task_api
    reply = _post(f"{url}/v1/pipelines/ratings/tasks", json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert f"{field} is missing or not of type" in error and "\n" not in error
    assert error.startswith('pipeline ratings needs the fields "text" (str), "stars" (int)')
    assert spans(exporter, "ratings") == []  # no step ran


def test_the_task_api_refuses_unknown_pipelines_bodies_that_are_not_objects_and_failed_steps(task_api):
    url, _ = task_api
    unknown = _post(f"{url}/v1/pipelines/nope/tasks", json={"text": "x", "stars": 3})
    assert unknown.status_code == 404 and unknown.json()["error"] == \
        "unknown pipeline 'nope'; this executor runs ratings"
    assert _post(f"{url}/v1/pipelines/ratings/tasks", json=["text"]).status_code == 400
    assert _post(f"{url}/v1/pipelines/ratings/tasks", content=b"{nope",
                      headers={"content-type": "application/json"}).status_code == 400
    refused = _post(f"{url}/v1/pipelines/ratings/tasks", json={"text": "x", "stars": 9, "task_id": "t-9"})
    assert refused.status_code == 422
    assert refused.json()["error"] == "stars must be between 1 and 5, got 9"
    assert refused.json()["task_id"] == "t-9" and re.fullmatch(r"[0-9a-f]{32}", refused.json()["trace_id"])


@pytest.mark.parametrize("inputs, body", [({"weight": float}, {"weight": 4}), ({"stars": int}, {"stars": True})])
def test_declared_number_inputs_follow_json_numbers(inputs, body):
    pipeline = Pipeline("numbers", [Step("noop")], inputs=inputs)
    accepted = pipeline.check_input(body) is None
    assert accepted == (not isinstance(next(iter(body.values())), bool))


# ---- loading pipelines by import string --------------------------------------------------------

PIPELINES_MODULE = '''
from tracetune.executor import Pipeline, Step

SEEN = []


def _pipeline(name):
    return Pipeline(name, [Step("echo", lambda task: None)])


instance = _pipeline("loaded_instance")


def factory():
    return _pipeline("loaded_factory")


def with_settings(settings):
    SEEN.append(settings)
    return _pipeline("loaded_with_settings")


class Holder:
    pipeline = _pipeline("loaded_nested")


not_a_pipeline = 42


def returns_nothing():
    return None
'''


@pytest.fixture
def pipelines_module(tmp_path, monkeypatch) -> str:
    """A throwaway module of pipelines on sys.path (a fresh name per test: imports are cached)."""
    name = f"my_pipelines_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PIPELINES_MODULE)
    (tmp_path / f"{name}_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name
    for module in (name, f"{name}_broken"):
        sys.modules.pop(module, None)


def test_load_pipeline_takes_an_instance_or_a_factory(pipelines_module, tmp_path):
    settings = settings_mod.load(config_file=tmp_path / "none.toml", environ={}, home=str(tmp_path / "home"))
    assert load_pipeline(f"{pipelines_module}:instance").name == "loaded_instance"
    assert load_pipeline(f"{pipelines_module}:factory").name == "loaded_factory"
    assert load_pipeline(f"{pipelines_module}:Holder.pipeline").name == "loaded_nested"
    assert load_pipeline(f"{pipelines_module}:with_settings", settings).name == "loaded_with_settings"
    assert sys.modules[pipelines_module].SEEN == [settings]


@pytest.mark.parametrize("target, message", [
    ("no_colon", "pipeline 'no_colon' must look like package.module:attribute"),
    ("{m}:", "must look like package.module:attribute"),
    (":instance", "must look like package.module:attribute"),
    ("no_such_module_xyz:thing", "pipeline 'no_such_module_xyz:thing': no module named 'no_such_module_xyz'"),
    ("no_such_package_xyz.sub:thing", "no module named 'no_such_package_xyz'"),
    ("{m}:missing", "{m} has no attribute 'missing'"),
    ("{m}:Holder.missing", "{m} has no attribute 'Holder.missing'"),
    ("{m}:not_a_pipeline", "pipeline '{m}:not_a_pipeline' is a int, not a tracetune.executor.Pipeline"),
    ("{m}:returns_nothing", "is a NoneType, not a tracetune.executor.Pipeline"),
])
def test_load_pipeline_errors_are_one_line(pipelines_module, target, message):
    with pytest.raises(PipelineLoadError) as failure:
        load_pipeline(target.format(m=pipelines_module))
    assert message.format(m=pipelines_module) in str(failure.value)
    assert "\n" not in str(failure.value)


def test_a_missing_dependency_of_the_module_is_not_mistaken_for_a_missing_module(pipelines_module):
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_pipeline(f"{pipelines_module}_broken:anything")


def test_load_pipelines_refuses_two_pipelines_of_one_name(pipelines_module):
    loaded = load_pipelines([f"{pipelines_module}:instance", f"{pipelines_module}:factory"])
    assert list(loaded) == ["loaded_instance", "loaded_factory"]
    with pytest.raises(PipelineLoadError, match="two pipelines are named 'loaded_factory'"):
        load_pipelines([f"{pipelines_module}:factory", f"{pipelines_module}:factory"])


# ---- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("target, fragment", [
    ("nosuchmodule:x", "no module named 'nosuchmodule'"),
    ("not-an-import-string", "'not-an-import-string' (from command line)"),
])
def test_the_executor_command_refuses_a_pipeline_it_cannot_load_in_one_line(tmp_path, target, fragment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    env["TRACETUNE_HOME"] = str(tmp_path / "home")
    result = subprocess.run([sys.executable, "-m", "tracetune", "--config", str(tmp_path / "none.toml"),
                             "executor", "--pipeline", target], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.stderr
    assert "must look like package.module:attribute" in lines[0] or "no module named" in lines[0]


def test_a_config_applies_only_to_its_own_pipeline_and_keeps_unnamed_knobs():
    pipeline = Pipeline("mine", [Infer("score", {"a": lambda xs: xs, "b": lambda xs: xs}, input=lambda t: t.text,
                                       batching=Batching(max_size=4))])
    try:
        defaults = pipeline.spec().defaults(version=1)
        with pytest.raises(ConfigError, match="'theirs' cannot apply to 'mine'"):
            pipeline.apply_config(PipelineConfig("theirs", 5, defaults.steps))
        assert pipeline.config.version == 0
        pipeline.apply_config(PipelineConfig("mine", 2, {"score": {"batch_max_size": 16}}))
        assert pipeline.config.version == 2
        assert pipeline.config.steps["score"] == {**defaults.steps["score"], "batch_max_size": 16}
    finally:
        pipeline.close()


# ---- cascades with several remote routes -------------------------------------------------------

def tiers(calls: list[str]) -> dict:
    """Two remote routes that answer their own name and note each call."""
    def remote(route: str):
        def call(text: str) -> str:
            calls.append(route)
            return route
        return call
    return {"cheap": remote("cheap"), "dear": remote("dear")}


def test_a_cascade_draws_a_remote_route_by_weight_and_the_tuner_moves_the_weights(tracer, close_after):
    tracer, exporter = tracer
    calls: list[str] = []
    cascade = Cascade("ask", after="guess", remote=tiers(calls), weights={"cheap": 3, "dear": 1}, threshold=0.5,
                      seed=7)
    pipeline = Pipeline("tiers", [Infer("guess", {"m": scored}), cascade], tracer=tracer)
    close_after(pipeline)
    knob = pipeline.spec().steps["ask"]["route_weights"]
    assert (knob.kind, knob.default) == ("weights", {"cheap": 3.0, "dear": 1.0})
    before = sample("tracetune_route_requests_total", pipeline="tiers", step="ask", route="dear")

    n = 800
    tasks = [pipeline.run("0.2") for _ in range(n)]
    dear = calls.count("dear") / n
    assert abs(dear - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5, dear  # a binomial 4-sigma band
    # Each span names the route that answered; the answer replaced the local one.
    assert [s.attributes["tracetune.route"] for s in spans(exporter, "ask")] == calls
    assert [t.data["guess"] for t in tasks] == calls and all(t.escalated == {"guess": "local"} for t in tasks)
    assert sample("tracetune_route_requests_total", pipeline="tiers", step="ask", route="dear") == \
        before + calls.count("dear")

    with_config(pipeline, ask={"route_weights": {"cheap": 0.0, "dear": 1.0}})
    calls.clear()
    for _ in range(50):
        pipeline.run("0.2")
    assert set(calls) == {"dear"}
    with pytest.raises(ConfigError, match=re.escape("steps.ask.route_weights names routes ['other']")):
        pipeline.apply_config(pipeline.spec().merge(pipeline.config, {"ask": {"route_weights": {"other": 1.0}}}))
    assert cascade.weights == {"cheap": 0.0, "dear": 1.0}


def test_a_single_remote_keeps_its_route_and_declares_no_weights(tracer, close_after):
    tracer, exporter = tracer
    one = Cascade("ask", after="guess", remote=lambda text: "remote", route="llm")
    alone = Cascade("ask", after="guess", remote={"only": lambda text: "remote"})
    assert "route_weights" not in one.knobs() and "route_weights" not in alone.knobs()
    pipeline = Pipeline("single", [Infer("guess", {"m": scored}), one], tracer=tracer)
    close_after(pipeline)
    assert pipeline.run("0.1").data["guess"] == "remote"
    assert spans(exporter, "ask")[0].attributes["tracetune.route"] == "llm"


@pytest.mark.parametrize("kwargs, message", [
    ({"remote": {}}, "remote routes are empty"),
    ({"remote": {"no spaces": upper}}, "route 'no spaces' of cascade 'ask' must start with a letter"),
    ({"remote": upper, "weights": {"remote": 1.0}}, "weights need remote routes given as a mapping"),
    ({"remote": {"a": upper}, "weights": {"b": 1.0}}, "weights of cascade 'ask' name routes it has no remote for"),
    ({"remote": {"a": upper, "b": upper}, "weights": {"a": 0.0}}, "have no positive weight"),
])
def test_a_cascade_refuses_routes_it_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Cascade("ask", after="guess", **kwargs)


def test_the_cascade_cache_reuses_a_routes_answer_once_switched_on(tracer, close_after):
    tracer, exporter = tracer
    calls: list[str] = []
    cascade = Cascade("ask", after="guess", remote=tiers(calls), weights={"cheap": 1.0, "dear": 0.0},
                      cache=Cache(enabled=False, ttl_seconds=60, max_entries=10), threshold=0.5)
    pipeline = Pipeline("cached", [Infer("guess", {"m": scored}), cascade], tracer=tracer)
    close_after(pipeline)
    assert {"cache_enabled", "cache_ttl_seconds", "cache_max_entries"} <= set(pipeline.spec().steps["ask"])

    def outcome(text: str) -> tuple[str, str]:
        task = pipeline.run(text)
        span = spans(exporter, "ask")[-1]
        assert span.attributes["tracetune.escalation"] == "answered"
        assert task.data["guess"] == span.attributes["tracetune.route"]
        return span.attributes["tracetune.cache"], span.attributes["tracetune.input_hash"]

    off = [outcome("0.2"), outcome("0.2")]
    assert [o for o, _ in off] == ["bypass", "bypass"] and calls == ["cheap", "cheap"]
    assert off[0][1] == off[1][1] and len(off[0][1]) == 16  # repeats are visible with the cache off

    with_config(pipeline, ask={"cache_enabled": True})
    calls.clear()
    assert [outcome("0.2")[0], outcome("0.2")[0], outcome("0.3")[0]] == ["miss", "hit", "miss"]
    assert calls == ["cheap", "cheap"]  # the hit called no remote
    # The key holds the route: the other route has not answered this input yet.
    with_config(pipeline, ask={"route_weights": {"cheap": 0.0, "dear": 1.0}})
    assert outcome("0.2")[0] == "miss" and calls[-1] == "dear"


# ---- canaries --------------------------------------------------------------------------------------

def test_a_canary_runs_its_share_of_tasks_on_forks_of_the_steps_it_changes(tracer, close_after):
    tracer, exporter = tracer
    guess = Infer("guess", {"m": scored}, batching=Batching(max_size=4, max_wait_ms=1))
    check = Cascade("check", after="guess", remote=lambda text: "remote", threshold=0.5)
    pipeline = Pipeline("canaried", [Step("note", lambda task: None), guess, check], tracer=tracer)
    close_after(pipeline)
    base = with_config(pipeline, check={"cascade_threshold": 0.5})
    trial = pipeline.spec().merge(base, {"check": {"cascade_threshold": 0.95}, "guess": {"batch_max_size": 2}})
    pipeline.apply_canary(trial, 0.25)
    assert pipeline.canary == (PipelineConfig("canaried", trial.version, trial.steps), 0.25)

    ids = [f"task-{i}" for i in range(400)]
    tasks = {task_id: pipeline.run("0.8", task_id=task_id) for task_id in ids}
    roots = {s.attributes["tracetune.task_id"]: s.attributes["tracetune.config_version"]
             for s in spans(exporter, "canaried")}
    on_trial = [t for t in ids if roots[t] == trial.version]
    assert 0.17 < len(on_trial) / len(ids) < 0.33  # a quarter of the tasks, by a hash of the id
    # Confidence 0.8: under the canary's threshold (escalated), above the base's (kept).
    assert all(bool(tasks[t].escalated) == (roots[t] == trial.version) for t in ids)
    # The steps of the config in force kept their values (the canary runs on forks of them).
    assert pipeline.config.version == base.version and check.threshold == 0.5
    assert guess.batchers["m"].max_size == 4
    again = {task_id: pipeline.run("0.8", task_id=task_id) for task_id in ids[:40]}
    assert all(bool(again[t].escalated) == bool(tasks[t].escalated) for t in again)  # the same side every time

    pipeline.apply_canary(None)  # ended: every task on the config in force
    assert pipeline.canary is None
    assert not any(pipeline.run("0.8", task_id=t).escalated for t in on_trial)


def test_a_canary_that_does_not_fit_is_refused(tracer, close_after):
    tracer, _ = tracer
    pipeline = Pipeline("refusing", [Infer("guess", {"m": scored}),
                                     Cascade("check", after="guess", remote=lambda text: "remote")], tracer=tracer)
    close_after(pipeline)
    with pytest.raises(ConfigError, match="steps.check.cascade_threshold"):
        pipeline.apply_canary(PipelineConfig("refusing", 2, {"check": {"cascade_threshold": 3.0}}), 0.2)
    with pytest.raises(ConfigError, match="share"):
        pipeline.apply_canary(PipelineConfig("refusing", 2, {"check": {"cascade_threshold": 0.3}}), 1.0)
    assert pipeline.canary is None

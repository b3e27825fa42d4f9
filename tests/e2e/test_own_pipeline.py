"""The README's "Run your own pipeline", run as written: its reviews.py behind a real executor, tuned by knob name.

The example expects two ONNX models beside it; the test trains a tiny softmax regression on the README's
own `features` (imported from the written module) and quantises it to int8, so the models and the
featuriser cannot drift apart. Store, collector, tuner, stand-ins and executor are real processes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_settings
from tests.e2e.test_own_app import _blocks, _section
from tests.servers import running_stack, wait_until
from tracetune import store
from tracetune.base.settings import Settings
from tracetune.executor import conventions as attr

PIPELINE = "reviews"

# Review-like training texts: a neutral clause plus a positive or negative cue, and the neutral
# clauses alone with a 50/50 target, so the model is sure of the first and unsure of the second.
POSITIVE = ["great value", "works well", "love it", "excellent quality", "really happy", "highly recommend",
            "perfect fit", "fantastic"]
NEGATIVE = ["broke after a week", "waste of money", "terrible quality", "really disappointed", "stopped working",
            "awful", "want a refund", "useless"]
NEUTRAL = ["the parcel came on tuesday", "i bought it for my kitchen", "it is the blue model", "ordered it last month",
           "my sister has one too", "the box had a manual"]
LABELED = [(f"{n}, {w}", "positive") for n in NEUTRAL for w in POSITIVE] + \
          [(f"{n}, {w}", "negative") for n in NEUTRAL for w in NEGATIVE] + \
          [(w, "positive") for w in POSITIVE] + [(w, "negative") for w in NEGATIVE]

# The load: 36 sure texts and 4 unsure ones, each sent in 5 spellings the pipeline's `clean` step folds
# into one (so repeats hit the cache); the unsure ones are the tasks the cascade hands to the LLM.
SURE = LABELED[::3][:36]
UNSURE = NEUTRAL[:4]
SPELLINGS: list[Callable[[str], str]] = [str, str.capitalize, str.upper, lambda t: f"  {t} ", lambda t: t.title()]

# Span rows of one config version, by step, route and cache outcome (roots have neither).
SPANS_BY_ROUTE = """
SELECT SpanName, SpanAttributes[{route:String}] AS route, SpanAttributes[{cache:String}] AS cache, count(),
       max(toUInt32OrZero(SpanAttributes[{batch_size:String}]))
FROM otel_traces
WHERE SpanAttributes[{pipeline_attr:String}] = {pipeline:String}
  AND TraceId IN (SELECT TraceId FROM otel_traces
                  WHERE SpanName = {pipeline:String} AND SpanAttributes[{version_attr:String}] = {version:String})
GROUP BY SpanName, route, cache
"""


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _softmax_regression(x: np.ndarray, y: np.ndarray, steps: int = 500, rate: float = 0.5) -> tuple[np.ndarray, ...]:
    """Weights and bias by full-batch gradient descent on cross-entropy (soft targets allowed)."""
    w = np.zeros((x.shape[1], y.shape[1]), np.float32)
    b = np.zeros(y.shape[1], np.float32)
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - y) / len(x)
        w -= rate * (x.T @ grad + 1e-3 * w)
        b -= rate * grad.sum(axis=0)
    return w, b


def _build_models(folder: Path, reviews: ModuleType) -> None:
    """sentiment-fp32.onnx (features [N, 256] -> probabilities [N, 2]) and its dynamic int8 quantization."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    texts = [t for t, _ in LABELED] + NEUTRAL
    targets = [np.eye(2, dtype=np.float32)[reviews.LABELS.index(label)] for _, label in LABELED]
    y = np.array(targets + [[0.5, 0.5]] * len(NEUTRAL), np.float32)
    w, b = _softmax_regression(reviews.features(texts), y)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "weights"], ["scores"]),
         helper.make_node("Add", ["scores", "bias"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "sentiment", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w, "weights"), numpy_helper.from_array(b, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "sentiment-fp32.onnx")
    quantize_dynamic(folder / "sentiment-fp32.onnx", folder / "sentiment-int8.onnx", weight_type=QuantType.QInt8)


@pytest.fixture
def reviews_app(tmp_path) -> Path:
    """The README's reviews.py, written as is into a folder with the two models it loads."""
    section = _section("Run your own pipeline")
    (code,) = _blocks(section, "python")
    assert len(code.splitlines()) <= 30
    (shell,) = _blocks(section, "bash")
    assert "tracetune executor --pipeline reviews:reviews" in shell
    (tmp_path / "reviews.py").write_text(code)
    reviews = _module(tmp_path / "reviews.py")
    _build_models(tmp_path, reviews)
    for name in ("fp32", "int8"):  # both variants as the pipeline runs them: sure and right, or unsure
        variant = reviews.variant(tmp_path / f"sentiment-{name}.onnx")
        sure, unsure = variant([t for t, _ in SURE]), variant(UNSURE)
        assert [label for label, _ in sure] == [label for _, label in SURE], name
        assert min(confidence for _, confidence in sure) > 0.8 > 0.6 > max(confidence for _, confidence in unsure)
    return tmp_path


@pytest.fixture
def stack(reviews_app, tmp_path, monkeypatch) -> Iterator[Settings]:
    """Store, collector, tuner, stand-ins and `tracetune executor --pipeline reviews:reviews`, from the app's folder."""
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2, executor_config_poll_seconds=0.5)
    monkeypatch.chdir(reviews_app)  # the children start here: `reviews` imports and the model paths resolve
    with running_stack(settings, tmp_path, ("--pipeline", "reviews:reviews")):
        yield settings


def _tasks(texts: list[str], seed: int) -> list[str]:
    tasks = [spell(text) for text in texts for spell in SPELLINGS]
    random.Random(seed).shuffle(tasks)
    return tasks


def _send(settings: Settings, tasks: list[str]) -> list[dict]:
    """POST every task from 8 client threads; each must answer 200. The results, in task order."""
    url = f"{settings.executor_url}/v1/pipelines/{PIPELINE}/tasks"
    headers = {"Authorization": f"Bearer {settings.secret('executor')}"}
    with httpx.Client(timeout=60, headers=headers) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda text: client.post(url, json={"text": text}), tasks))
    failed = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not failed, failed[:3]
    return [r.json()["result"] for r in responses]


class _Metrics:
    """One scrape of the executor's /metrics; `value(name, **labels)` sums the matching samples (0 if none)."""

    def __init__(self, settings: Settings):
        text = httpx.get(settings.executor_metrics_url).text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        labels = {"pipeline": PIPELINE, **labels}
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())


def _spans(client, version: int) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(step, route, cache) -> (spans, largest batch) for the tasks that ran under config `version`."""
    rows = client.query(SPANS_BY_ROUTE, parameters={
        "route": attr.ROUTE, "cache": attr.CACHE, "batch_size": attr.BATCH_SIZE, "pipeline_attr": attr.PIPELINE,
        "pipeline": PIPELINE, "version_attr": attr.CONFIG_VERSION, "version": str(version)}).result_rows
    return {(step, route, cache): (spans, largest) for step, route, cache, spans, largest in rows}


def _count(spans: dict, step: str) -> int:
    return sum(n for (name, _, _), (n, _) in spans.items() if name == step)


def test_readme_pipeline_serves_reports_and_takes_knobs_by_name(stack: Settings):
    settings = stack
    assert httpx.get(f"{settings.executor_url}/health").json()["pipelines"] == {PIPELINE: 1}

    # The declaration reached the tuner: every knob the README's steps declare, with its defaults.
    spec = httpx.get(f"{settings.tuner_url}/v1/pipelines/{PIPELINE}/spec").json()
    sentiment, escalate = spec["steps"]["sentiment"], spec["steps"]["escalate"]
    assert set(sentiment) == {"route_weights", "batch_max_size", "batch_max_wait_ms", "cache_enabled",
                              "cache_ttl_seconds", "cache_max_entries"}
    assert set(escalate) == {"cascade_threshold", "max_concurrency", "timeout_seconds"}
    assert sentiment["route_weights"]["default"] == {"fp32": 0.5, "int8": 0.5}
    assert (sentiment["batch_max_size"]["default"], sentiment["cache_ttl_seconds"]["default"]) == (16, 300)
    assert escalate["cascade_threshold"]["default"] == 0.7
    assert spec["slo"] == {"p95_ms": 300, "error_rate": 0.01}

    # 200 tasks: sure ones answer the model's label, unsure ones what the LLM stand-in picked.
    tasks = _tasks([t for t, _ in SURE] + UNSURE, seed=1)
    results = _send(settings, tasks)
    expected = {spell(t): label for t, label in SURE for spell in SPELLINGS}
    escalated = sum(task not in expected for task in tasks)
    assert (len(tasks), escalated) == (200, 20)
    assert all(result["sentiment"] == expected.get(task, result["sentiment"])
               for task, result in zip(tasks, results, strict=True))
    assert {result["sentiment"] for result in results} <= {"negative", "positive"}

    before = _Metrics(settings)
    cache = {outcome: before.value("tracetune_cache_requests_total", step="sentiment", result=outcome)
             for outcome in ("hit", "miss", "bypass")}
    routes = {route: before.value("tracetune_route_requests_total", step="sentiment", route=route)
              for route in ("fp32", "int8")}
    assert cache["hit"] > 0 and cache["hit"] + cache["miss"] == 200 and cache["bypass"] == 0, cache
    assert min(routes.values()) > 0 and sum(routes.values()) == 200, routes
    assert before.value("tracetune_batch_size_count", step="sentiment") > 0
    assert before.value("tracetune_batch_size_sum", step="sentiment") == cache["miss"]  # every miss ran in a batch
    cascade = {outcome: before.value("tracetune_cascade_total", step="escalate", outcome=outcome)
               for outcome in ("answered", "failed", "unavailable")}
    assert cascade["answered"] > 0 and sum(cascade.values()) == escalated, cascade
    assert before.value("tracetune_tasks_total", status="ok") == 200
    assert before.value("tracetune_config_version") == 1

    # Every task's spans reach the store: both routes, cache hits, the unsure ones escalated to the LLM.
    client = store.connect(settings, ensure_schema=False)
    spans: dict = {}

    def arrived(version: int, count: int, escalations: int) -> bool:
        spans.clear()
        spans.update(_spans(client, version))
        return (_count(spans, PIPELINE), _count(spans, "sentiment"), _count(spans, "escalate")) == \
            (count, count, escalations)

    wait_until(lambda: arrived(1, 200, escalated), 30, 0.3, "200 tasks' spans under config version 1")
    assert {route for (step, route, _) in spans if step == "sentiment"} == {"fp32", "int8"}
    assert spans.get(("sentiment", "fp32", "hit")) or spans.get(("sentiment", "int8", "hit"))
    assert {(route, cache) for (step, route, cache) in spans if step == "escalate"} == {("llm", "")}

    # Knobs by name through the tuner: everything to int8, cache off, smaller batches.
    url = f"{settings.tuner_url}/v1/pipelines/{PIPELINE}/config"
    change = {"steps": {"sentiment": {"route_weights": {"fp32": 0.0, "int8": 1.0}, "cache_enabled": False,
                                      "batch_max_size": 4}}, "reason": "e2e"}
    assert httpx.patch(url, json=change).status_code == 401
    patched = httpx.patch(url, json=change, headers={"Authorization": f"Bearer {settings.secret('tuner')}"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2
    wait_until(lambda: httpx.get(f"{settings.executor_url}/health").json()["pipelines"][PIPELINE] == 2, 20, 0.1,
               "the executor on config version 2")
    knobs = _Metrics(settings)
    assert knobs.value("tracetune_config_version") == 2
    assert knobs.value("tracetune_knob_value", step="sentiment", knob="batch_max_size") == 4
    assert knobs.value("tracetune_knob_value", step="sentiment", knob="cache_enabled") == 0
    assert (knobs.value("tracetune_knob_value", step="sentiment", knob="route_weights.fp32"),
            knobs.value("tracetune_knob_value", step="sentiment", knob="route_weights.int8")) == (0, 1)

    # The same texts again (all cached before): int8 serves every one, past the cache, in batches of at most 4.
    sure = SURE[:8]
    results = _send(settings, _tasks([t for t, _ in sure], seed=2))
    assert sorted(result["sentiment"] for result in results) == sorted(label for _, label in sure for _ in SPELLINGS)
    after = _Metrics(settings)
    delta = lambda name, **labels: after.value(name, **labels) - before.value(name, **labels)
    assert (delta("tracetune_route_requests_total", step="sentiment", route="fp32"),
            delta("tracetune_route_requests_total", step="sentiment", route="int8")) == (0, 40)
    assert [delta("tracetune_cache_requests_total", step="sentiment", result=outcome)
            for outcome in ("hit", "miss", "bypass")] == [0, 0, 40]
    assert delta("tracetune_batch_size_sum", step="sentiment") == 40
    assert delta("tracetune_batch_size_count", step="sentiment") >= 10

    wait_until(lambda: arrived(2, 40, 0), 30, 0.3, "40 tasks' spans under config version 2")
    sentiment_spans = {key: value for key, value in spans.items() if key[0] == "sentiment"}
    assert set(sentiment_spans) == {("sentiment", "int8", "bypass")}
    assert 1 <= sentiment_spans["sentiment", "int8", "bypass"][1] <= 4

    _readme_commands_work_as_written(settings)


def _readme_commands_work_as_written(stack: Settings) -> None:
    """The section's curl lines (task, spec, knob change) against the stack, with its ports and token."""
    (shell,) = _blocks(_section("Run your own pipeline"), "bash")
    commands = [line for line in shell.replace("\\\n", " ").splitlines() if line.startswith("curl")]
    assert len(commands) == 3
    answers = []
    for command in commands:
        command = command.replace("127.0.0.1:9465", f"127.0.0.1:{stack.executor_port}") \
            .replace("127.0.0.1:8700", f"127.0.0.1:{stack.tuner_port}") \
            .replace(".tracetune/tuner.token", str(stack.home / "tuner.token")) \
            .replace(".tracetune/executor.token", str(stack.home / "executor.token")).split("  #")[0]
        done = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True,
                              timeout=60)
        body, _, status = done.stdout.rpartition("\n")
        assert status == "200", (command, done.stdout, done.stderr)
        answers.append(json.loads(body))
    assert answers[0]["result"]["sentiment"] == "positive"
    assert "batch_max_size" in answers[1]["steps"]["sentiment"]
    assert answers[2]["steps"]["sentiment"]["batch_max_size"] == 32
    assert answers[2]["steps"]["escalate"]["cascade_threshold"] == 0.6

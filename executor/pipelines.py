"""Pipelines are plain Python: a task is one root span, each step function a child span.

`ticket_triage` reads a support ticket, classifies it with a local ONNX model (routed between
fp32 and int8, batched, cached), escalates low-confidence tickets to a remote LLM, sets a priority,
files a CRM follow-up for urgent tickets (idempotent, retried, dead-lettered) and drafts a reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from tracetune.executor import metrics
from tracetune.executor.batcher import Batcher
from tracetune.executor.cache import TTLCache, normalise
from tracetune.executor.router import WeightedRouter, should_escalate
from tracetune.tuner.config import PipelineConfig, default_config

MAX_TICKET_CHARS = 4000


class StepError(Exception):
    """A task failed in a step for a reason worth showing the user (bad input, exhausted retries)."""

    trace_id: str = ""


@dataclass
class Task:
    text: str
    task_id: str = ""
    tenant: str = ""
    trace_id: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def result(self) -> dict[str, Any]:
        keys = ("category", "confidence", "route", "escalated", "priority", "followup_id", "reply")
        return {k: self.data[k] for k in keys if k in self.data}


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[..., None]
    when: Callable[[Task, PipelineConfig], bool] | None = None


class Pipeline:
    """Runs steps in order under one root span; subclasses define `steps`."""

    name = "pipeline"
    steps: list[Step] = []

    def __init__(self, tracer: trace.Tracer | None = None):
        self.tracer = tracer or trace.get_tracer("tracetune.executor")
        self._config = default_config(self.name)
        self._config_lock = threading.Lock()

    @property
    def config(self) -> PipelineConfig:
        return self._config

    def apply_config(self, config: PipelineConfig) -> None:
        """Swap in a new config; tasks already running finish under the one they started with."""
        with self._config_lock:
            self._config = config
        metrics.CONFIG_VERSION.labels(self.name).set(config.version)

    def run(self, text: str, tenant: str = "", task_id: str = "") -> Task:
        task = Task(text, task_id=task_id, tenant=tenant)
        config = self._config
        common = {"tracetune.pipeline": self.name}
        if tenant:
            common["tracetune.tenant"] = tenant
        metrics.TASKS_IN_FLIGHT.labels(self.name).inc()
        try:
            with self.tracer.start_as_current_span(self.name, kind=trace.SpanKind.SERVER, attributes={
                **common, "tracetune.config_version": config.version, "tracetune.task_id": task_id,
            }) as root:
                task.trace_id = f"{root.get_span_context().trace_id:032x}"
                for step in self.steps:
                    if step.when is not None and not step.when(task, config):
                        continue
                    started = time.perf_counter()
                    with self.tracer.start_as_current_span(step.name, attributes={
                        **common, "tracetune.step": step.name}) as span:
                        try:
                            step.run(self, task, span, config)
                        finally:
                            metrics.STEP_SECONDS.labels(self.name, step.name).observe(time.perf_counter() - started)
                root.set_attribute("tracetune.outcome", task.data.get("category", ""))
            metrics.TASKS_TOTAL.labels(self.name, "ok").inc()
            return task
        except StepError as exc:
            exc.trace_id = task.trace_id
            metrics.TASKS_TOTAL.labels(self.name, "error").inc()
            raise
        except Exception:
            metrics.TASKS_TOTAL.labels(self.name, "error").inc()
            raise
        finally:
            metrics.TASKS_IN_FLIGHT.labels(self.name).dec()

    def close(self) -> None:
        pass


# ---- ticket triage -----------------------------------------------------------------------------

_URGENT = ("urgent", "asap", "locked", "charged twice", "crash", "error 500", "frustrating")


def _normalize(pipeline: TicketTriage, task: Task, span: trace.Span, _: PipelineConfig) -> None:
    text = " ".join(task.text.split())
    span.set_attribute("tracetune.feature.text_length", len(text))
    if not text:
        raise StepError("empty ticket: nothing to triage")
    if len(text) > MAX_TICKET_CHARS:
        raise StepError(f"ticket of {len(text)} characters exceeds the {MAX_TICKET_CHARS}-character limit")
    task.data["text"] = text
    span.set_attribute("tracetune.feature.word_count", len(text.split()))


def _classify(pipeline: TicketTriage, task: Task, span: trace.Span, config: PipelineConfig) -> None:
    step = config.step("classify")
    route = pipeline.route(config)
    span.set_attribute("tracetune.route", route)
    key = f"{route}:{normalise(task.data['text'])}"
    cached = pipeline.cache.get(key) if step.cache_enabled else TTLCache.MISSING
    if cached is not TTLCache.MISSING:
        category, confidence = cached
        span.set_attribute("tracetune.cache", "hit")
        metrics.CACHE_TOTAL.labels("classify", "hit").inc()
    else:
        span.set_attribute("tracetune.cache", "miss" if step.cache_enabled else "bypass")
        metrics.CACHE_TOTAL.labels("classify", "miss" if step.cache_enabled else "bypass").inc()
        result = pipeline.batchers[route].submit(task.data["text"]).result(timeout=60)
        category, confidence = result.value
        span.set_attribute("tracetune.batch_size", result.batch_size)
        span.set_attribute("tracetune.queue_ms", round(result.queue_ms, 3))
        if step.cache_enabled:
            pipeline.cache.put(key, (category, confidence))
    span.set_attribute("tracetune.feature.category", category)
    span.set_attribute("tracetune.feature.confidence", round(confidence, 4))
    task.data.update(category=category, confidence=confidence, route=route, escalated=False)


def _needs_escalation(task: Task, config: PipelineConfig) -> bool:
    return should_escalate(task.data["confidence"], config.thresholds.get("escalate_below_confidence", 0.0))


def _escalate(pipeline: TicketTriage, task: Task, span: trace.Span, _: PipelineConfig) -> None:
    """Cascade: the remote model decides. If it cannot answer, the local answer stands (span marked)."""
    span.set_attribute("tracetune.route", "llm")
    if pipeline.llm is None:
        span.set_attribute("tracetune.escalation", "unavailable")
        return
    try:
        answer = pipeline.llm(task.data["text"], pipeline.labels)
    except Exception as exc:  # noqa: BLE001 - LLMError, exhausted retries, timeouts: degrade, don't fail
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"remote model failed, local answer kept: {exc}"[:300]))
        span.set_attribute("tracetune.escalation", "failed")
        return
    span.set_attribute("tracetune.escalation", "answered")
    span.set_attribute("tracetune.feature.category", answer.label)
    task.data.update(category=answer.label, escalated=True, local_category=task.data["category"])


def _prioritize(pipeline: TicketTriage, task: Task, span: trace.Span, config: PipelineConfig) -> None:
    text = task.data["text"].lower()
    urgent = any(word in text for word in _URGENT)
    if urgent or task.data["category"] in ("login", "bug"):
        priority = "P1" if urgent else "P2"
    else:
        priority = "P3"
    task.data["priority"] = priority
    span.set_attribute("tracetune.feature.priority", priority)


def _wants_followup(task: Task, _: PipelineConfig) -> bool:
    return task.data["priority"] == "P1"


def _create_followup(pipeline: TicketTriage, task: Task, span: trace.Span, _: PipelineConfig) -> None:
    span.set_attribute("tracetune.route", "crm")
    if pipeline.followups is None:
        return
    from tracetune.executor.effects import SideEffectFailed

    payload = {"task_id": task.task_id, "category": task.data["category"], "priority": task.data["priority"],
               "tenant": task.tenant, "summary": task.data["text"][:200]}
    try:
        answer = pipeline.followups(task.task_id or task.trace_id, payload)
    except SideEffectFailed as exc:
        if exc.dead_lettered:
            metrics.DEAD_LETTERS_TOTAL.labels(pipeline.name, "create_followup").inc()
        metrics.RETRIES_TOTAL.labels(pipeline.name, "create_followup").inc(max(0, exc.attempts - 1))
        raise StepError(str(exc)) from None
    retries = getattr(span, "attributes", {}).get("tracetune.retries", 0)
    metrics.RETRIES_TOTAL.labels(pipeline.name, "create_followup").inc(retries)
    task.data["followup_id"] = str(answer.get("id", ""))


_REPLIES = {
    "billing": "We are reviewing the charges on your account and will correct any error.",
    "login": "Here is how to regain access: reset your password from the sign-in page.",
    "shipping": "We have asked the carrier for an update on your delivery.",
    "refund": "Your refund request is logged; refunds reach your card in 5-10 business days.",
    "bug": "Thanks for the report; our engineers are reproducing the problem.",
    "account": "We can make that change to your account once you confirm the details.",
    "feature_request": "Thank you for the suggestion; we have shared it with the product team.",
    "cancellation": "We are sorry to see you go; your cancellation is being processed.",
}


def _draft_reply(pipeline: TicketTriage, task: Task, span: trace.Span, _: PipelineConfig) -> None:
    reply = _REPLIES.get(task.data["category"], "Thanks for reaching out; a specialist will reply.")
    if task.data.get("followup_id"):
        reply += f" Follow-up {task.data['followup_id']} is open with our team."
    task.data["reply"] = f"Hello, {reply} (priority {task.data['priority']})"
    span.set_attribute("tracetune.feature.reply_length", len(task.data["reply"]))


class TicketTriage(Pipeline):
    name = "ticket_triage"
    steps = [
        Step("normalize", _normalize),
        Step("classify", _classify),
        Step("escalate", _escalate, _needs_escalation),
        Step("prioritize", _prioritize),
        Step("create_followup", _create_followup, _wants_followup),
        Step("draft_reply", _draft_reply),
    ]

    def __init__(self, classifiers: dict[str, Any], tracer: trace.Tracer | None = None,
                 cache: TTLCache | None = None, llm: Callable[[str, list[str]], Any] | None = None,
                 followups: Callable[[str, dict], dict] | None = None, seed: int | None = None):
        """`classifiers` maps a route (model variant, e.g. fp32 / int8) to an object with `predict(texts)`
        returning (label, confidence) pairs, `labels` and (optionally) `token_lengths(texts)`."""
        super().__init__(tracer)
        if not classifiers:
            raise ValueError("ticket_triage needs at least one classifier variant")
        self.classifiers = classifiers
        self.labels: list[str] = list(next(iter(classifiers.values())).labels)
        self.cache = cache or TTLCache(max_entries=20_000, ttl_seconds=600)
        self.llm = llm
        self.followups = followups
        self.router = WeightedRouter(self._weights(self.config), seed)
        step = self.config.step("classify")

        def on_batch(size: int, _: float) -> None:
            metrics.BATCH_SIZE.labels("classify").observe(size)

        self.batchers: dict[str, Batcher] = {}
        for route, classifier in classifiers.items():
            length = getattr(classifier, "token_lengths", None)
            self.batchers[route] = Batcher(
                f"classify:{route}", classifier.predict, step.batch_max_size, step.batch_max_wait_ms,
                tracer=self.tracer, on_batch=on_batch,
                length=(lambda text, f=length: f([text])[0]) if length else None,
                bucket_by_length=step.length_bucketing,
                attributes={"tracetune.batch_of": "classify", "tracetune.batch_pipeline": self.name,
                            "tracetune.route": route})
        cache = self.cache
        metrics.CACHE_HIT_RATIO.labels("classify").set_function(
            lambda: cache.hits / max(1, cache.hits + cache.misses))
        metrics.QUEUE_DEPTH.labels("classify").set_function(lambda: sum(b.depth for b in self.batchers.values()))

    def _weights(self, config: PipelineConfig) -> dict[str, float]:
        weights = {r: w for r, w in config.route_weights.get("classify", {}).items() if r in self.classifiers}
        return weights or {next(iter(self.classifiers)): 1.0}

    def route(self, config: PipelineConfig) -> str:
        return self.router.choose()

    def apply_config(self, config: PipelineConfig) -> None:
        step = config.step("classify")
        for batcher in self.batchers.values():
            batcher.configure(step.batch_max_size, step.batch_max_wait_ms, step.length_bucketing)
        self.router.set_weights(self._weights(config))
        super().apply_config(config)

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        for resource in (getattr(self.llm, "__self__", None), self.followups):
            if hasattr(resource, "close"):
                resource.close()

"""Pipelines are plain Python: a task is one root span, each step function a child span.

`ticket_triage` reads a support ticket, classifies it with the ONNX model (batched, cached),
sets a priority and drafts a reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from executor import metrics
from executor.batcher import Batcher
from executor.cache import TTLCache, normalise
from executor.models import TicketClassifier
from tuner.config import PipelineConfig, default_config

MAX_TICKET_CHARS = 4000


class StepError(Exception):
    """A task failed in a step for a reason worth showing the user (bad input, not a crash)."""


@dataclass
class Task:
    text: str
    data: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Runs steps in order under one root span; subclasses define `steps`."""

    name = "pipeline"
    steps: list[tuple[str, Callable[[Task, trace.Span], None]]] = []

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

    def run(self, text: str) -> Task:
        task = Task(text)
        config = self._config
        metrics.TASKS_IN_FLIGHT.labels(self.name).inc()
        try:
            with self.tracer.start_as_current_span(self.name, kind=trace.SpanKind.SERVER, attributes={
                "tracetune.pipeline": self.name, "tracetune.config_version": config.version,
            }) as root:
                for step_name, step in self.steps:
                    started = time.perf_counter()
                    with self.tracer.start_as_current_span(step_name, attributes={
                        "tracetune.pipeline": self.name, "tracetune.step": step_name,
                    }) as span:
                        try:
                            step(self, task, span, config)
                        finally:
                            metrics.STEP_SECONDS.labels(self.name, step_name).observe(time.perf_counter() - started)
                root.set_attribute("tracetune.outcome", task.data.get("category", ""))
            metrics.TASKS_TOTAL.labels(self.name, "ok").inc()
            return task
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
    route = "fp32"
    span.set_attribute("tracetune.route", route)
    key = normalise(task.data["text"])
    cached = pipeline.cache.get(key) if step.cache_enabled else TTLCache.MISSING
    if cached is not TTLCache.MISSING:
        category, confidence = cached
        span.set_attribute("tracetune.cache", "hit")
        metrics.CACHE_TOTAL.labels("classify", "hit").inc()
    else:
        span.set_attribute("tracetune.cache", "miss" if step.cache_enabled else "bypass")
        metrics.CACHE_TOTAL.labels("classify", "miss" if step.cache_enabled else "bypass").inc()
        result = pipeline.batcher.submit(task.data["text"]).result(timeout=30)
        category, confidence = result.value
        span.set_attribute("tracetune.batch_size", result.batch_size)
        span.set_attribute("tracetune.queue_ms", round(result.queue_ms, 3))
        if step.cache_enabled:
            pipeline.cache.put(key, (category, confidence))
    span.set_attribute("tracetune.feature.category", category)
    span.set_attribute("tracetune.feature.confidence", round(confidence, 4))
    task.data.update(category=category, confidence=confidence)


def _prioritize(pipeline: TicketTriage, task: Task, span: trace.Span, config: PipelineConfig) -> None:
    text = task.data["text"].lower()
    urgent = any(word in text for word in _URGENT)
    if urgent or task.data["category"] in ("login", "bug"):
        priority = "P1" if urgent else "P2"
    else:
        priority = "P3"
    low_confidence = task.data["confidence"] < config.thresholds.get("escalate_below_confidence", 0.0)
    task.data.update(priority=priority, needs_review=low_confidence)
    span.set_attribute("tracetune.feature.priority", priority)


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
    if task.data["needs_review"]:
        reply += " A member of our team will review your ticket personally."
    task.data["reply"] = f"Hello, {reply} (priority {task.data['priority']})"
    span.set_attribute("tracetune.feature.reply_length", len(task.data["reply"]))


class TicketTriage(Pipeline):
    name = "ticket_triage"
    steps = [("normalize", _normalize), ("classify", _classify), ("prioritize", _prioritize),
             ("draft_reply", _draft_reply)]

    def __init__(self, classifier: TicketClassifier, tracer: trace.Tracer | None = None,
                 cache: TTLCache | None = None):
        super().__init__(tracer)
        self.classifier = classifier
        self.cache = cache or TTLCache(max_entries=20_000, ttl_seconds=600)
        step = self.config.step("classify")

        def on_batch(size: int, _: float) -> None:
            metrics.BATCH_SIZE.labels("classify").observe(size)

        self.batcher = Batcher("classify", classifier.predict, step.batch_max_size, step.batch_max_wait_ms,
                               tracer=self.tracer, on_batch=on_batch)

    def apply_config(self, config: PipelineConfig) -> None:
        step = config.step("classify")
        self.batcher.configure(step.batch_max_size, step.batch_max_wait_ms)
        super().apply_config(config)

    def close(self) -> None:
        self.batcher.close()

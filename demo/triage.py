"""The demo pipeline, `ticket_triage`, built on the public executor runtime like any user's pipeline.

It reads a support ticket, classifies it with a local ONNX model (MiniLM fp32 or int8, routed by
weight, batched by length, cached), escalates low-confidence tickets to a remote LLM (a cascade),
sets a priority, files a CRM follow-up for urgent tickets (idempotent, retried, dead-lettered) and
drafts a reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from tracetune.executor import (
    Batching,
    Cache,
    Cascade,
    ChatClient,
    DeadLetters,
    Effect,
    Infer,
    Pipeline,
    Remote,
    RetryPolicy,
    Step,
    StepError,
    Task,
)
from tracetune.settings import Settings

NAME = "ticket_triage"
VARIANTS = ("fp32", "int8")
MAX_TICKET_CHARS = 4000
# The SLO the demo starts with until its owner sets another (PUT /v1/pipelines/ticket_triage/slo).
SLO = {"p95_ms": 500.0, "p99_ms": 1500.0, "error_rate": 0.02, "cost_per_1k": 0.5, "quality_floor": 0.85}

_URGENT = ("urgent", "asap", "locked", "charged twice", "crash", "error 500", "frustrating")
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


def normalize(task: Task) -> None:
    span = trace.get_current_span()
    text = " ".join(task.text.split())
    span.set_attribute("tracetune.feature.text_length", len(text))
    if not text:
        raise StepError("empty ticket: nothing to triage")
    if len(text) > MAX_TICKET_CHARS:
        raise StepError(f"ticket of {len(text)} characters exceeds the {MAX_TICKET_CHARS}-character limit")
    task.data["text"] = text
    span.set_attribute("tracetune.feature.word_count", len(text.split()))


def prioritize(task: Task) -> None:
    text = task.data["text"].lower()
    urgent = any(word in text for word in _URGENT)
    if urgent or task.data["classify"] in ("login", "bug"):
        priority = "P1" if urgent else "P2"
    else:
        priority = "P3"
    task.data["priority"] = priority
    trace.get_current_span().set_attribute("tracetune.feature.priority", priority)


def followup_payload(task: Task) -> dict[str, Any]:
    return {"task_id": task.task_id, "category": task.data["classify"], "priority": task.data["priority"],
            "tenant": task.tenant, "summary": task.data["text"][:200]}


def draft_reply(task: Task) -> None:
    reply = _REPLIES.get(task.data["classify"], "Thanks for reaching out; a specialist will reply.")
    followup = task.data.get("create_followup") or {}
    if followup.get("id"):
        reply += f" Follow-up {followup['id']} is open with our team."
    task.data["reply"] = f"Hello, {reply} (priority {task.data['priority']})"
    trace.get_current_span().set_attribute("tracetune.feature.reply_length", len(task.data["reply"]))


def result(task: Task) -> dict[str, Any]:
    answer = {"category": task.data["classify"], "confidence": task.confidence.get("classify"),
              "route": task.routes.get("classify"), "escalated": "classify" in task.escalated,
              "priority": task.data["priority"], "reply": task.data["reply"]}
    followup = task.data.get("create_followup") or {}
    if followup.get("id"):
        answer["followup_id"] = str(followup["id"])
    return answer


def build(classifiers: Mapping[str, Any], *, llm: ChatClient | None = None, crm_url: str | None = None,
          dead_letters: DeadLetters | None = None, policy: RetryPolicy | None = None, seed: int | None = None,
          tracer: trace.Tracer | None = None) -> Pipeline:
    """The pipeline over `classifiers` (route -> object with `predict(texts)` giving (label, confidence),
    `labels` and `token_lengths(texts)`), escalating to `llm` and filing follow-ups at `crm_url`."""
    if not classifiers:
        raise ValueError("ticket_triage needs at least one classifier variant")
    first = next(iter(classifiers.values()))
    labels = list(first.labels)
    weights = {"fp32": 0.8, "int8": 0.2} if set(classifiers) == set(VARIANTS) else None
    urgent = lambda task: task.data["priority"] == "P1"
    if crm_url:
        followup: Step = Effect("create_followup", crm_url.rstrip("/") + "/v1/followups", followup_payload,
                                when=urgent, route="crm", dead_letters=dead_letters, policy=policy,
                                limits=Remote(max_concurrency=8, timeout_seconds=5.0))
    else:
        followup = Step("create_followup", when=urgent,
                        fn=lambda task: trace.get_current_span().set_attribute("tracetune.route", "crm"))
    return Pipeline(NAME, [
        Step("normalize", normalize),
        Infer("classify", {route: c.predict for route, c in classifiers.items()}, weights=weights, seed=seed,
              batching=Batching(max_size=8, max_wait_ms=5.0, length=lambda text: first.token_lengths([text])[0]),
              cache=Cache(ttl_seconds=600, max_entries=20_000), feature="category"),
        Cascade("escalate", after="classify", remote=llm.classifier(labels) if llm else None, threshold=0.45,
                route="llm", feature="category", limits=Remote(max_concurrency=32, timeout_seconds=10.0)),
        Step("prioritize", prioritize),
        followup,
        Step("draft_reply", draft_reply),
    ], slo=SLO, result=result, outcome=lambda task: task.data["classify"], tracer=tracer)


def ticket_triage(settings: Settings) -> Pipeline:
    """The demo as `tracetune executor` runs it: models from `settings.models_dir` (built on first use),
    the LLM and CRM from settings, dead letters in the store."""
    from tracetune import store
    from tracetune.demo.models import TicketClassifier, build_models

    build_models(settings.models_dir)
    classifiers = {variant: TicketClassifier(settings.models_dir, variant=variant) for variant in VARIANTS}
    llm = ChatClient(settings.llm_base_url, settings.llm_model, api_key=settings.llm_api_key)
    dead_letters = DeadLetters(lambda: store.connect(settings, ensure_schema=False))
    return build(classifiers, llm=llm, crm_url=settings.crm_base_url, dead_letters=dead_letters)

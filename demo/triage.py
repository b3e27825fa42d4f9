"""The demo pipeline, `ticket_triage`, built on the public executor runtime like any user's pipeline.

It reads a support ticket, classifies it with a local ONNX model (MiniLM fp32 or int8, routed by
weight, batched by length, cached), escalates low-confidence tickets to a hosted LLM (a cascade
routed by weight between a cheap and a pricier, more accurate tier, with an answer cache the owner
or the tuner may switch on), sets a priority, files a CRM follow-up for urgent tickets (idempotent,
retried, dead-lettered) and drafts a reply. With the default knobs the LLM tokens are most of the
cost (docs/cost.md, "How the demo is calibrated").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from tracetune.base.settings import Settings
from tracetune.executor import (
    Batching,
    Cache,
    Cascade,
    ChatClient,
    DeadLetters,
    Effect,
    Infer,
    InputError,
    Pipeline,
    Remote,
    RetryPolicy,
    Step,
    Task,
)

NAME = "ticket_triage"
VARIANTS = ("fp32", "int8")
# The escalate step's routes, one per LLM tier (settings llm_model and llm_large_model), and their default
# weights.
LLM_TIERS = ("llm-small", "llm-large")
LLM_WEIGHTS = {"llm-small": 0.7, "llm-large": 0.3}
# Below this classify confidence a ticket escalates: about 11% of the demo's tickets.
CASCADE_THRESHOLD = 0.6
MAX_TICKET_CHARS = 4000
# The SLO the demo starts with until its owner sets another (PUT /v1/pipelines/ticket_triage/slo).
# classify alone is right on about 92% of tickets; the floor needs some escalation, so the cascade
# threshold and the tier weights trade cost against quality.
SLO = {"p95_ms": 500.0, "p99_ms": 1500.0, "error_rate": 0.02, "cost_per_1k": 0.012, "quality_floor": 0.93}

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
        raise InputError("empty ticket: nothing to triage")
    if len(text) > MAX_TICKET_CHARS:
        raise InputError(f"ticket of {len(text)} characters exceeds the {MAX_TICKET_CHARS}-character limit")
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


def build(classifiers: Mapping[str, Any], *, llm: ChatClient | Mapping[str, ChatClient] | None = None,
          crm_url: str | None = None, dead_letters: DeadLetters | None = None, policy: RetryPolicy | None = None,
          seed: int | None = None, tracer: trace.Tracer | None = None) -> Pipeline:
    """The pipeline over `classifiers` (route -> object with `predict(texts)` giving (label, confidence),
    `labels` and `token_lengths(texts)`), escalating to `llm` (one client on route `llm`, or route ->
    client, weighed by LLM_WEIGHTS when the routes are LLM_TIERS) and filing follow-ups at `crm_url`."""
    if not classifiers:
        raise ValueError("ticket_triage needs at least one classifier variant")
    first = next(iter(classifiers.values()))
    labels = list(first.labels)
    weights = {"fp32": 0.8, "int8": 0.2} if set(classifiers) == set(VARIANTS) else None
    if isinstance(llm, Mapping):
        remote: Any = {route: client.classifier(labels) for route, client in llm.items()}
        llm_weights = LLM_WEIGHTS if set(llm) == set(LLM_TIERS) else None
    else:
        remote, llm_weights = (llm.classifier(labels) if llm else None), None
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
        Cascade("escalate", after="classify", remote=remote, weights=llm_weights, threshold=CASCADE_THRESHOLD,
                route="llm", feature="category", limits=Remote(max_concurrency=32, timeout_seconds=10.0),
                cache=Cache(enabled=False, ttl_seconds=600, max_entries=20_000),
                seed=None if seed is None else seed + 1),
        Step("prioritize", prioritize),
        followup,
        Step("draft_reply", draft_reply),
    ], slo=SLO, result=result, outcome=lambda task: task.data["classify"], tracer=tracer)


def ticket_triage(settings: Settings) -> Pipeline:
    """The demo as `tracetune executor` runs it: models from `settings.models_dir` (built on first use),
    the two LLM tiers (`llm_model`, `llm_large_model`) and the CRM from settings, dead letters in the store."""
    from tracetune import store
    from tracetune.demo.models import TicketClassifier, build_models

    build_models(settings.models_dir)
    classifiers = {variant: TicketClassifier(settings.models_dir, variant=variant) for variant in VARIANTS}
    llm = {route: ChatClient(settings.llm_base_url, model, api_key=settings.llm_api_key)
           for route, model in zip(LLM_TIERS, (settings.llm_model, settings.llm_large_model), strict=True)}
    dead_letters = DeadLetters(lambda: store.connect(settings, ensure_schema=False))
    return build(classifiers, llm=llm, crm_url=settings.crm_base_url, dead_letters=dead_letters)

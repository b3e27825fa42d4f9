"""Seeded traffic the dashboard tests read, and its figures worked out by hand (not by the analyzer).

Three pipelines over the last four minutes, with tenants, failures, cache and batch attributes: the demo's
ticket_triage, the README's reviews (a cascade to an LLM, some of it answered from the cache, so without a
model) and an OpenTelemetry app's support_bot (a batched LLM step). An earlier hour of ticket_triage without
its follow-up step (what the Cost page compares with); a few spans three hours back; an SLO; tuner configs
with decisions (one clamped, with route weights) and a canary; alerts and a silence.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tests.spans import COLUMNS, span_row
from tracetune import analyzer

# pipeline -> [(step, calls, failed calls, base latency ms)]; a failed step ends its request,
# so later steps see fewer calls.
PIPELINES = {
    "ticket_triage": [("embed", 40, 0, 12.0), ("classify", 40, 3, 45.0), ("route", 37, 0, 4.0),
                      ("create_followup", 37, 0, 20.0)],
    "support_bot": [("retrieve", 25, 0, 30.0), ("rerank", 25, 0, 80.0), ("generate", 25, 2, 600.0)],
    "reviews": [("clean", 30, 0, 2.0), ("sentiment", 30, 0, 15.0), ("escalate", 30, 1, 300.0)],
}
# Routes as priced in the bundled prices.toml (create_followup has none: it is priced per call).
# reviews/clean has no route and no price: it costs nothing (it is not unpriced either).
ROUTES = {"embed": "int8", "classify": "fp32", "route": "fp32", "retrieve": "fp32", "rerank": "fp32",
          "generate": "llm", "sentiment": "int8", "escalate": "llm"}
LLM_MODEL, OUTPUT_TOKENS = "gpt-4o-mini", 50  # generate's i-th call reads 300 + i input tokens
# reviews/escalate's i-th call asks ESCALATE_MODEL with 120 + i input tokens, unless the cache answers it
# (every third call): then the span has the route but no model and no tokens, and costs nothing.
ESCALATE_MODEL, ESCALATE_OUTPUT_TOKENS = "gpt-4o", 5
GENERATE_BATCH, GENERATE_QUEUE_MS = 2, 7.5  # generate runs batched (its route costs nothing per second)
SECONDS_APART = 5  # one request of each pipeline every 5 s from four minutes ago


def tenant_of(pipeline: str, request: int) -> str:
    return "acme" if pipeline == "support_bot" or request % 2 else "globex"


def cache_of(step: str, index: int) -> str | None:
    """embed looks its input up in a cache: every fourth call hits; escalate: every third."""
    if step == "embed":
        return "hit" if index % 4 == 0 else "miss"
    if step == "escalate":
        return "hit" if index % 3 == 2 else "miss"
    return None


# The earlier period: ticket_triage an hour and twenty minutes ago, without its follow-up step.
EARLIER_REQUESTS, EARLIER_MINUTES_AGO = 20, 80
EARLIER_STEPS = [("embed", 12.0), ("classify", 45.0), ("route", 4.0)]
OLD_EMBED_CALLS = 5  # extra ticket_triage/embed calls three hours ago: only in the 6h window
# One support_bot task three hours ago (only in the 6h window): its SLO then has more than the hour of data
# the shortest rule's long window needs before anything but "not enough data" is said (analyzer.enough_data).
OLD_SUPPORT_TASK_HOURS = 3
# support_bot's SLO: 2 of its 25 requests fail, 80x its 0.1% budget, so the budget is spent; its requests take
# at most ~1.8 s, so the 60 s p95 target holds (on track). A cost budget draws a line on the cost chart.
SLO = analyzer.SLO(pipeline="support_bot", error_rate=0.001, p95_ms=60_000, cost_per_1k=0.05)


def durations_ms(base: float, calls: int) -> list[float]:
    """Deterministic spread: base .. ~2.5x base, so p50 < p95 < p99."""
    return [round(base * (1 + 1.5 * (i / max(1, calls - 1)) ** 3), 3) for i in range(calls)]


@dataclass
class Request:
    """One seeded task: its pipeline, tenant, trace id, whether it failed, and its steps (step, ns, call index)."""

    pipeline: str
    tenant: str
    trace_id: str
    failed: bool
    steps: list[tuple[str, int, int]] = field(default_factory=list)
    earlier: bool = False


def _span(start_ns: int, trace: str, parent: str, name: str, duration_ns: int, attrs: dict[str, str],
          error: bool, span_id: str = "") -> list:
    return span_row(start_ns, trace_id=trace, span_id=span_id or uuid.uuid4().hex[:16], parent=parent, name=name,
                    service="tracetune-executor", resource={"service.name": "tracetune-executor"},
                    scope=("tracetune", "0.1.0"), attrs=attrs, duration=duration_ns,
                    status="STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET",
                    status_message="step failed" if error else "")


def _step_attrs(pipeline: str, step: str, index: int, tenant: str) -> dict[str, str]:
    attrs = {"tracetune.pipeline": pipeline, "tracetune.step": step, "tracetune.tenant": tenant}
    if step in ROUTES:
        attrs["tracetune.route"] = ROUTES[step]
    if cache_of(step, index):
        attrs["tracetune.cache"] = cache_of(step, index)
    if step == "generate":
        attrs |= {"gen_ai.request.model": LLM_MODEL, "gen_ai.usage.input_tokens": str(300 + index),
                  "gen_ai.usage.output_tokens": str(OUTPUT_TOKENS),
                  "tracetune.batch_size": str(GENERATE_BATCH), "tracetune.queue_ms": str(GENERATE_QUEUE_MS)}
    if step == "escalate" and cache_of(step, index) != "hit":
        attrs |= {"gen_ai.request.model": ESCALATE_MODEL, "gen_ai.usage.input_tokens": str(120 + index),
                  "gen_ai.usage.output_tokens": str(ESCALATE_OUTPUT_TOKENS)}
    return attrs


def seed_spans(client) -> list[Request]:
    """Root and step spans for each request, spread over the last four minutes (and the earlier ones)."""
    now = time.time_ns()
    rows, requests = [], []
    made = {(p, step): 0 for p, steps in PIPELINES.items() for step, *_ in steps}
    for pipeline, steps in PIPELINES.items():
        for request in range(steps[0][1]):
            start = now - int(240e9) + request * int(SECONDS_APART * 1e9)
            seeded = Request(pipeline, tenant_of(pipeline, request), uuid.uuid4().hex, False)
            root = uuid.uuid4().hex[:16]
            offset = 0
            for step, calls, errors, base in steps:
                if seeded.failed:
                    break
                index = made[pipeline, step]
                made[pipeline, step] += 1
                duration = int(durations_ms(base, calls)[index] * 1e6)
                seeded.failed = index < errors
                rows.append(_span(start + offset, seeded.trace_id, root, f"{pipeline}.{step}", duration,
                                  _step_attrs(pipeline, step, index, seeded.tenant), seeded.failed))
                seeded.steps.append((step, duration, index))
                offset += duration
            rows.append(_span(start, seeded.trace_id, "", pipeline, offset,
                              {"tracetune.pipeline": pipeline, "tracetune.tenant": seeded.tenant}, seeded.failed,
                              span_id=root))
            requests.append(seeded)
    assert made == {(p, step): calls for p, steps in PIPELINES.items() for step, calls, *_ in steps}
    for request in range(EARLIER_REQUESTS):
        start = now - EARLIER_MINUTES_AGO * int(60e9) + request * int(1e9)
        seeded = Request("ticket_triage", tenant_of("ticket_triage", request), uuid.uuid4().hex, False, earlier=True)
        root = uuid.uuid4().hex[:16]
        offset = 0
        for step, ms in EARLIER_STEPS:
            duration = int(ms * 1e6)
            rows.append(_span(start + offset, seeded.trace_id, root, f"ticket_triage.{step}", duration,
                              _step_attrs("ticket_triage", step, 1, seeded.tenant), False))
            seeded.steps.append((step, duration, 1))
            offset += duration
        rows.append(_span(start, seeded.trace_id, "", "ticket_triage", offset,
                          {"tracetune.pipeline": "ticket_triage", "tracetune.tenant": seeded.tenant}, False,
                          span_id=root))
        requests.append(seeded)
    old_task = now - OLD_SUPPORT_TASK_HOURS * int(3600e9)  # the SLO's data covers its first rule's long window
    rows.append(_span(old_task, uuid.uuid4().hex, "", "support_bot", int(500e6),
                      {"tracetune.pipeline": "support_bot", "tracetune.tenant": "acme"}, False))
    for i in range(OLD_EMBED_CALLS):
        attrs = {"tracetune.pipeline": "ticket_triage", "tracetune.step": "embed"}
        rows.append(_span(now - int(3 * 3600e9) + i * int(1e9), uuid.uuid4().hex, uuid.uuid4().hex[:16],
                          "ticket_triage.embed", int(15e6), attrs, False))
    client.insert("otel_traces", rows, column_names=COLUMNS)
    return requests


def step_cost(step: str, duration_ns: int, index: int, prices: analyzer.PriceTable) -> tuple[float, float]:
    """(token cost, all cost) of one step call by hand: compute = its time x the route's price per second
    (a batched call's compute comes from batch spans: none are seeded), tokens by model, per-call price."""
    batched = step == "generate"
    compute = 0.0 if batched else duration_ns / 1e9 * prices.routes.get(ROUTES.get(step, ""), 0.0)
    tokens = 0.0
    if step == "generate":
        model = prices.models[LLM_MODEL]
        tokens = ((300 + index) * model.input_per_1m + OUTPUT_TOKENS * model.output_per_1m) / 1e6
    if step == "escalate" and cache_of(step, index) != "hit":
        model = prices.models[ESCALATE_MODEL]
        tokens = ((120 + index) * model.input_per_1m + ESCALATE_OUTPUT_TOKENS * model.output_per_1m) / 1e6
    return tokens, compute + tokens + prices.calls.get(step, 0.0)


def request_cost(request: Request, prices: analyzer.PriceTable) -> float:
    return sum(step_cost(step, ns, index, prices)[1] for step, ns, index in request.steps)


# ---- the tuner's side: a declared pipeline, a tuning decision observed, a canary in flight --------------------

def seed_tuner(client) -> dict:
    """ticket_triage declared (version 1), tuned to version 2 with a prediction and an observation, and version 3
    on trial as a canary; returns what was stored."""
    from tracetune.tuner import canary, decisions, versions
    from tracetune.tuner.config import Knob, PipelineSpec

    spec = PipelineSpec("ticket_triage", {
        "embed": {"cache_enabled": Knob("bool", True)},
        "classify": {"batch_max_size": Knob("int", 8, 1, 64, "items"), "batch_wait_ms": Knob("float", 5.0, 0, 50)},
    })
    first, _ = versions.register(client, spec)
    second = versions.change(client, spec, {"classify": {"batch_max_size": 16}}, "tuner", "bigger batches")
    tune = decisions.Decision("ticket_triage", "tune", first.version, second.version, first.to_dict(),
                              second.to_dict(), "p95 has headroom: bigger batches cost less",
                              predicted={"p95_ms": 100.0, "cost_per_1k": 0.4},
                              decided_at=datetime.now(UTC) - timedelta(minutes=3))
    decisions.record(client, tune)
    decisions.observe(client, tune.decision_id, {"p95_ms": 95.0})
    trial = canary.start(client, spec, second, {"classify": {"batch_wait_ms": 10.0}}, 0.1, "longer batch wait")
    decisions.record(client, decisions.Decision("ticket_triage", "canary_start", second.version, trial.version,
                                                second.to_dict(), trial.config.to_dict(), "canary: longer batch wait",
                                                decided_at=datetime.now(UTC) - timedelta(minutes=1)))
    reviews = seed_reviews_tuner(client)
    return {"spec": spec, "versions": (first, second), "canary": trial, "tune": tune, "reviews": reviews}


# What the loop writes (tuner/loop.py): a reason with a Python dict of the clamped values, route weights with
# every decimal, predictions with the pipeline's figures before the change, and the figures measured after.
REVIEWS_WEIGHTS = {"fp32": 0.6431834373838553, "int8": 0.3568165626161447}
REVIEWS_REASON = ("sentiment: int8 answers as well as fp32 at 0.5781234 of its compute, moving 0.14 of traffic; "
                  "escalate: escalations 31% -> 22% (clamped to {'cascade_threshold': 0.63, 'cache_enabled': True}, "
                  "at most 10% per decision)")
REVIEWS_PREDICTED = {"before.p95_ms": 180.0, "before.cost_per_1k": 0.42, "before.requests": 300.0,
                     "sentiment.cost_per_1k": 0.3312345678, "escalate.proposal.cost_per_1k": 0.28}
REVIEWS_OBSERVED = {"p95_ms": 176.0, "cost_per_1k": 0.31, "requests": 420.0}
REVIEWS_CANARY = {"base.p95_ms": 176.0, "canary.p95_ms": 240.0, "base.cost_per_1k": 0.31, "canary.cost_per_1k": 0.29,
                  "canary.requests": 40.0, "base.requests": 360.0, "p.slower": 0.004}


def seed_reviews_tuner(client) -> dict:
    """reviews declared (version 1), tuned to version 2 (clamped, route weights moved, effect observed), then a
    canary of version 3 rolled back (slower) — every past decision the Tuner page must say in words."""
    from tracetune.tuner import decisions, versions
    from tracetune.tuner.config import Knob, PipelineSpec

    spec = PipelineSpec("reviews", {
        "sentiment": {"route_weights": Knob("weights", {"fp32": 0.5, "int8": 0.5}),
                      "batch_max_size": Knob("int", 16, 1, 64), "cache_enabled": Knob("bool", True)},
        "escalate": {"cascade_threshold": Knob("float", 0.7, 0.0, 1.0), "cache_enabled": Knob("bool", False)},
    })
    first, _ = versions.register(client, spec)
    changes = {"sentiment": {"route_weights": REVIEWS_WEIGHTS},
               "escalate": {"cascade_threshold": 0.63, "cache_enabled": True}}
    second = versions.change(client, spec, changes, "tuner", REVIEWS_REASON)
    tune = decisions.Decision("reviews", "tune", first.version, second.version, first.to_dict(), second.to_dict(),
                              REVIEWS_REASON, predicted=REVIEWS_PREDICTED,
                              decided_at=datetime.now(UTC) - timedelta(minutes=4))
    decisions.record(client, tune)
    decisions.observe(client, tune.decision_id, REVIEWS_OBSERVED)
    third = versions.change(client, spec, {"sentiment": {"batch_max_size": 32}}, "tuner", "bigger batches")
    back = decisions.Decision("reviews", "canary_rollback", third.version, second.version, third.to_dict(),
                              second.to_dict(), "canary p95 240 ms vs 176 ms (slower, p=0.004)",
                              decided_at=datetime.now(UTC) - timedelta(minutes=2))
    decisions.record(client, back)
    decisions.observe(client, back.decision_id, REVIEWS_CANARY)
    return {"spec": spec, "tune": tune, "rollback": back}


# ---- alerts: one firing (silenced), one resolved, a delivery pending per group ---------------------------------

# A description as long as the analyzer's: the Alerts page must show it whole.
DESCRIPTION = ("{pipeline} is spending its 30-day error budget 20 times faster than it can afford over both the "
               "last hour and the last 5 minutes; at this pace the budget is gone in 36 hours. Open the Overview "
               "for the objective and the Steps page for the failing step.")


def seed_alerts(client) -> None:
    from tracetune.analyzer.alerts import Condition, Engine, Matcher, Timing, add_silence
    from tracetune.analyzer.delivery import WebhookReceiver

    def burning(pipeline: str, severity: str) -> Condition:
        return Condition("slo_burn", {"alertname": "SLOBurnRate", "pipeline": pipeline, "slo": "availability",
                                      "severity": severity, "rule": "slo_burn"},
                         {"summary": f"{pipeline} burns", "description": DESCRIPTION.format(pipeline=pipeline)},
                         20.0)

    receiver = WebhookReceiver("webhook", "http://127.0.0.1:9/never")  # nothing listens: the delivery waits
    engine = Engine(client, [receiver], Timing(group_wait=0))
    now = datetime.now(UTC)
    engine.evaluate([burning("support_bot", "page"), burning("ticket_triage", "ticket")], now - timedelta(minutes=2))
    engine.notify(now - timedelta(minutes=2))  # both told (one notification per group)
    engine.evaluate([burning("support_bot", "page")], now - timedelta(minutes=1))  # ticket_triage's resolved
    add_silence(client, [Matcher.parse("pipeline=support_bot")], now + timedelta(hours=1), comment="deploying")


# ---- drift: the current minute against a pinned baseline (five hours ago) ----------------------------

DRIFT_PIPELINE, DRIFT_STEP = "search", "query"
DRIFT_SPANS = 160  # per window: above the 100 samples a verdict needs (PSI needs 500: it stays out)


def seed_features(client) -> analyzer.Baseline:
    """`lang` moves from mostly en to mostly de (drift); `length` keeps its values (ok); `rare` has 10 (too few).

    The reference spans lie in a pinned baseline five hours back (returned); the current spans are the
    last 20 s (0.125 s apart), so they stay in the current minute while the test runs."""
    now = time.time_ns()
    baseline = (datetime.now(UTC) - timedelta(hours=5, minutes=1), datetime.now(UTC) - timedelta(hours=4))
    rows = []
    for window, start, step_ns in (("reference", int(baseline[0].timestamp() * 1e9) + int(30e9), int(5e9)),
                                   ("current", now - int(20e9), int(0.125e9))):
        for i in range(DRIFT_SPANS):
            share_de = 0.1 if window == "reference" else 0.7
            attrs = {"tracetune.pipeline": DRIFT_PIPELINE, "tracetune.step": DRIFT_STEP,
                     "tracetune.feature.lang": "de" if i < share_de * DRIFT_SPANS else "en",
                     "tracetune.feature.length": str(50 + i % 40)}
            if i < 10:
                attrs["tracetune.feature.rare"] = str(i)
            rows.append(_span(start + i * step_ns, uuid.uuid4().hex, uuid.uuid4().hex[:16],
                              f"{DRIFT_PIPELINE}.{DRIFT_STEP}", int((20 + i % 7) * 1e6), attrs, False))
    client.insert("otel_traces", rows, column_names=COLUMNS)
    return analyzer.set_baseline(client, DRIFT_PIPELINE, *baseline)

"""The simulation's physics: what each route's batches take and how often it is right, what each remote tier
answers and how fast, the plain steps' and side effect's times, and the load's repeats (`Calibration`).

`DEMO` was measured on the demo's models and stand-ins; `fit(client, spec)` fits one from a pipeline's real
spans in a store (`from_observation` does the arithmetic on what was read). tuner/simulate.py runs on one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tracetune.analyzer.cost import step_tokens_sql
from tracetune.tuner.batching import BatchSample, ServiceModel, fit_service_time
from tracetune.tuner.config import PipelineSpec
from tracetune.tuner.observe import Observation
from tracetune.tuner.policies import CascadeSample

__all__ = ["DEMO", "LEVELS", "Answer", "Calibration", "ModelRoute", "RemoteTier", "effect_step", "fit",
           "from_observation", "model_steps", "roles"]

LEVELS = 21  # quantile tables hold this many equally spaced levels, 0 to 1


@dataclass(frozen=True)
class ModelRoute:
    """One route of the model step: what a batch takes, how often it is right and how sure it says it is.

    Confidence is drawn from `confidence_right` or `confidence_wrong` (quantile tables at `LEVELS`
    equally spaced levels), so the cascade threshold sets the escalation share and what it saves.
    """

    service: ServiceModel  # batch time: base + per item * size * (1 + padding_factor * padding)
    accuracy: float
    confidence_right: tuple[float, ...]
    confidence_wrong: tuple[float, ...]
    service_sigma: float = 0.6  # lognormal spread of a batch's time around the model


@dataclass(frozen=True)
class RemoteTier:
    """One remote route of the cascade: lognormal latency, accuracy on escalated tasks, a rate limit, tokens.

    A tier is not equally right on every task it is sent: the least sure tasks of the model step are the hard
    ones for it too. `by_confidence` holds its accuracy by the model step's confidence on the task, as
    (from this confidence up, accuracy) pairs in rising order; without them, `accuracy` everywhere."""

    model: str  # gen_ai.request.model: what the price table charges tokens by
    median_ms: float
    sigma: float
    accuracy: float
    rate_limit_rps: float  # the provider's token bucket (burst of one second); 0: none
    input_tokens: int = 90
    output_tokens: int = 2
    by_confidence: tuple[tuple[float, float], ...] = ()

    def accuracy_at(self, confidence: float) -> float:
        """How often this tier is right on a task the model step answered with `confidence`."""
        found = self.accuracy
        for start, accuracy in self.by_confidence:
            if confidence < start:
                break
            found = accuracy
        return found


@dataclass(frozen=True)
class Calibration:
    """The physics the simulation runs on: one entry per route of the model and cascade steps, the input
    lengths, the side effect, and what the plain steps take. `source` says where the numbers came from."""

    routes: Mapping[str, ModelRoute]
    tiers: Mapping[str, RemoteTier]
    lengths: tuple[float, ...]  # quantile table of input lengths in tokens (padding in batches)
    effect_share: float = 0.23  # tasks that reach the side effect
    effect_route: str = "crm"  # the route its spans carry
    effect_median_ms: float = 23.0
    effect_sigma: float = 0.25
    step_ms: float = 0.05  # each plain step's self time
    plain_ms: Mapping[str, float] = field(default_factory=dict)  # a plain step's own self time, where not step_ms
    models: Mapping[str, Mapping[str, ModelRoute]] = field(default_factory=dict)  # model steps besides the main one
    cache_hit_ms: float = 0.1
    overhead_ms: float = 1.0  # the executor's own path per task, outside the steps
    rejected_ms: float = 3.0  # a 429 answer's round trip
    retry_attempts: int = 5  # the LLM client's RetryPolicy (executor/llm.py)
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    source: str = ""

    def validate(self) -> Calibration:
        for name, route in self.routes.items():
            for table in (route.confidence_right, route.confidence_wrong):
                if len(table) < 2 or any(b < a for a, b in zip(table, table[1:], strict=False)):
                    raise ValueError(f"calibration route {name}: a confidence table needs 2+ non-decreasing values")
            if not 0 <= route.accuracy <= 1:
                raise ValueError(f"calibration route {name}: accuracy must be within [0, 1], got {route.accuracy}")
        for name, tier in self.tiers.items():
            starts = [start for start, _ in tier.by_confidence]
            if starts != sorted(starts) or any(not 0 <= a <= 1 for _, a in tier.by_confidence):
                raise ValueError(f"calibration tier {name}: by_confidence needs rising confidences and accuracies "
                                 f"within [0, 1]")
        if not self.routes or len(self.lengths) < 2:
            raise ValueError("a calibration needs at least one model route and a length table")
        return self


def _table(values: Iterable[float]) -> tuple[float, ...]:
    values = np.asarray(list(values), dtype=float)
    return tuple(float(x) for x in np.round(np.quantile(values, np.linspace(0, 1, LEVELS)), 4))


# Measured on this machine, 2026-11-30, on the demo's real models and stand-ins (one onnxruntime thread):
# - confidences and accuracy: fp32 and int8 TicketClassifier over 1,500 tickets of demo.corpus.make_ticket
#   (seed 5): fp32 right on 92.5%, int8 on 91.7%; escalation at threshold 0.6: 9.9% / 10.2% (cost.md: ~11%);
# - service time: fit_service_time over 230 batches of 1-16 random or same-bucket tickets per variant; the
#   spread around the fit (log sd 0.76 fp32, 0.92 int8, lengths the model does not see plus a shared CPU) is
#   taken as 0.6; fp32 at batch 1 ~8.5 ms, as the demo's classify p50 of 14 ms with 5 ms of wait;
# - input lengths: MiniLM token counts of the same tickets (median 28, 90th percentile 82);
# - remote tiers: demo/standins.MODELS (latency, rate limit) times the stand-in's keyword reading on the tickets
#   classify is unsure of (94.6% right below confidence 0.6): 0.90 -> 0.852, 0.98 -> 0.927; 90 tokens in, 2 out
#   (docs/cost.md); the LLM client's retries: 5 attempts, 0.2 s base, 10 s cap, Retry-After >= 1 s;
# - side effect: 23% of tickets are urgent (create_followup), the CRM stand-in's 20 ms lognormal latency plus
#   the round trip (23 ms p50 in `tracetune demo`).
DEMO = Calibration(
    routes={
        "fp32": ModelRoute(ServiceModel(1.43, 7.08, 4.18), 0.925,
                           (0.251, 0.5676, 0.6499, 0.7194, 0.7785, 0.8125, 0.8471, 0.8741, 0.8959, 0.9149, 0.9308,
                            0.943, 0.9542, 0.9631, 0.9706, 0.9761, 0.9818, 0.9874, 0.9911, 0.9947, 0.9998),
                           (0.2329, 0.4087, 0.4335, 0.4765, 0.4959, 0.5096, 0.5195, 0.5295, 0.5491, 0.5743, 0.5944,
                            0.623, 0.657, 0.678, 0.6991, 0.7225, 0.7587, 0.7914, 0.8282, 0.8774, 0.9883)),
        "int8": ModelRoute(ServiceModel(1.02, 1.27, 17.4), 0.917,
                           (0.354, 0.5811, 0.6653, 0.7314, 0.7754, 0.8117, 0.8447, 0.8742, 0.8931, 0.912, 0.9271,
                            0.9406, 0.9535, 0.9624, 0.9703, 0.9762, 0.9817, 0.9871, 0.9909, 0.9942, 0.9997),
                           (0.2329, 0.3879, 0.4273, 0.465, 0.4831, 0.4936, 0.5058, 0.5245, 0.5539, 0.5613, 0.5845,
                            0.6161, 0.6304, 0.6508, 0.6826, 0.7197, 0.7418, 0.7875, 0.8097, 0.8701, 0.9848)),
    },
    tiers={
        "llm-small": RemoteTier("standin-small", 300.0, 0.5, 0.852, 20.0),
        "llm-large": RemoteTier("standin-large", 700.0, 0.5, 0.927, 5.0),
    },
    lengths=(4.0, 5.0, 6.0, 10.0, 16.0, 19.0, 22.0, 24.0, 25.0, 27.0, 28.0, 29.0, 30.0, 32.0, 33.0, 35.0, 38.0, 54.0,
             82.1, 115.1, 128.0),
    source="measured on the demo's models and stand-ins (tuner/calibration.py, DEMO)",
)


# Latency of every step and route over the window, for the parts of a calibration an Observation lacks.
# Tokens per step span as the rollup and the analyzer count them (`step_tokens_sql`).
LATENCY_SQL = """
SELECT SpanAttributes['tracetune.step'] AS step, SpanAttributes['tracetune.route'] AS route, count() AS spans,
       quantile(0.5)(Duration / 1e6) AS p50_ms, quantile(0.9)(Duration / 1e6) AS p90_ms,
       avg(""" + step_tokens_sql("input") + """) AS input_tokens,
       avg(""" + step_tokens_sql("output") + """) AS output_tokens,
       any(SpanAttributes['gen_ai.request.model']) AS model
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String} AND SpanAttributes['tracetune.step'] != ''
  AND StatusCode NOT IN ('Error', 'STATUS_CODE_ERROR') AND SpanAttributes['tracetune.cache'] != 'hit'
GROUP BY step, route
"""

# Labelled tasks by their final answer (the root span's `tracetune.outcome` against the load generator's ground
# truth), with the main model step's route and confidence and the tier the cascade sent it to ('' when the
# local answer stood, or the remote failed and it was kept): for pipelines whose steps carry no
# `tracetune.prediction` (answers that are not labels), the only view of who was right.
ANSWERS_SQL = """
SELECT m.route, m.confidence, c.tier, r.answer = g.truth AS right
FROM (
    SELECT TraceId AS trace_id, any(SpanAttributes['tracetune.outcome']) AS answer FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32}) AND ParentSpanId = ''
      AND SpanAttributes['tracetune.pipeline'] = {pipeline:String} AND SpanAttributes['tracetune.outcome'] != ''
    GROUP BY trace_id
) AS r
INNER JOIN (
    SELECT trace_id, argMax(label, sent_at) AS truth FROM tracetune_ground_truth
    WHERE pipeline = {pipeline:String} AND label != '' AND trace_id != ''
    GROUP BY trace_id
) AS g ON g.trace_id = r.trace_id
INNER JOIN (
    SELECT TraceId AS trace_id, any(SpanAttributes['tracetune.route']) AS route,
           any(toFloat64OrZero(SpanAttributes['tracetune.feature.confidence'])) AS confidence
    FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
      AND SpanAttributes['tracetune.pipeline'] = {pipeline:String} AND SpanAttributes['tracetune.step'] = {model:String}
      AND SpanAttributes['tracetune.feature.confidence'] != ''
    GROUP BY trace_id
) AS m ON m.trace_id = r.trace_id
LEFT JOIN (
    SELECT TraceId AS trace_id, any(SpanAttributes['tracetune.route']) AS tier FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
      AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
      AND SpanAttributes['tracetune.step'] = {cascade:String}
      AND StatusCode NOT IN ('Error', 'STATUS_CODE_ERROR')
    GROUP BY trace_id
) AS c ON c.trace_id = r.trace_id
"""


@dataclass(frozen=True)
class Answer:
    """A labelled task seen by its final answer: the main model step's route and confidence, the tier it was
    escalated to ('' when the local answer stood) and whether the final answer was right."""

    route: str
    confidence: float
    tier: str
    right: bool


def _density(table: Sequence[float], at: np.ndarray, width: float = 0.03) -> np.ndarray:
    """The density of a quantile table's distribution at `at` (central difference of its CDF over +-width)."""
    xs = np.asarray(table, dtype=float)
    levels = np.linspace(0, 1, len(xs))
    xs = xs + np.arange(len(xs)) * 1e-9  # ties (a point mass) made strictly increasing for interp
    return (np.interp(at + width, xs, levels) - np.interp(at - width, xs, levels)) / (2 * width)


def _weighted_table(values: np.ndarray, weights: np.ndarray) -> tuple[float, ...]:
    q = np.quantile(values, np.linspace(0, 1, LEVELS), weights=weights, method="inverted_cdf")
    return tuple(float(x) for x in np.round(np.maximum.accumulate(q), 4))


def _from_answers(answers: Sequence[Answer], routes: dict[str, ModelRoute], tiers: dict[str, RemoteTier],
                  min_samples: int = 30) -> tuple[dict[str, ModelRoute], dict[str, RemoteTier]]:
    """Routes and tiers fitted from final answers. Each route's confidences are all seen (so its escalation share
    at any threshold is the real one); whether its own answer was right is seen only where it stood (not
    escalated). Where it was escalated, the chance it was right is the known route's odds at that confidence
    (Bayes on its confidence tables): the one assumption left, and only below the threshold that ran."""
    routes, tiers = dict(routes), dict(tiers)
    for name in sorted({a.route for a in answers}):
        mine = [a for a in answers if a.route == name]
        known = routes.get(name)
        if known is None or len(mine) < min_samples:
            continue
        confidence = np.array([a.confidence for a in mine])
        escalated = np.array([bool(a.tier) for a in mine])
        right = np.array([a.right for a in mine], dtype=float)
        f_right = known.accuracy * _density(known.confidence_right, confidence)
        f_wrong = (1 - known.accuracy) * _density(known.confidence_wrong, confidence)
        odds = np.where(f_right + f_wrong > 0, f_right / np.maximum(f_right + f_wrong, 1e-12), known.accuracy)
        weight = np.where(escalated, odds, right)
        if weight.sum() < 1 or (1 - weight).sum() < 1:
            continue
        routes[name] = replace(known, accuracy=round(float(weight.mean()), 4),
                               confidence_right=_weighted_table(confidence, weight),
                               confidence_wrong=_weighted_table(confidence, 1 - weight))
    for name in sorted({a.tier for a in answers if a.tier}):
        sent = [a.right for a in answers if a.tier == name]
        if name in tiers and len(sent) >= min_samples:
            tiers[name] = replace(tiers[name], accuracy=round(sum(sent) / len(sent), 4))
    return routes, tiers


def _by_confidence(answers: Sequence[Answer], per_bin: int = 40, most: int = 6) -> tuple[tuple[float, float], ...]:
    """A tier's accuracy by the model step's confidence, from the labelled answers it gave: up to `most` bins of
    equal count, at least `per_bin` answers each; each bin starts halfway from the one before (the first at 0).
    Empty with fewer than two bins' worth. Above the highest confidence the run escalated, the last bin holds:
    surer tasks are easier, so that errs toward too few right answers, not too many."""
    bins = min(most, len(answers) // per_bin)
    if bins < 2:
        return ()
    ordered = sorted(answers, key=lambda a: a.confidence)
    parts = np.array_split(np.arange(len(ordered)), bins)
    found = []
    for k, part in enumerate(parts):
        start = 0.0 if k == 0 else (ordered[parts[k - 1][-1]].confidence + ordered[part[0]].confidence) / 2
        found.append((round(start, 4), round(sum(ordered[i].right for i in part) / len(part), 4)))
    return tuple(found)


def roles(spec: PipelineSpec) -> tuple[str | None, str]:
    """(the cascade step or None, the main model step): the step the cascade reads the confidence of, else
    the first step with batching knobs."""
    cascade = next(iter(spec.cascades), None)
    model = spec.cascades[cascade] if cascade else None
    model = model or next((s for s, knobs in spec.steps.items() if "batch_max_size" in knobs), None)
    if model is None:
        raise ValueError(f"pipeline {spec.pipeline!r} has no model step (batching knobs) to simulate")
    return cascade, model


def effect_step(spec: PipelineSpec, calibration: Calibration) -> str | None:
    """The side-effect step: the one after the cascade that declares remote limits (max_concurrency)."""
    cascade, _ = roles(spec)
    return next((s for s, knobs in spec.steps.items() if s != cascade and "max_concurrency" in knobs), None)


def model_steps(spec: PipelineSpec) -> list[str]:
    """The steps the simulation runs as model steps (as tuner/simulate.py picks them): the main one and every
    other step declaring batching or routes, but not the cascade or the side effect."""
    cascade, model = roles(spec)
    effect = effect_step(spec, DEMO)
    return [s for s, knobs in spec.steps.items() if s not in (cascade, effect)
            and ("batch_max_size" in knobs or "route_weights" in knobs or s == model)]


def _fit_routes(obs: Observation, step: str, known: Mapping[str, ModelRoute], fallback: ModelRoute,
                batches: Mapping[tuple[str, str], Sequence[BatchSample]],
                samples: Sequence[CascadeSample] = ()) -> dict[str, ModelRoute]:
    """The routes of one model step fitted from what the spans show: each route's batch time from its own batch
    spans; for the main step also its accuracy and its confidence when right and when wrong, from its own
    labelled answers (the routes' confidences differ: pooling them would make every route escalate alike)."""
    routes = dict(known)
    for name, route_obs in obs.steps.get(step, {}).items():
        if not name:
            continue
        before = routes.get(name) or fallback
        model = fit_service_time(batches.get((step, name), [])) or before.service
        if not samples:
            routes[name] = replace(before, service=model)
            continue
        accuracy = route_obs.correct / route_obs.labelled if route_obs.labelled >= 30 else before.accuracy
        mine = [s for s in samples if s.route == name] or [s for s in samples if not s.route]
        right = [s.confidence for s in mine if s.local_correct]
        wrong = [s.confidence for s in mine if not s.local_correct]
        routes[name] = replace(before, service=model, accuracy=accuracy,
                               confidence_right=_table(right) if len(right) >= 30 else before.confidence_right,
                               confidence_wrong=_table(wrong) if len(wrong) >= 10 else before.confidence_wrong)
    return routes


def from_observation(obs: Observation, spec: PipelineSpec, latencies: Mapping[tuple[str, str], Mapping[str, Any]],
                     batches: Mapping[tuple[str, str], Sequence[BatchSample]] | None = None,
                     base: Calibration = DEMO, answers: Sequence[Answer] = ()) -> Calibration:
    """A calibration fitted from real spans, for any pipeline the simulation runs: every model step's routes
    (batch time from their batch spans; for the step the cascade reads, accuracy and confidence per route from
    labelled answers, which set each route's escalation share), each remote tier's latency (lognormal through
    p50 and p90), accuracy on the tasks it was sent and tokens, the plain steps' own times, and the side effect's
    share and latency, from `latencies` (LATENCY_SQL rows by step and route). What the spans do not show (a
    provider's rate limit, input lengths) stays as in `base`. `batches`: batch spans by (step, route).
    `answers` (ANSWERS_SQL): labelled tasks by their final answer, used where the steps' spans carry no labelled
    answers (`_from_answers`)."""
    cascade, model_step = roles(spec)
    batches = batches or {}
    samples = [s for s in obs.cascade_samples.get(cascade, []) if s.local_correct is not None] if cascade else []
    fallback = next(iter(base.routes.values()))
    routes = _fit_routes(obs, model_step, base.routes, fallback, batches, samples)
    models = {step: _fit_routes(obs, step, base.models.get(step, {}), fallback, batches)
              for step in model_steps(spec) if step != model_step}
    tiers = dict(base.tiers)
    for name, route_obs in (obs.steps.get(cascade, {}).items() if cascade else ()):
        known = tiers.get(name) or next(iter(base.tiers.values()))
        row = latencies.get((cascade, name), {})
        median, sigma = _lognormal(row, known.median_ms, known.sigma)
        accuracy = route_obs.correct / route_obs.labelled if route_obs.labelled >= 30 else known.accuracy
        tiers[name] = replace(known, model=str(row.get("model") or known.model), median_ms=median, sigma=sigma,
                              accuracy=accuracy,
                              input_tokens=round(row.get("input_tokens") or known.input_tokens),
                              output_tokens=max(1, round(row.get("output_tokens") or known.output_tokens)))
    if answers and not samples:
        routes, tiers = _from_answers(answers, routes, tiers)
    for name in list(tiers):
        tiers[name] = replace(tiers[name], by_confidence=_by_confidence([a for a in answers if a.tier == name]))
    effect = effect_step(spec, base)
    plain_ms = dict(base.plain_ms)
    for step in spec.steps:
        row = latencies.get((step, ""), {})
        if step not in (cascade, effect, *model_steps(spec)) and row.get("spans", 0) >= 20 and row.get("p50_ms"):
            plain_ms[step] = round(float(row["p50_ms"]), 4)
    effect_share, effect_median, effect_sigma = (base.effect_share, base.effect_median_ms, base.effect_sigma) \
        if effect else (0.0, base.effect_median_ms, base.effect_sigma)
    if effect and obs.requests:
        total = obs.step_total(effect)
        effect_share = total.spans / obs.requests
        row = next((r for (s, _), r in latencies.items() if s == effect), {})
        effect_median, effect_sigma = _lognormal(row, effect_median, effect_sigma)
    return replace(base, routes=routes, tiers=tiers, models=models, plain_ms=plain_ms, effect_share=effect_share,
                   effect_median_ms=effect_median, effect_sigma=effect_sigma,
                   source=f"fitted from {obs.requests} requests of {obs.pipeline} over "
                          f"{obs.window_seconds:.0f} s of real spans").validate()


def _lognormal(row: Mapping[str, Any], median: float, sigma: float) -> tuple[float, float]:
    p50, p90 = row.get("p50_ms"), row.get("p90_ms")
    if not p50 or not p90 or row.get("spans", 0) < 20:
        return median, sigma
    return float(p50), max(0.05, math.log(max(p90, p50) / p50) / 1.2816)


def fit(client, spec: PipelineSpec, window_seconds: int = 3600, base: Calibration = DEMO) -> Calibration:
    """A calibration from the pipeline's real spans of the last `window_seconds` in the store at `client`."""
    from tracetune.tuner.observe import BATCHES_SQL, collect

    obs = collect(client, spec, window_seconds)
    if obs.requests == 0:
        raise ValueError(f"no requests of pipeline {spec.pipeline!r} in the last {window_seconds} s of spans: run the "
                         f"demo first (make demo) or widen the window")
    rows = client.query(LATENCY_SQL, parameters={"pipeline": spec.pipeline, "window": int(window_seconds)})
    latencies = {(row["step"], row["route"]): row for row in rows.named_results()}
    batches: dict[tuple[str, str], list[BatchSample]] = {}
    # By step and route (observe pools a step's routes; each route has its own speed), and more of them.
    for step, route, size, duration_ms, padding in client.query(BATCHES_SQL, parameters={
            "pipeline": spec.pipeline, "window": int(window_seconds), "limit": 40000}).result_rows:
        if size:
            batches.setdefault((step, route), []).append(BatchSample(int(size), float(duration_ms), float(padding)))
    answers: list[Answer] = []
    cascade, model = roles(spec)
    if cascade:
        rows = client.query(ANSWERS_SQL, parameters={"pipeline": spec.pipeline, "window": int(window_seconds),
                                                     "model": model, "cascade": cascade}).result_rows
        answers = [Answer(str(route), float(confidence), str(tier or ""), bool(right))
                   for route, confidence, tier, right in rows]
    return from_observation(obs, spec, latencies, batches, base, answers)

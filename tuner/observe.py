"""What the tuner reads before it decides: one pipeline's last window of spans, labels and costs.

Everything here is measurement (SQL over `otel_traces`, the ground truth the load generator wrote,
the feedback users sent, the analyzer's cost figures); the decisions are pure functions in
`tuner.policies` fed from an `Observation`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from tracetune.analyzer import PricesError, cost_per_1k
from tracetune.tuner.batching import BatchSample
from tracetune.tuner.config import PipelineSpec
from tracetune.tuner.policies import CascadeSample, RouteStats, TaskLatencies

# Per step and route: volume, latency, cache outcomes, repeated inputs, retried remote calls.
STEPS_SQL = """
SELECT SpanAttributes['tracetune.step'] AS step, SpanAttributes['tracetune.route'] AS route,
       count() AS spans,
       quantile(0.95)(Duration / 1e6) AS p95_ms,
       countIf(SpanAttributes['tracetune.cache'] = 'hit') AS hits,
       countIf(SpanAttributes['tracetune.cache'] = 'miss') AS misses,
       countIf(SpanAttributes['tracetune.cache'] = 'bypass') AS bypass,
       countIf(SpanAttributes['tracetune.input_hash'] != '') AS hashed,
       uniqExactIf(SpanAttributes['tracetune.input_hash'],
                   SpanAttributes['tracetune.input_hash'] != '') AS distinct_inputs,
       countIf(toUInt32OrZero(SpanAttributes['tracetune.retries']) > 0) AS retried,
       countIf(StatusCode IN ('Error', 'STATUS_CODE_ERROR')) AS errors
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String} AND SpanAttributes['tracetune.step'] != ''
GROUP BY step, route
"""

# The levels end-to-end latency is read at besides p95 and p99, for their lower bounds (`lower_quantile`).
LEVELS = tuple(round(0.85 + 0.0025 * i, 4) for i in range(59))  # 0.85 .. 0.995
Z_95 = 1.6448536269514722  # one-sided 95%

# Requests (root spans) and their end-to-end latency.
ROOTS_SQL = """
SELECT count() AS requests, quantile(0.95)(Duration / 1e6) AS p95_ms, quantile(0.99)(Duration / 1e6) AS p99_ms,
       countIf(StatusCode IN ('Error', 'STATUS_CODE_ERROR')) AS errors,
       quantiles(""" + ", ".join(f"{level:g}" for level in LEVELS) + """)(Duration / 1e6) AS levels,
       if(requests = 0, 0, dateDiff('millisecond', min(Timestamp), now64(3)) / 1000) AS seconds_of_data
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
  AND ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
"""

# The newest batch spans of the pipeline's steps, at most {limit}: step, route, size, duration, padding.
BATCHES_SQL = """
SELECT SpanAttributes['tracetune.batch_of'] AS step, SpanAttributes['tracetune.route'] AS route,
       toUInt32OrZero(SpanAttributes['tracetune.batch_size']) AS size,
       Duration / 1e6 AS duration_ms, toFloat64OrZero(SpanAttributes['tracetune.padding_ratio']) AS padding
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
  AND SpanAttributes['tracetune.batch_pipeline'] = {pipeline:String}
  AND StatusCode NOT IN ('Error', 'STATUS_CODE_ERROR')
ORDER BY Timestamp DESC
LIMIT {limit:UInt32}
"""

# Model and cascade step answers of labelled tasks over the last {label_window} seconds, newest first, each saying
# whether it is in the last {window}: ground truth from the load generator, or user feedback (feedback for a step
# wins over feedback for the whole answer, which wins over ground truth).
LABELLED_SQL = """
WITH labels AS (
    SELECT trace_id, step, argMax(label, created_at) AS answer
    FROM tracetune_feedback
    WHERE pipeline = {pipeline:String} AND created_at >= now64(3) - toIntervalSecond({label_window:UInt32} + 600)
    GROUP BY trace_id, step
    UNION ALL
    SELECT trace_id, '' AS step, argMax(label, sent_at) AS answer
    FROM tracetune_ground_truth
    WHERE pipeline = {pipeline:String} AND label != ''
      AND sent_at >= now64(3) - toIntervalSecond({label_window:UInt32} + 600)
    GROUP BY trace_id
)
SELECT s.TraceId AS trace_id, s.SpanAttributes['tracetune.step'] AS step, s.SpanAttributes['tracetune.route'] AS route,
       s.SpanAttributes['tracetune.prediction'] AS prediction,
       toFloat64OrNull(s.SpanAttributes['tracetune.feature.confidence']) AS confidence,
       argMax(l.answer, l.step != '') AS label, max(s.Timestamp) AS at,
       at >= now64(9) - toIntervalSecond({window:UInt32}) AS recent
FROM otel_traces AS s
INNER JOIN labels AS l ON l.trace_id = s.TraceId AND (l.step = '' OR l.step = s.SpanAttributes['tracetune.step'])
WHERE s.Timestamp >= now64(9) - toIntervalSecond({label_window:UInt32})
  AND s.SpanAttributes['tracetune.pipeline'] = {pipeline:String} AND s.SpanAttributes['tracetune.prediction'] != ''
GROUP BY trace_id, step, route, prediction, confidence
ORDER BY at DESC
"""

# Unlabelled confidences of every task a model step served (what a cascade threshold would escalate).
CONFIDENCE_SQL = """
SELECT SpanAttributes['tracetune.step'] AS step, toFloat64(SpanAttributes['tracetune.feature.confidence']) AS confidence
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
  AND SpanAttributes['tracetune.step'] IN {steps:Array(String)}
  AND SpanAttributes['tracetune.feature.confidence'] != ''
ORDER BY Timestamp DESC
LIMIT 20000
"""

# The newest tasks' end-to-end latency, the route their cascade step {step} sent them to and how long that took
# (escalated 0: kept local, no span of that step in the trace).
TASK_LATENCY_SQL = """
SELECT r.Duration / 1e6 AS latency_ms, c.escalated AS escalated, c.route AS route, c.remote_ms AS remote_ms
FROM (
    SELECT TraceId, Duration, Timestamp FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32})
      AND ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
) AS r
LEFT JOIN (
    SELECT TraceId, 1 AS escalated, any(SpanAttributes['tracetune.route']) AS route, sum(Duration) / 1e6 AS remote_ms
    FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window:UInt32} + 600)
      AND SpanAttributes['tracetune.pipeline'] = {pipeline:String} AND SpanAttributes['tracetune.step'] = {step:String}
    GROUP BY TraceId
) AS c ON c.TraceId = r.TraceId
ORDER BY r.Timestamp DESC
LIMIT 20000
SETTINGS join_use_nulls = 0
"""


@dataclass
class RouteObservation:
    """One step's spans on one route over the window."""

    spans: int = 0
    p95_ms: float = 0.0
    hits: int = 0
    misses: int = 0
    bypass: int = 0
    hashed: int = 0
    distinct_inputs: int = 0
    retried: int = 0
    errors: int = 0
    cost: float = 0.0  # USD over the window
    correct: int = 0
    labelled: int = 0


@dataclass
class Observation:
    """A pipeline over the last `window_seconds`: requests, latency, cost, and per step what the policies need."""

    pipeline: str
    window_seconds: float
    requests: int = 0
    p95_ms: float | None = None
    p99_ms: float | None = None
    # Their one-sided 95% lower bounds over the window's requests (`lower_quantile`): a target is missed beyond
    # doubt when the bound is over it. None: not known (the point estimate stands for it).
    p95_low_ms: float | None = None
    p99_low_ms: float | None = None
    errors: int = 0
    cost_per_1k: float | None = None
    quality: float | None = None  # share of labelled final answers that were right
    labelled: int = 0
    steps: dict[str, dict[str, RouteObservation]] = field(default_factory=dict)
    batches: dict[str, list[BatchSample]] = field(default_factory=dict)
    cascade_samples: dict[str, list[CascadeSample]] = field(default_factory=dict)  # by cascade step
    task_latency: dict[str, TaskLatencies] = field(default_factory=dict)  # by cascade step: local vs escalated

    def step_total(self, step: str) -> RouteObservation:
        """The step's routes added up (p95: the largest route p95)."""
        total = RouteObservation()
        for route in self.steps.get(step, {}).values():
            for name in ("spans", "hits", "misses", "bypass", "hashed", "distinct_inputs", "retried", "errors",
                         "correct", "labelled"):
                setattr(total, name, getattr(total, name) + getattr(route, name))
            total.cost += route.cost
            total.p95_ms = max(total.p95_ms, route.p95_ms)
        return total

    def route_stats(self, step: str) -> list[RouteStats]:
        return [RouteStats(route, r.spans, r.correct, r.labelled, r.cost / r.spans if r.spans else 0.0, r.p95_ms)
                for route, r in sorted(self.steps.get(step, {}).items())]

    def padding_ratio(self, step: str) -> float:
        """Mean share of padding in the step's batches (0 without batch spans)."""
        batches = self.batches.get(step, [])
        return sum(b.padding_ratio for b in batches) / len(batches) if batches else 0.0

    def arrival_rate(self, step: str) -> float:
        return self.step_total(step).spans / self.window_seconds if self.window_seconds else 0.0

    def cost_per_call(self, step: str) -> float:
        total = self.step_total(step)
        return total.cost / total.spans if total.spans else 0.0

    def cost_spread(self, moved: Mapping[str, float] | None = None,
                    switched: Mapping[str, Mapping[tuple[str, str], float]] | None = None) -> float | None:
        """The standard deviation of a task's cost (USD), from each step's routes: calls per task and cost per call,
        a task making at most one call of a step and the steps independent of each other (what spreads a task's
        cost is mostly a cascade's few dear calls); a call its cache answered costs nothing, the others the rest.
        None without requests or prices.

        What is left of it once a canary's costs are adjusted for what the config in force fixes before the arms
        differ (`canary.covariates`), no more than without (the adjustment's least squares would take θ = 0 rather
        than add spread):

        - `switched` (routed step -> (route in force, route tried) -> share of tasks the tried weights send the
          other way, `routing.moves`; empty when its weights do not move): which route each task takes there is
          known, so the spread among the routes goes, and on the tasks switched the difference of the two routes'
          cost per task comes back. A route with no calls in the window has no cost to read: that step's spread
          stays as it is.
        - `moved` (cascade step -> share of tasks one config escalates and the other does not): whether the config in
          force escalates each task is known too, so what is left there is the spread of a call's cost among the
          calls of its route (cache hits), and a whole call on the moved tasks."""
        if not self.requests or self.cost_per_1k is None:
            return None
        variance = raw = 0.0
        for step, routes in self.steps.items():
            calls_on: dict[str, float] = {}
            paid_on: dict[str, tuple[float, float]] = {}  # route -> (paid calls per task, cost per paid call)
            for name, route in routes.items():
                if route.spans:
                    paid = route.spans - min(route.hits, route.spans - 1)  # at least one: its cost is spread over it
                    calls_on[name] = route.spans / self.requests
                    paid_on[name] = (paid / self.requests, route.cost / paid)
            mean = sum(p * e for p, e in paid_on.values())
            calls = sum(calls_on.values())
            raw += max(0.0, sum(p * e * e for p, e in paid_on.values()) - mean * mean)
            known = moved is not None and step in moved and calls > 0  # whether each task escalates here
            moves = (switched or {}).get(step)
            routed = moves is not None and calls > 0 and all(r in paid_on for pair in moves for r in pair)
            # What is known of a task splits the step's calls into groups (one per route when its route is known,
            # else one) and says on what share of tasks a group's call is made (its calls when whether it escalates
            # is known, else its calls' share of the step's); what is left is the spread of cost within each group.
            within, each = 0.0, {}
            for group in ([r] for r in paid_on) if routed else [list(paid_on)]:
                if not group:
                    continue
                cost = sum(paid_on[r][0] * paid_on[r][1] for r in group)  # per task
                given = sum(calls_on[r] for r in group) / (1.0 if known else calls)
                within += sum(paid_on[r][0] * paid_on[r][1] ** 2 for r in group) - cost * cost / given
                each[group[0]] = cost / given  # the mean cost of a task on that route (for one-route groups)
            spread = max(0.0, within)
            if routed:  # on the tasks switched, the difference of the two routes' cost per task
                spread += (calls if known else 1.0) * sum(share * (each[a] - each[b]) ** 2
                                                          for (a, b), share in moves.items())
            if known:  # and a whole call on the tasks one threshold escalates and the other does not
                spread += moved[step] * (mean / calls) ** 2
            variance += spread
        return math.sqrt(min(variance, raw))

    def summary(self) -> dict[str, float]:
        """The figures a decision's predicted and observed effects are compared on."""
        figures = {"requests": float(self.requests), "p95_ms": self.p95_ms, "p99_ms": self.p99_ms,
                   "cost_per_1k": self.cost_per_1k, "quality": self.quality,
                   "error_rate": self.errors / self.requests if self.requests else None}
        return {name: round(value, 6) for name, value in figures.items() if value is not None}


def low_level(q: float, n: int) -> float:
    """The level whose quantile is the one-sided 95% lower confidence bound of the `q` quantile of `n` samples:
    the number of samples under the true `q` quantile is binomial (n, q), so at this level, `Z_95` standard
    errors under `q` (the normal approximation), no more than 5% of windows read a quantile over the true one."""
    return q - Z_95 * math.sqrt(q * (1 - q) / n) if n > 0 else 0.0


def lower_quantile(levels: Sequence[float], values: Sequence[float], q: float, n: int) -> float:
    """The one-sided 95% lower bound of the `q` quantile of `n` samples, read (interpolated) off the samples'
    quantiles `values` at `levels`; under the lowest level, that level's value (a bound less sure)."""
    return float(np.interp(low_level(q, n), levels, values))


def collect(client, spec: PipelineSpec, window_seconds: int = 300, label_window_seconds: int | None = None,
            ) -> Observation:
    """Measure `spec.pipeline` over the last `window_seconds`; a cascade's labelled answers over the last
    `label_window_seconds` (at least the window; `pool`)."""
    params = {"pipeline": spec.pipeline, "window": int(window_seconds),
              "label_window": int(max(window_seconds, label_window_seconds or 0))}
    obs = Observation(spec.pipeline, float(window_seconds))
    requests, p95, p99, errors, levels, seconds = client.query(ROOTS_SQL, parameters=params).result_rows[0]
    obs.requests, obs.errors = int(requests), int(errors)
    # Rates are per second of data: a pipeline that started 60 s ago has not been idle for the rest of the window.
    obs.window_seconds = float(min(window_seconds, max(1.0, float(seconds))))
    if obs.requests:
        obs.p95_ms, obs.p99_ms = float(p95), float(p99)
        obs.p95_low_ms = lower_quantile(LEVELS, levels, 0.95, obs.requests)
        obs.p99_low_ms = lower_quantile(LEVELS, levels, 0.99, obs.requests)
    for row in client.query(STEPS_SQL, parameters=params).named_results():
        obs.steps.setdefault(row["step"], {})[row["route"]] = RouteObservation(
            spans=int(row["spans"]), p95_ms=float(row["p95_ms"]), hits=int(row["hits"]), misses=int(row["misses"]),
            bypass=int(row["bypass"]), hashed=int(row["hashed"]), distinct_inputs=int(row["distinct_inputs"]),
            retried=int(row["retried"]), errors=int(row["errors"]))
    if not obs.requests:
        return obs
    batch_rows = client.query(BATCHES_SQL, parameters=params | {"limit": 5000}).result_rows
    for step, _, size, duration_ms, padding in batch_rows:  # the routes of a step pooled
        if size:
            obs.batches.setdefault(step, []).append(BatchSample(int(size), float(duration_ms), float(padding)))
    _costs(client, obs, window_seconds)
    _labels(client, spec, obs, params)
    for cascade in spec.cascades:
        obs.task_latency[cascade] = task_latency(client.query(TASK_LATENCY_SQL, parameters=params | {
            "step": cascade}).result_rows)
    return obs


def task_latency(rows) -> TaskLatencies:
    """(latency ms, escalated 0/1, route, ms the cascade step took) rows as the latencies of the tasks escalated,
    by route, and of tasks without the escalation: those kept local, and the escalated ones less its time."""
    local: list[float] = []
    escalated: dict[str, list[float]] = defaultdict(list)
    for latency_ms, was_escalated, route, remote_ms in rows:
        if was_escalated:
            escalated[route or ""].append(float(latency_ms))
            local.append(max(0.0, float(latency_ms) - float(remote_ms or 0.0)))
        else:
            local.append(float(latency_ms))
    return TaskLatencies(local, dict(escalated))


def _costs(client, obs: Observation, window_seconds: int) -> None:
    try:
        frame = cost_per_1k(client, since=int(window_seconds), by=("step", "route"), pipeline=obs.pipeline)
    except PricesError:  # nothing published yet (the analyzer publishes prices.toml): costs stay unknown
        return
    total = 0.0
    for row in frame.iter_rows(named=True):
        route = obs.steps.get(row["step"], {}).get(row["route"])
        if route is not None:
            route.cost = float(row["cost"] or 0.0)
        total += float(row["cost"] or 0.0)
    obs.cost_per_1k = 1000 * total / obs.requests if obs.requests else None


def _labelled(client, params: dict) -> tuple[dict[str, dict[str, tuple[str, str, float | None, str]]], set[str]]:
    """Labelled tasks over the label window, newest first: trace id -> step -> (route, prediction, confidence,
    label); and the trace ids of those in the (shorter) window."""
    by_trace: dict[str, dict[str, tuple[str, str, float | None, str]]] = defaultdict(dict)
    recent: set[str] = set()
    for trace_id, step, route, prediction, confidence, label, _, is_recent in client.query(
            LABELLED_SQL, parameters=params).result_rows:
        by_trace[trace_id][step] = (route, prediction, confidence, label)
        if is_recent:
            recent.add(trace_id)
    return by_trace, recent


def pool(samples: Sequence[CascadeSample], now: Mapping[str, int], tiers: Mapping[str, int] | None = None,
         ) -> list[CascadeSample]:
    """A cascade's labelled samples over the label window (newest first) in the mixes of the window: of each
    local route serving now (`now`: its labelled samples in the window), the newest, as many per sample in the
    window as the route with the fewest allows; routes not serving now are left out. Which answers a route or a
    tier gets right at a given confidence does not depend on the config in force, so an hour of them proves what
    five minutes cannot; how many tasks each route serves does, so that stays the window's. The same for the
    remote tiers (`tiers`: the window's labelled escalations per tier): an escalated sample keeps its remote
    answer only among its tier's newest in the window's tier mix, others count as escalated and unanswered (a
    tier no longer serving would otherwise lend the cascade its accuracy)."""
    kept = _mixed(samples, now, lambda s: s.route, lambda s: None)
    if tiers is None:
        return kept
    return _mixed(kept, tiers, lambda s: s.tier if s.remote_correct is not None else None,
                  lambda s: replace(s, remote_correct=None, tier=""))


def _mixed(samples: Sequence[CascadeSample], now: Mapping[str, int], key, otherwise) -> list[CascadeSample]:
    """`samples` (newest first) with those of each key (`key(s)`; None: not judged) kept newest first in the
    shares `now` gives, as many as the scarcest key allows; the rest become `otherwise(s)` (None: left out)."""
    serving = {k: n for k, n in now.items() if n > 0}
    have: dict[str, int] = defaultdict(int)
    for s in samples:
        if key(s) is not None:
            have[key(s)] += 1
    scale = min((have[k] / n for k, n in serving.items()), default=0.0)
    keep = {k: max(1, int(scale * n)) for k, n in serving.items()}
    out = []
    for s in samples:
        k = key(s)
        if k is None:
            out.append(s)
        elif keep.get(k, 0) > 0:
            keep[k] -= 1
            out.append(s)
        elif (other := otherwise(s)) is not None:
            out.append(other)
    return out


def _final(spec: PipelineSpec, steps: dict[str, tuple[str, str, float | None, str]]) -> bool | None:
    """Whether a labelled task's answer was right: the cascade's answer when it escalated, else the local one."""
    for cascade, after in spec.cascades.items():
        if after in steps:
            _, prediction, _, label = steps.get(cascade) or steps[after]
            return prediction == label
    return None


def answers(client, spec: PipelineSpec, window_seconds: int) -> dict[str, bool]:
    """Trace id -> whether the pipeline's answer was right, for the labelled tasks of the last `window_seconds`
    (pipelines with a cascade: its answer when it escalated, else the step it reads)."""
    found = {}
    by_trace, _ = _labelled(client, {"pipeline": spec.pipeline, "window": int(window_seconds),
                                     "label_window": int(window_seconds)})
    for trace_id, steps in by_trace.items():
        right = _final(spec, steps)
        if right is not None:
            found[trace_id] = right
    return found


def _labels(client, spec: PipelineSpec, obs: Observation, params: dict) -> None:
    pooled, recent = _labelled(client, params)
    by_trace = {trace_id: steps for trace_id, steps in pooled.items() if trace_id in recent}
    for steps in by_trace.values():
        for step, (route, prediction, _, label) in steps.items():
            route_obs = obs.steps.get(step, {}).get(route)
            if route_obs is not None:
                route_obs.labelled += 1
                route_obs.correct += prediction == label
    for cascade, after in spec.cascades.items():
        samples, now, tiers = [], defaultdict(int), defaultdict(int)
        for trace_id, steps in pooled.items():
            if after not in steps or steps[after][2] is None:
                continue
            route, local, confidence, label = steps[after]
            remote = steps.get(cascade)
            samples.append(CascadeSample(float(confidence), local == label,
                                         None if remote is None else remote[1] == remote[3], route or "",
                                         "" if remote is None else remote[0] or "", trace_id in recent))
            now[route or ""] += trace_id in recent
            if remote is not None:
                tiers[remote[0] or ""] += trace_id in recent
        obs.cascade_samples[cascade] = pool(samples, now, tiers)
        unlabelled = client.query(CONFIDENCE_SQL, parameters={**params, "steps": [after]}).result_rows
        # Tasks without labels still tell how many a threshold would escalate: their confidences, correctness unknown
        # (the window's newest first; as many left out as the window has labelled).
        obs.cascade_samples[cascade] += [CascadeSample(float(c), None) for _, c in unlabelled[sum(now.values()):]]
    finals = [right for steps in by_trace.values() if (right := _final(spec, steps)) is not None]
    if finals:
        obs.quality, obs.labelled = sum(finals) / len(finals), len(finals)

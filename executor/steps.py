"""The steps a pipeline is made of, and the knobs each declares for the tuner.

- `Step`: a plain function of the task.
- `Infer`: a model call routed between variants (weights), micro-batched (`Batching`) and cached (`Cache`).
- `Cascade`: hands the task to a remote model (or one of several routes, e.g. provider tiers, by weight)
  when an earlier `Infer` step was not sure enough.
- `Effect`: a write to another system (idempotent, retried, dead-lettered), under a concurrency limit.

Each step declares its knobs (`knobs()`: kind, default, bounds), applies new values from the tuner
by knob name (`configure`), and writes the span attributes and metrics for them.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import numbers
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from tracetune.executor import conventions as attr
from tracetune.executor import metrics, telemetry
from tracetune.executor.batcher import Batcher
from tracetune.executor.cache import TTLCache, normalise
from tracetune.executor.coldstarts import ColdStarts
from tracetune.executor.effects import DeadLetters, RetryPolicy, SideEffect, SideEffectFailed
from tracetune.executor.limits import Limiter
from tracetune.executor.router import WeightedRouter
from tracetune.tuner.config import Knob

if TYPE_CHECKING:
    from tracetune.executor.pipelines import Pipeline, Task

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class StepError(Exception):
    """A task failed in a step for a reason worth showing the caller, on our side (e.g. a side effect that
    exhausted its retries): the task API answers 502, and the task counts against availability."""

    trace_id: str = ""
    kind: str = "server"


class InputError(StepError):
    """A task refused for its input (the caller's mistake): the task API answers 422 with the message, and
    the task is a client error (`tracetune.error_kind=client`), not counted against availability."""

    kind = "client"


# ---- knob groups ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batching:
    """Micro-batching for an `Infer` step: up to `max_size` items, the oldest waiting at most `max_wait_ms`.

    With `length` (item -> size, e.g. its token count) the step also declares `length_bucketing`:
    batches then hold items of similar length, so padded batches waste less compute.
    """

    max_size: int = 8
    max_wait_ms: float = 5.0
    length: Callable[[Any], int] | None = None
    length_bucketing: bool = True

    def knobs(self) -> dict[str, Knob]:
        knobs = {"batch_max_size": Knob("int", self.max_size, 1, 1024, "items", "largest batch"),
                 "batch_max_wait_ms": Knob("float", float(self.max_wait_ms), 0, 10_000, "ms",
                                           "longest the oldest item waits for a fuller batch")}
        if self.length is not None:
            knobs["length_bucketing"] = Knob("bool", self.length_bucketing, help="batch items of similar length")
        return knobs


@dataclass(frozen=True)
class Cache:
    """An exact-match cache in front of an `Infer` step, keyed on `key(item)` and the route."""

    enabled: bool = True
    ttl_seconds: float = 600.0
    max_entries: int = 10_000
    key: Callable[[Any], str] = normalise

    def knobs(self) -> dict[str, Knob]:
        return {"cache_enabled": Knob("bool", self.enabled),
                "cache_ttl_seconds": Knob("float", float(self.ttl_seconds), 0, 30 * 86_400, "s"),
                "cache_max_entries": Knob("int", self.max_entries, 1, 10_000_000, "entries")}


@dataclass(frozen=True)
class Remote:
    """Limits for calls to another service: at most `max_concurrency` in flight, each `timeout_seconds` long."""

    max_concurrency: int = 8
    timeout_seconds: float = 10.0

    def knobs(self) -> dict[str, Knob]:
        return {"max_concurrency": Knob("int", self.max_concurrency, 1, 4096, "calls"),
                "timeout_seconds": Knob("float", float(self.timeout_seconds), 0.01, 600, "s")}


class AnswerCache:
    """A step's answers per route and input, behind its `Cache` knobs; Infer and Cascade use it alike.

    `lookup` hashes the input (`tracetune.input_hash`, also with the cache off, so repeats show),
    answers a stored value or `TTLCache.MISSING`, and records the outcome on the span and in metrics.
    """

    KNOBS = frozenset({"cache_enabled", "cache_ttl_seconds", "cache_max_entries"})

    def __init__(self, spec: Cache):
        self.spec = spec
        self.store = TTLCache(spec.max_entries, spec.ttl_seconds)
        self.enabled = spec.enabled
        self.labels: tuple[str, str] = ("", "")

    def bind(self, pipeline: str, step: str) -> None:
        self.labels = (pipeline, step)
        store = self.store
        metrics.CACHE_HIT_RATIO.labels(*self.labels).set_function(
            lambda: store.hits / max(1, store.hits + store.misses))

    def configure(self, values: Mapping[str, Any]) -> None:
        self.enabled = bool(values.get("cache_enabled", self.enabled))
        self.store.configure(values.get("cache_max_entries"), values.get("cache_ttl_seconds"))

    def lookup(self, route: str, item: Any, span: trace.Span) -> tuple[Any, str]:
        """(the stored answer or MISSING, the key to `put` a fresh answer under; empty when off)."""
        normalised = self.spec.key(item)
        span.set_attribute(attr.INPUT_HASH, hashlib.blake2b(normalised.encode(), digest_size=8).hexdigest())
        value, key = TTLCache.MISSING, ""
        if self.enabled:
            key = f"{route}\x1f{normalised}"
            value = self.store.get(key)
        outcome = "bypass" if not self.enabled else "miss" if value is TTLCache.MISSING else "hit"
        span.set_attribute(attr.CACHE, outcome)
        metrics.CACHE_TOTAL.labels(*self.labels, outcome).inc()
        return value, key

    def put(self, key: str, value: Any) -> None:
        if key:
            self.store.put(key, value)


# ---- steps ---------------------------------------------------------------------------------------

class Step:
    """A plain step: `fn(task)` runs inside the step's span (`trace.get_current_span()` to annotate it).

    `when(task)` (optional) decides whether the step runs for a task. Raise `StepError` to fail the
    task with a message the caller sees.
    """

    def __init__(self, name: str, fn: Callable[[Task], Any] | None = None, *,
                 when: Callable[[Task], bool] | None = None):
        if not NAME.match(name):
            raise ValueError(f"step name {name!r} must start with a letter and hold only letters, digits, _ and -")
        self.name = name
        self.fn = fn
        self.when = when
        self.pipeline_name = ""
        self.tracer = trace.get_tracer("tracetune.executor")  # the pipeline's, once bound

    def knobs(self) -> dict[str, Knob]:
        """The knobs this step declares (name -> Knob); the tuner sets them by these names."""
        return {}

    def configure(self, values: Mapping[str, Any]) -> None:
        """Apply knob values from the tuner (already checked against `knobs()`)."""

    def bind(self, pipeline: Pipeline) -> None:
        """Called once by the pipeline that holds the step, before its first task."""
        self.pipeline_name = pipeline.name
        self.tracer = pipeline.tracer

    def applies(self, task: Task) -> bool:
        return self.when is None or self.when(task)

    def run(self, task: Task, span: trace.Span) -> None:
        if self.fn is not None:
            self.fn(task)

    def close(self) -> None:
        """Stop threads and close connections the step holds."""

    def fork(self, pipeline: Pipeline, values: Mapping[str, Any]) -> Step:
        """A copy of this bound step for a canary, with `values` (the knobs the canary changes) applied.

        The copy shares what those knobs do not touch (models, remotes, batch queues, caches, limits)
        and owns fresh parts for what they do: its own queues, cache or limit. `close_fork` closes
        only what it owns."""
        clone = copy.copy(self)
        clone._owned = []
        clone._fork(pipeline, values)
        clone.configure(values)
        return clone

    def _fork(self, pipeline: Pipeline, values: Mapping[str, Any]) -> None:
        """Give this fresh copy its own parts for the knobs in `values` (plain steps hold none)."""

    def close_fork(self) -> None:
        """Close what a fork owns (nothing it shares with the step it was forked from)."""
        for part in getattr(self, "_owned", ()):
            part.close()


def _split(output: Any) -> tuple[Any, float | None]:
    """A variant's output is a value, or (value, confidence) with confidence a number in [0, 1]."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], numbers.Real) \
            and not isinstance(output[1], bool):
        return output[0], float(output[1])
    return output, None


def _feature_value(value: Any) -> str | int | float | None:
    """`value` as a span attribute for drift (numpy scalars as Python numbers), None if it is not a scalar."""
    if isinstance(value, numbers.Number) and hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def _route_weights(owner: str, noun: str, routes: Mapping[str, Any], weights: Mapping[str, float] | None,
                   ) -> dict[str, float]:
    """Checked route names and a weight for each route (equal when none are given, 0 for routes left out)."""
    for route in routes:
        if not NAME.match(route):
            raise ValueError(f"route {route!r} of {owner} must start with a letter and hold only "
                             f"letters, digits, _ and -")
    weights = dict(weights) if weights else dict.fromkeys(routes, 1.0)
    unknown = set(weights) - set(routes)
    if unknown:
        raise ValueError(f"weights of {owner} name routes it has no {noun} for: {sorted(unknown)}")
    return {route: float(weights.get(route, 0.0)) for route in routes}


class Infer(Step):
    """A model step: `variants` map route names to batch functions (list of inputs -> list of outputs).

    A task's input is `input(task)` (default: `task.data["text"]`). The route is drawn by weight
    (`weights`, default equal); with `batching` requests queue into batches per route; with `cache`
    a repeated input skips the model. An output that is `(value, confidence)` lets a later `Cascade`
    decide on it. The value lands in `task.data[name]`, the confidence in `task.confidence[name]`
    and the route in `task.routes[name]`; `feature` names a drift feature for the value. `prediction(value)`
    gives the answer as a label (`tracetune.prediction`, what labels are compared with) when the value is not
    one itself, e.g. a dict holding it.
    """

    def __init__(self, name: str, variants: Mapping[str, Callable[[list[Any]], list[Any]]], *,
                 input: Callable[[Task], Any] | None = None, weights: Mapping[str, float] | None = None,
                 batching: Batching | None = None, cache: Cache | None = None, feature: str | None = None,
                 when: Callable[[Task], bool] | None = None, result_timeout: float = 60.0,
                 seed: int | None = None, prediction: Callable[[Any], Any] | None = None):
        super().__init__(name, when=when)
        if not variants:
            raise ValueError(f"step {name!r} needs at least one variant")
        self.variants = dict(variants)
        self.input = input or (lambda task: task.data["text"])
        self.weights = _route_weights(f"step {name!r}", "variant", self.variants, weights)
        self.batching = batching
        self.feature = feature
        self.prediction = prediction
        self.result_timeout = result_timeout
        self.router = WeightedRouter(self.weights, seed)
        self.cache = AnswerCache(cache) if cache else None
        self.batchers: dict[str, Batcher] = {}
        self.cold_starts = ColdStarts()  # first request per variant since start

    def knobs(self) -> dict[str, Knob]:
        knobs: dict[str, Knob] = {}
        if len(self.variants) > 1:
            knobs["route_weights"] = Knob("weights", dict(self.weights), help="share of requests per route")
        if self.batching:
            knobs.update(self.batching.knobs())
        if self.cache:
            knobs.update(self.cache.spec.knobs())
        return knobs

    def bind(self, pipeline: Pipeline) -> None:
        super().bind(pipeline)
        labels = (self.pipeline_name, self.name)
        if self.batching:
            self.batchers = self._batchers(pipeline)
            batchers = self.batchers
            metrics.QUEUE_DEPTH.labels(*labels).set_function(lambda: sum(b.depth for b in batchers.values()))
        if self.cache:
            self.cache.bind(*labels)

    def _batchers(self, pipeline: Pipeline) -> dict[str, Batcher]:
        assert self.batching is not None
        labels, length = (self.pipeline_name, self.name), self.batching.length

        def on_batch(size: int, _: float) -> None:
            metrics.BATCH_SIZE.labels(*labels).observe(size)

        return {route: Batcher(f"{self.name}:{route}", run_batch, self.batching.max_size, self.batching.max_wait_ms,
                               tracer=pipeline.tracer, on_batch=on_batch, length=length,
                               bucket_by_length=bool(length and self.batching.length_bucketing),
                               attributes={attr.BATCH_OF: self.name, attr.BATCH_PIPELINE: self.pipeline_name,
                                           attr.ROUTE: route})
                for route, run_batch in self.variants.items()}

    def _fork(self, pipeline: Pipeline, values: Mapping[str, Any]) -> None:
        self.router = WeightedRouter(dict(self.weights))
        if self.batching and values.keys() & self.batching.knobs().keys():
            self.batchers = self._batchers(pipeline)
            self._owned += list(self.batchers.values())
        if self.cache and values.keys() & AnswerCache.KNOBS:
            labels = self.cache.labels
            self.cache = AnswerCache(self.cache.spec)
            self.cache.labels = labels

    def configure(self, values: Mapping[str, Any]) -> None:
        if "route_weights" in values:
            self.weights = dict(values["route_weights"])
            self.router.set_weights(self.weights)
        for batcher in self.batchers.values():
            batcher.configure(values.get("batch_max_size", batcher.max_size),
                              values.get("batch_max_wait_ms", batcher.max_wait_ms),
                              values.get("length_bucketing"))
        if self.cache:
            self.cache.configure(values)

    def run(self, task: Task, span: trace.Span) -> None:
        route = self.router.choose(task.route_key, self.name)
        span.set_attribute(attr.ROUTE, route)
        metrics.ROUTE_TOTAL.labels(self.pipeline_name, self.name, route).inc()
        item = self.input(task)
        output, key = self.cache.lookup(route, item, span) if self.cache else (TTLCache.MISSING, "")
        if output is TTLCache.MISSING:
            with self.cold_starts.first(self.pipeline_name, self.name, route, span):
                output = self._compute(route, item, span)
            if self.cache:
                self.cache.put(key, output)
        value, confidence = _split(output)
        task.data[self.name] = value
        task.routes[self.name] = route
        if confidence is not None:
            task.confidence[self.name] = confidence
            span.set_attribute(attr.FEATURE_PREFIX + "confidence", round(confidence, 4))
        if (prediction := _feature_value(self.prediction(value) if self.prediction else value)) is not None:
            span.set_attribute(attr.PREDICTION, prediction)
            if self.feature:
                span.set_attribute(attr.FEATURE_PREFIX + self.feature, prediction)

    def _compute(self, route: str, item: Any, span: trace.Span) -> Any:
        batcher = self.batchers.get(route)
        if batcher is None:
            outputs = self.variants[route]([item])
            if len(outputs) != 1:
                raise RuntimeError(f"variant {route} of step {self.name} returned {len(outputs)} results for 1 input")
            return outputs[0]
        result = batcher.submit(item).result(timeout=self.result_timeout)
        span.set_attribute(attr.BATCH_SIZE, result.batch_size)
        span.set_attribute(attr.QUEUE_MS, round(result.queue_ms, 3))
        span.set_attribute(attr.QUEUE_DEPTH, result.queue_depth)
        return result.value

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()


def _takes_timeout(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "timeout" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


class Cascade(Step):
    """Hands a task to a remote model when step `after` was less confident than `threshold`.

    `remote(item)` returns the better answer, which replaces `task.data[after]` (the local answer is
    kept in `task.escalated[after]`). If `remote` takes a `timeout` keyword it gets the step's
    `timeout_seconds`. When the remote call fails, the local answer stands and the span says so.

    `remote` is one callable (its route is `route`) or a mapping of routes to callables, e.g. a cheap
    and a pricier provider tier: each escalated task then goes to one route drawn by `weights`
    (default equal), and `tracetune.route` names it. With `cache`, a repeated input on the same route
    reuses that route's earlier answer instead of calling it again (`tracetune.cache` says `hit`).
    Knobs: `cascade_threshold`, `route_weights` (two routes or more), the cache's, and the `Remote`
    limits (one concurrency limit shared by the routes). `prediction(answer)`: the answer as a label, as `Infer`'s.
    """

    def __init__(self, name: str, after: str, remote: Callable[..., Any] | Mapping[str, Callable[..., Any]] | None,
                 *, threshold: float = 0.5, weights: Mapping[str, float] | None = None,
                 input: Callable[[Task], Any] | None = None, limits: Remote = Remote(), route: str = "remote",
                 cache: Cache | None = None, feature: str | None = None,
                 when: Callable[[Task], bool] | None = None, seed: int | None = None,
                 prediction: Callable[[Any], Any] | None = None):
        super().__init__(name, when=when)
        if not 0 <= threshold <= 1:
            raise ValueError(f"cascade {name!r}: threshold must be between 0 and 1, got {threshold}")
        if isinstance(remote, Mapping):
            if not remote:
                raise ValueError(f"cascade {name!r}: remote routes are empty; give at least one route -> callable")
            remotes = dict(remote)
        else:
            remotes = {} if remote is None else {route: remote}
        if weights and not isinstance(remote, Mapping):
            raise ValueError(f"cascade {name!r}: weights need remote routes given as a mapping route -> callable")
        self.after = after
        self.remotes = remotes
        self.route = route
        self.weights = _route_weights(f"cascade {name!r}", "remote", remotes, weights)
        self.router = WeightedRouter(self.weights, seed) if remotes else None
        self.threshold = float(threshold)
        self.input = input or (lambda task: task.data["text"])
        self.limits = limits
        self.limiter = Limiter(limits.max_concurrency)
        self.timeout = limits.timeout_seconds
        self.cache = AnswerCache(cache) if cache else None
        self.feature = feature
        self.prediction = prediction
        self._pass_timeout = {r: _takes_timeout(fn) for r, fn in remotes.items()}

    def knobs(self) -> dict[str, Knob]:
        knobs = {"cascade_threshold": Knob("float", self.threshold, 0, 1, help=f"escalate when {self.after}'s "
                                           f"confidence is below this")}
        if len(self.remotes) > 1:
            knobs["route_weights"] = Knob("weights", dict(self.weights), help="share of escalated tasks per route")
        if self.cache:
            knobs.update(self.cache.spec.knobs())
        return {**knobs, **self.limits.knobs()}

    def bind(self, pipeline: Pipeline) -> None:
        super().bind(pipeline)
        if self.cache:
            self.cache.bind(self.pipeline_name, self.name)

    def _fork(self, pipeline: Pipeline, values: Mapping[str, Any]) -> None:
        if self.router is not None:
            self.router = WeightedRouter(dict(self.weights))
        if "max_concurrency" in values:
            self.limiter = Limiter(int(values["max_concurrency"]))
        if self.cache and values.keys() & AnswerCache.KNOBS:
            labels = self.cache.labels
            self.cache = AnswerCache(self.cache.spec)
            self.cache.labels = labels

    def configure(self, values: Mapping[str, Any]) -> None:
        self.threshold = float(values.get("cascade_threshold", self.threshold))
        self.timeout = float(values.get("timeout_seconds", self.timeout))
        if "max_concurrency" in values:
            self.limiter.resize(int(values["max_concurrency"]))
        if "route_weights" in values and self.router is not None:
            self.weights = dict(values["route_weights"])
            self.router.set_weights(self.weights)
        if self.cache:
            self.cache.configure(values)

    def applies(self, task: Task) -> bool:
        confidence = task.confidence.get(self.after)
        return confidence is not None and confidence < self.threshold and super().applies(task)

    def run(self, task: Task, span: trace.Span) -> None:
        labels = (self.pipeline_name, self.name)
        if self.router is None:
            span.set_attribute(attr.ROUTE, self.route)
            span.set_attribute(attr.ESCALATION, "unavailable")
            metrics.CASCADE_TOTAL.labels(*labels, "unavailable").inc()
            return
        route = self.router.choose(task.route_key, self.name)
        span.set_attribute(attr.ROUTE, route)
        metrics.ROUTE_TOTAL.labels(*labels, route).inc()
        item = self.input(task)
        answer, key = self.cache.lookup(route, item, span) if self.cache else (TTLCache.MISSING, "")
        if answer is TTLCache.MISSING:
            try:
                answer = self._call(route, item, span)
            except Exception as exc:  # noqa: BLE001 - any remote failure degrades to the local answer
                span.record_exception(exc)
                message = f"remote model failed, local answer kept: {exc}"
                span.set_status(trace.Status(trace.StatusCode.ERROR, message[:300]))
                span.set_attribute(attr.ESCALATION, "failed")
                metrics.CASCADE_TOTAL.labels(*labels, "failed").inc()
                return
            if self.cache:
                self.cache.put(key, answer)
        span.set_attribute(attr.ESCALATION, "answered")
        metrics.CASCADE_TOTAL.labels(*labels, "answered").inc()
        if (prediction := _feature_value(self.prediction(answer) if self.prediction else answer)) is not None:
            span.set_attribute(attr.PREDICTION, prediction)
            if self.feature:
                span.set_attribute(attr.FEATURE_PREFIX + self.feature, prediction)
        task.escalated[self.after] = task.data.get(self.after)
        task.data[self.after] = answer

    def _call(self, route: str, item: Any, span: trace.Span) -> Any:
        """One remote call on `route`, within a concurrency slot and what is left of the step's timeout."""
        started = time.monotonic()
        labels = (self.pipeline_name, self.name)
        remote = self.remotes[route]
        with self.limiter.slot(self.timeout) as waited:
            span.set_attribute(attr.QUEUE_MS, round(waited * 1000, 3))
            metrics.REMOTE_IN_FLIGHT.labels(*labels).inc()
            try:
                left = max(0.001, self.timeout - (time.monotonic() - started))
                with telemetry.using_tracer(self.tracer):  # the call's own spans (chat {model}) in the pipeline's
                    return remote(item, timeout=left) if self._pass_timeout[route] else remote(item)
            finally:
                metrics.REMOTE_IN_FLIGHT.labels(*labels).dec()

    def close(self) -> None:
        for remote in self.remotes.values():
            close = getattr(remote, "close", None) or getattr(getattr(remote, "__self__", None), "close", None)
            if callable(close):
                close()


class Effect(Step):
    """A write to another system: POST `payload(task)` as JSON to `url` through a `SideEffect`.

    The request carries an idempotency key from (pipeline, step, task id), is retried per `policy`
    and, when retries run out, dead-lettered (if `dead_letters` is given) and the task fails with
    the reason. The service's JSON answer lands in `task.data[name]`. Knobs: the `Remote` limits.
    """

    def __init__(self, name: str, url: str, payload: Callable[[Task], Mapping[str, Any]], *,
                 when: Callable[[Task], bool] | None = None, limits: Remote = Remote(timeout_seconds=5.0),
                 policy: RetryPolicy | None = None, dead_letters: DeadLetters | None = None,
                 headers: Mapping[str, str] | None = None, route: str = "", budget_seconds: float | None = None):
        super().__init__(name, when=when)
        self.url = url
        self.payload = payload
        self.limits = limits
        self.route = route
        self._options = {"policy": policy, "dead_letters": dead_letters, "headers": headers, "budget": budget_seconds}
        self.effect: SideEffect | None = None

    def knobs(self) -> dict[str, Knob]:
        return self.limits.knobs()

    def bind(self, pipeline: Pipeline) -> None:
        super().bind(pipeline)
        self.effect = self._side_effect()

    def _side_effect(self) -> SideEffect:
        return SideEffect(self.url, pipeline=self.pipeline_name, step=self.name,
                          max_concurrency=self.limits.max_concurrency, timeout=self.limits.timeout_seconds,
                          **self._options)

    def _fork(self, pipeline: Pipeline, values: Mapping[str, Any]) -> None:
        if values:
            self.effect = self._side_effect()
            self._owned.append(self.effect)

    def configure(self, values: Mapping[str, Any]) -> None:
        if self.effect is not None:
            self.effect.configure(values.get("max_concurrency"), values.get("timeout_seconds"))

    def run(self, task: Task, span: trace.Span) -> None:
        if self.route:
            span.set_attribute(attr.ROUTE, self.route)
        assert self.effect is not None, "Effect.run before bind"
        try:
            task.data[self.name] = self.effect(task.task_id or task.trace_id, self.payload(task))
        except SideEffectFailed as exc:
            raise StepError(str(exc)) from None

    def close(self) -> None:
        if self.effect is not None:
            self.effect.close()

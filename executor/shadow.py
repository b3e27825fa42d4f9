"""Shadow trials on the executor: a sample of tasks runs its model steps again under a candidate config.

While the tuner tries a change that affects quality (routes, a cascade threshold), the config it serves
holds `"shadow": {id, base_version, share, steps, answer_step, unit_costs, cost_cap_usd_per_hour,
until}`. For `share` of tasks (a hash of the task id) the pipeline keeps a copy of the task as it stood
before the first step the candidate changes; once the real task has answered, one background worker
runs the model steps (`Infer`, `Cascade`) from there on again under the candidate, in a trace of its
own. The shadow's answer is recorded and compared, never returned, never handed to a later step, never
written anywhere: effects and plain steps (which may write elsewhere) are skipped, the shadow's steps
own an empty cache and run unbatched, and its spans carry `tracetune.shadow` instead of
`tracetune.pipeline` / `tracetune.step`, so no user figure counts them.

The shadow's cost is counted at the unit costs the tuner measured per call (cache hits counted as calls)
and capped: past `cost_cap_usd_per_hour` over the last hour a sampled task is not shadowed.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter

from tracetune.executor import conventions as attr
from tracetune.executor.steps import AnswerCache, Cascade, Infer, Step, _feature_value
from tracetune.tuner.config import ConfigError, PipelineConfig

if TYPE_CHECKING:
    from tracetune.executor.pipelines import Pipeline, Task

log = logging.getLogger("tracetune.executor")

SHADOW_TASKS = Counter("tracetune_shadow_tasks_total", "Sampled tasks of a shadow trial, by what became of them "
                       "(ran, failed, capped: over the cost cap, busy: the worker's queue was full, expired)",
                       ["pipeline", "outcome"])
SHADOW_COST = Counter("tracetune_shadow_cost_usd_total", "What shadow runs cost, at the unit costs the tuner "
                      "measured per call", ["pipeline"])

# Knobs the shadow does not carry over: it runs unbatched and with a cache of its own.
_NOT_SHADOWED = frozenset({"batch_max_size", "batch_max_wait_ms", "length_bucketing"}) | AnswerCache.KNOBS
QUEUE_SIZE = 64  # sampled tasks waiting for the shadow's worker; more are not shadowed (`busy`)
HOUR = 3600.0


def _model_step(step: Step) -> bool:
    return isinstance(step, Infer | Cascade)


@dataclass
class Snapshot:
    """A task as it stood before the first step the candidate changes (copies: the real task goes on)."""

    data: dict[str, Any]
    confidence: dict[str, float]
    routes: dict[str, str]
    escalated: dict[str, Any]
    real: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)  # step, span attributes, ms

    @classmethod
    def of(cls, task: Task) -> Snapshot:
        return cls(dict(task.data), dict(task.confidence), dict(task.routes), dict(task.escalated))

    def saw(self, step: Step, span: trace.Span, seconds: float) -> None:
        """Keep what the real task's model step did (its route and time), to compare with the shadow's."""
        if _model_step(step):
            self.real.append((step.name, dict(getattr(span, "attributes", None) or {}), 1000 * seconds))


class ShadowTrial:
    """One shadow trial on one pipeline: which tasks it samples, the forked steps it runs, its cost so far."""

    def __init__(self, pipeline: Pipeline, trial_id: int, base_version: int, share: float, steps: list[Step],
                 first: int, answer_step: str, unit_costs: Mapping[str, float], cost_cap_usd_per_hour: float,
                 until: float, queue_size: int = QUEUE_SIZE):
        self.pipeline = pipeline
        self.id = trial_id
        self.base_version = base_version
        self.share = share
        self.steps = steps
        self.first = first
        self.answer_step = answer_step
        self.unit_costs = dict(unit_costs)
        self.cap = cost_cap_usd_per_hour
        self.until = until
        self._spent: collections.deque[tuple[float, float]] = collections.deque()
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"shadow-{pipeline.name}-{trial_id}", daemon=True)
        self._worker.start()

    @property
    def key(self) -> tuple[int, float, float]:
        return self.id, self.share, self.cap

    # ---- building from the tuner's config ------------------------------------------------------
    @classmethod
    def from_body(cls, pipeline: Pipeline, body: Mapping[str, Any]) -> ShadowTrial:
        """The trial the tuner serves under `shadow`; ConfigError if it does not fit the pipeline."""
        try:
            trial_id, share = int(body["id"]), float(body["share"])
            cap, until = float(body["cost_cap_usd_per_hour"]), float(body["until"])
            unit_costs = {str(k): float(v) for k, v in (body.get("unit_costs") or {}).items()}
            candidate = PipelineConfig.from_dict({"pipeline": pipeline.name, "version": int(body["base_version"]),
                                                  "steps": body.get("steps") or {}})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a shadow trial needs id, base_version, share, steps, cost_cap_usd_per_hour and "
                              f"until: {exc}") from None
        if not 0 < share <= 1 or cap < 0:
            raise ConfigError(f"a shadow's share must be in (0, 1] and its cost cap 0 or more, got {share}, {cap}")
        candidate = pipeline.spec().check(candidate)
        config = pipeline.config
        steps, first = [], -1
        for index, step in enumerate(pipeline.steps):
            base = config.steps.get(step.name, {})
            values = {k: v for k, v in candidate.steps.get(step.name, {}).items()
                      if base.get(k) != v and k not in _NOT_SHADOWED}
            if values and first < 0:
                first = index
            steps.append(step if first < 0 or not _model_step(step) else _fork(pipeline, step, values, base))
        if first < 0:
            raise ConfigError(f"shadow trial {trial_id} changes no knob a shadow runs (it needs a model step's "
                              f"route weights or cascade threshold to differ from version {config.version})")
        answer_step = str(body.get("answer_step") or "")
        if answer_step not in {s.name for s in pipeline.steps}:
            answer_step = next(s.name for s in reversed(pipeline.steps[first:]) if isinstance(s, Infer)) \
                if any(isinstance(s, Infer) for s in pipeline.steps[first:]) else pipeline.steps[first].name
        return cls(pipeline, trial_id, int(body["base_version"]), share, steps, first, answer_step, unit_costs, cap,
                   until)

    # ---- the real task's side (cheap: a hash, a copy of a few dicts, a queue put) ----------------
    def samples(self, task_id: str) -> bool:
        """Whether this task is shadowed: by a hash of its id (independent of the canary's), while the trial lasts."""
        if not task_id or time.time() > self.until:
            return False
        digest = hashlib.blake2b(task_id.encode(), digest_size=8, person=b"shadow").digest()
        return int.from_bytes(digest) < self.share * 2**64

    def submit(self, task: Task, snapshot: Snapshot, real_root: trace.SpanContext) -> None:
        """Queue the shadow run of `task` (already answered); a full queue skips it (`busy`)."""
        try:
            self._queue.put_nowait((task, snapshot, real_root))
        except queue.Full:
            SHADOW_TASKS.labels(self.pipeline.name, "busy").inc()

    # ---- the shadow's side -----------------------------------------------------------------------
    def spent_last_hour(self) -> float:
        """USD the trial spent over the last hour on this executor."""
        cutoff = time.monotonic() - HOUR
        while self._spent and self._spent[0][0] < cutoff:
            self._spent.popleft()
        return sum(cost for _, cost in self._spent)

    def _cost(self, step: str, attributes: Mapping[str, Any]) -> float:
        if attributes.get(attr.ESCALATION) == "unavailable":
            return 0.0
        return self.unit_costs.get(f"{step}.{attributes.get(attr.ROUTE, '')}", 0.0)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued task was shadowed or skipped; False if `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            try:
                if item is None:
                    break
                self._one(item)
            finally:
                self._queue.task_done()
        self._close_forks()

    def _one(self, item: tuple) -> None:
        name = self.pipeline.name
        if time.time() > self.until:
            SHADOW_TASKS.labels(name, "expired").inc()
            return
        if self.spent_last_hour() >= self.cap:
            SHADOW_TASKS.labels(name, "capped").inc()
            return
        try:
            cost = self.run(*item)
            SHADOW_TASKS.labels(name, "ran").inc()
        except Exception as exc:  # noqa: BLE001 - a shadow that fails is recorded, never raised
            SHADOW_TASKS.labels(name, "failed").inc()
            log.debug("shadow run of %s failed: %s", name, exc)
            cost = getattr(exc, "shadow_cost", 0.0)
        if cost:
            self._spent.append((time.monotonic(), cost))
            SHADOW_COST.labels(name).inc(cost)

    def _close_forks(self) -> None:
        name = self.pipeline.name
        for step, own in zip(self.steps, self.pipeline.steps, strict=True):
            if step is not own:
                try:
                    step.close_fork()
                except Exception as exc:  # noqa: BLE001 - close every fork even if one fails
                    log.warning("closing the shadow fork of step %s of %s: %s", own.name, name, exc)

    def run(self, task: Task, snapshot: Snapshot, real_root: trace.SpanContext) -> float:
        """Run the model steps from the first changed one on a copy of `task`, in a trace of its own; the
        shadow's cost. Nothing of it reaches `task`."""
        from tracetune.executor.pipelines import Task as TaskType

        pipeline, tracer = self.pipeline, self.pipeline.tracer
        marks = {attr.SHADOW: self.id, attr.SHADOW_PIPELINE: pipeline.name}
        shadow = TaskType(dict(task.input), task_id=task.task_id, tenant=task.tenant, route_key=task.route_key,
                          data=dict(snapshot.data),
                          confidence=dict(snapshot.confidence), routes=dict(snapshot.routes),
                          escalated=dict(snapshot.escalated))
        cost = ms = 0.0
        with tracer.start_as_current_span(f"{pipeline.name} shadow", context=otel_context.Context(),
                                          kind=trace.SpanKind.INTERNAL, links=[trace.Link(real_root)],
                                          attributes={**marks, attr.SHADOW_OF: task.trace_id}) as root:
            try:
                for step in self.steps[self.first:]:
                    if not _model_step(step) or not step.applies(shadow):
                        continue
                    started = time.perf_counter()
                    with tracer.start_as_current_span(f"shadow {step.name}",
                                                      attributes={**marks, attr.SHADOW_STEP: step.name}) as span:
                        try:
                            step.run(shadow, span)
                        finally:
                            ms += 1000 * (time.perf_counter() - started)
                            cost += self._cost(step.name, getattr(span, "attributes", None) or {})
            except Exception as exc:
                exc.shadow_cost = cost  # type: ignore[attr-defined]
                root.set_attribute(attr.SHADOW_COST, cost)
                raise
            real_cost = sum(self._cost(step, attributes) for step, attributes, _ in snapshot.real)
            root.set_attribute(attr.SHADOW_MS, round(ms, 3))
            root.set_attribute(attr.SHADOW_REAL_MS, round(sum(t for _, _, t in snapshot.real), 3))
            root.set_attribute(attr.SHADOW_COST, cost)
            root.set_attribute(attr.SHADOW_REAL_COST, real_cost)
            for name, value in ((attr.SHADOW_ANSWER, shadow.data.get(self.answer_step)),
                                (attr.SHADOW_REAL_ANSWER, task.data.get(self.answer_step))):
                if (scalar := _feature_value(value)) is not None:
                    root.set_attribute(name, scalar)
        return cost

    def close(self) -> None:
        """Stop taking tasks; the worker finishes the run in hand, then closes the forks."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass


def _fork(pipeline: Pipeline, step: Step, values: Mapping[str, Any], base: Mapping[str, Any]) -> Step:
    """A shadow's copy of a model step: the candidate's values, no batching, an empty cache of its own (set as
    the config in force sets it), and metrics under the pipeline label `<pipeline>.shadow`."""
    clone = step.fork(pipeline, values)
    clone.pipeline_name = f"{pipeline.name}.shadow"
    if isinstance(clone, Infer):
        clone.batchers = {}
    cache = getattr(clone, "cache", None)
    if cache is not None:
        clone.cache = AnswerCache(cache.spec)
        clone.cache.labels = (clone.pipeline_name, step.name)
        clone.cache.configure({k: v for k, v in base.items() if k in AnswerCache.KNOBS})
    return clone

"""A pipeline in virtual time: the same workload under several controllers, compared in seconds.

A discrete-event simulation (one heap of timed events, seeded, deterministic) of a pipeline shaped
like the executor runs it: plain steps, one model step (`Infer`: routes by weight, an answer cache,
one micro-batcher per route), one cascade after it (escalation below a confidence threshold to remote
tiers by weight, an answer cache, a concurrency limit, the provider's per-tier rate limit answered 429
and retried with backoff), and a side effect for a share of tasks. Batches are formed by the executor's
own rules (`tracetune.base.batching`, which executor/batcher.py calls) and the caches are the executor's own
`TTLCache` (`tracetune.base.caching`) on the simulation's clock. Prices come from the analyzer's price table,
so costs are in the units of the real system.

Every `interval_seconds` a controller (`tuner.simarms`) looks at the last window of simulated spans,
turned into the same `Observation` the tuner reads from ClickHouse:

- `static`: a fixed config (the declared defaults, a gateway's rule, or an oracle's);
- `tuner`: the loop's own look (`loop.look`, which `loop.tune_once` runs over the store): its guardrails
  (cooldown, `min_requests`, half a window of data, moves a canary just rolled back are not retried),
  `loop.decide`, then a canary
  on `canary_share` of tasks (a lane of its own, sharing the parts its changes do not touch, as the
  executor's `Step.fork`) judged by `canary.judge` on per-task samples of both arms;
- `aimd` and `optuna`: the baselines (see tuner/simarms.py).

Executors pick a new config or canary up one poll (`apply_delay`) later. Not modelled: freeze, pin,
audit rows, the store. The physics come from a `Calibration`: the defaults were measured on the demo
(see `DEMO`), and `fit(client, spec)` fits one from real spans in a store (both in tuner/calibration.py).
The oracles and the verdict are in tuner/oracles.py.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tracetune.analyzer import SLO, PriceTable, load_prices
from tracetune.base import routing
from tracetune.base.batching import padding_ratio, seconds_until_due, take_batch
from tracetune.base.caching import TTLCache
from tracetune.tuner import canary as canary_mod
from tracetune.tuner.batching import BatchSample
from tracetune.tuner.calibration import (
    LEVELS,
    Calibration,
    effect_step,
    roles,
)
from tracetune.tuner.config import KnobValue, PipelineConfig, PipelineSpec
from tracetune.tuner.loop import LoopSettings
from tracetune.tuner.observe import Observation, RouteObservation, low_level, pool, task_latency
from tracetune.tuner.policies import CascadeSample

__all__ = ["ARMS", "Arm", "Workload", "default_grid", "oracle", "run", "simulate", "slo_windows"]

ARMS = ("default", "aimd", "tuner", "oracle")
ARMS_KINDS = ("static", "tuner", "aimd", "optuna")
_LOOP = LoopSettings()  # the loop's defaults: 60 s interval, 300 s window and cooldown, 200 requests


# ---- workload and arms --------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """When requests arrive (seconds from the start, e.g. `demo.load.arrivals` of a step LoadPlan) and the
    share that repeat one of the last `recent` new inputs (as the load generator's TicketSource does)."""

    arrivals: tuple[float, ...]
    duration: float
    duplicate_ratio: float = 0.2
    recent: int = 100
    seed: int = 1
    phases: tuple[tuple[float, float], ...] = ()  # load phases (start, end seconds), for the per-phase oracle


@dataclass(frozen=True)
class Arm:
    """A controller: `static` (a config, None = the declared defaults), `tuner` (the loop: `decide`, then a
    canary judged by `canary.judge`), `aimd` (AIMD on every numeric knob) or `optuna` (TPE, one trial per
    tuning interval, each trial a canary). `seed` seeds an arm's own randomness (Optuna's sampler)."""

    name: str
    kind: str = "static"
    config: Mapping[str, Mapping[str, KnobValue]] | None = None
    seed: int = 0
    options: Mapping[str, Any] | None = None  # e.g. {"moves": False}: the tuner's decide without its last moves

    def __post_init__(self) -> None:
        if self.kind not in ARMS_KINDS:
            raise ValueError(f"arm {self.name!r}: kind must be one of {', '.join(ARMS_KINDS)}, got {self.kind!r}")


# ---- the simulation -----------------------------------------------------------------------------

class _Task:
    __slots__ = ("index", "ticket", "start", "route", "confidence", "local_right", "final_right", "cost",
                 "escalate_start", "tier", "remote_ms", "attempts", "deadline", "lane", "stage")

    def __init__(self, index: int, ticket: int, start: float, lane: _Lane):
        self.index, self.ticket, self.start, self.lane = index, ticket, start, lane
        self.cost = 0.0
        self.attempts = 0
        self.stage = -1
        self.confidence = 1.0
        self.tier = ""  # the remote route it escalated to ("" while it has not)
        self.remote_ms = 0.0  # how long its cascade step took


CACHE_KNOBS = ("cache_enabled", "cache_ttl_seconds", "cache_max_entries")
BATCH_KNOBS = ("batch_max_size", "batch_max_wait_ms", "length_bucketing")
LIMIT_KNOBS = ("max_concurrency", "timeout_seconds")


class _Cache:
    """A step's answer cache: the executor's own `TTLCache` on the simulation's clock, and whether it is on."""

    def __init__(self, clock: Callable[[], float], enabled: bool, ttl: float = 600.0, size: int = 10_000):
        self.enabled = enabled
        self.store = TTLCache(size, ttl, clock=clock)

    def configure(self, values: Mapping[str, KnobValue]) -> None:
        self.enabled = bool(values.get("cache_enabled", self.enabled))
        self.store.configure(values.get("cache_max_entries"), values.get("cache_ttl_seconds"))


class _Batcher:
    """One route's micro-batcher, one server, forming batches by the executor's own rules (tracetune.base.batching)."""

    def __init__(self, step: str, route: str, size: int, wait_ms: float, bucketing: bool):
        self.step, self.route, self.size, self.wait_ms, self.bucketing = step, route, size, wait_ms, bucketing
        self.queue: deque[tuple[float, _Task]] = deque()
        self.busy = False
        self.timer: float | None = None


class _Limit:
    """A remote step's concurrency limit: calls in flight and the tasks waiting for a slot."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0
        self.waiting: deque[_Task] = deque()


class _Lane:
    """The steps as tasks of one config version meet them: knob values, and the parts they use (batch queues,
    caches, the remote limit). A canary's lane owns fresh parts only for the knobs it changes and shares the
    rest with the config in force, as the executor's `Step.fork` does."""

    def __init__(self, sim: _Simulation, config: PipelineConfig, base: _Lane | None = None):
        self.sim, self.config = sim, config
        c = sim.cascade

        def changed(step: str | None, names: Sequence[str]) -> bool:
            return base is None or (step is not None and any(
                config.knob(step, n) != base.config.knob(step, n) for n in names))

        clock = lambda: sim.now
        self.batchers = {step: {r: _Batcher(step, r, 1, 0.0, False) for r in sim.physics[step]}
                         if changed(step, BATCH_KNOBS) else base.batchers[step] for step in sim.models}
        self.caches = {step: _Cache(clock, step != c) if changed(step, CACHE_KNOBS) else base.caches[step]
                       for step in [*sim.models, *([c] if c else [])]}
        self.limit = _Limit(1 << 30) if changed(c, LIMIT_KNOBS) else base.limit
        self.set(config)

    @property
    def model_cache(self) -> _Cache:
        return self.caches[self.sim.model_step]

    @property
    def cascade_cache(self) -> _Cache:
        return self.caches[self.sim.cascade]

    def knob(self, step: str | None, name: str, default: Any = None) -> Any:
        if step is None:
            return default
        knob = self.sim.spec.steps.get(step, {}).get(name)
        return self.config.knob(step, name, knob.default if knob is not None else default)

    def set(self, config: PipelineConfig) -> None:
        """Take `config`'s values, for this lane's scalars and the parts it uses."""
        self.config = config
        sim, c = self.sim, self.sim.cascade
        self.routes: dict[str, routing.Order] = {}
        for step in sim.models:
            weights = self.knob(step, "route_weights", {r: 1.0 for r in sim.physics[step]})
            self.routes[step] = routing.order(weights)  # by name, as the executor picks (tracetune.base.routing)
            size, wait = int(self.knob(step, "batch_max_size", 1)), float(self.knob(step, "batch_max_wait_ms", 0.0))
            bucketing = bool(self.knob(step, "length_bucketing", False))
            for batcher in self.batchers[step].values():
                batcher.size, batcher.wait_ms, batcher.bucketing = max(1, size), max(0.0, wait), bucketing
        for step, cache in self.caches.items():
            if "cache_enabled" in sim.spec.steps.get(step, {}):
                cache.configure({k: self.knob(step, k) for k in CACHE_KNOBS})
            else:
                cache.enabled = False
        if c:
            tiers = self.knob(c, "route_weights", {r: 1.0 for r in sim.cal.tiers})
            self.tiers = routing.order(tiers)
            self.threshold = float(self.knob(c, "cascade_threshold", 0.0))
            self.limit.limit = max(1, int(self.knob(c, "max_concurrency", 1 << 30)))
            self.timeout = float(self.knob(c, "timeout_seconds", 10.0))

    def route(self, step: str, u: float) -> str:
        return routing.at(self.routes[step], u)

    def tier(self, u: float) -> str:
        return routing.at(self.tiers, u)


@dataclass
class Trial:
    """A canary in the simulation: the config on trial, the version it is judged against, when it started."""

    config: PipelineConfig
    base_version: int
    started: float
    share: float
    reasons: list[str]
    changes: Mapping[str, Mapping[str, KnobValue]] = field(default_factory=dict)


class _Records:
    """Finished spans as columns (append-only lists), read back per window as numpy arrays."""

    def __init__(self, *columns: str):
        self.columns = columns
        self.data: dict[str, list] = {c: [] for c in columns}
        self.low = 0  # rows before this started before any window still to be read

    def add(self, *values) -> None:
        for column, value in zip(self.columns, values, strict=True):
            self.data[column].append(value)

    def window(self, start: float, end: float, keep: float) -> dict[str, np.ndarray]:
        times = self.data[self.columns[0]]
        while self.low < len(times) and times[self.low] < keep:
            self.low += 1
        t = np.asarray(times[self.low:], dtype=float)
        mask = (t >= start) & (t < end)
        return {c: np.asarray(self.data[c][self.low:])[mask] for c in self.columns}

    def since(self, start: float) -> dict[str, np.ndarray]:
        """Every row whose first column is >= `start` (rows are appended as spans end, not in start order)."""
        t = np.asarray(self.data[self.columns[0]], dtype=float)
        mask = t >= start
        return {c: np.asarray(v)[mask] for c, v in self.data.items()}

    def all(self) -> dict[str, np.ndarray]:
        return {c: np.asarray(v) for c, v in self.data.items()}


_ARRIVE, _MODEL, _TIMER, _BATCH_DONE, _ATTEMPT, _CALL_DONE, _TICK, _APPLY, _CANARY = range(9)


class _Simulation:
    """One arm over one workload: the event loop, the steps' state, the controller, and the spans it leaves."""

    def __init__(self, spec: PipelineSpec, calibration: Calibration, workload: Workload, slo: SLO | None,
                 arm: Arm, prices: PriceTable, settings: LoopSettings, apply_delay: float, seed: int):
        self.spec, self.cal, self.workload, self.slo, self.arm = spec, calibration, workload, slo, arm
        self.prices, self.settings, self.apply_delay = prices, settings, apply_delay
        self.cascade, self.model_step = roles(spec)
        self.effect = effect_step(spec, calibration)
        # Every step that declares batching or routes is a model step: the main one (whose confidence the
        # cascade reads) runs on `calibration.routes`, any other on `calibration.models[step]`.
        self.models = [s for s, knobs in spec.steps.items() if s != self.cascade and s != self.effect
                       and ("batch_max_size" in knobs or "route_weights" in knobs or s == self.model_step)]
        unknown = [s for s in self.models if s != self.model_step and s not in calibration.models]
        if unknown:
            raise ValueError(f"the calibration has no physics for model steps {unknown} of {spec.pipeline}")
        self.physics = {s: calibration.routes if s == self.model_step else calibration.models[s] for s in self.models}
        self.plain = [s for s in spec.steps if s not in (self.cascade, self.effect, *self.models)]
        self.stages: list[tuple[str, str]] = []
        self.gaps = [0.0]  # seconds of plain steps before each stage, and after the last
        for step in spec.steps:
            if step in self.plain:
                self.gaps[-1] += calibration.plain_ms.get(step, calibration.step_ms) / 1000
            else:
                self.stages.append(("model" if step in self.models else "cascade" if step == self.cascade
                                    else "effect", step))
                self.gaps.append(0.0)
        config = spec.defaults()
        if arm.kind == "static" and arm.config:
            config = spec.merge(config, {s: dict(v) for s, v in arm.config.items()})
        missing = [r for s in self.models for r in config.knob(s, "route_weights", {}) if r not in self.physics[s]]
        if self.cascade:
            missing += [r for r in config.knob(self.cascade, "route_weights", {}) if r not in calibration.tiers]
        if missing:
            raise ValueError(f"the calibration has no physics for routes {sorted(missing)} of {spec.pipeline}")
        self.config = config  # the config in force (what the tuner serves; executors apply it a poll later)
        self.version = config.version
        self.trial: Trial | None = None
        self.changes = 0
        self.decisions: list[dict[str, Any]] = []
        self.canaries = {"promoted": 0, "rolled_back": 0}
        self.last_change: float | None = None
        self.now = 0.0
        self.rng = random.Random(seed * 7919 + 17)
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self._tickets(workload)
        self.buckets = {name: [max(1.0, tier.rate_limit_rps), 0.0] for name, tier in calibration.tiers.items()}
        self.requests = _Records("start", "latency_ms", "cost", "right", "version", "tier", "remote_ms", "confidence",
                                 "index")
        self.spans = {s: _Records("start", "route", "duration", "cache", "ticket", "right", "cost", "confidence",
                                  "task") for s in self.models}
        self.model_spans = self.spans[self.model_step]
        self.batches = _Records("start", "route", "size", "duration", "padding", "step")
        self.batch_tasks: list[tuple[int, ...]] = []  # the tasks of each batch, in `batches` order
        self.cascade_spans = _Records("start", "route", "duration", "cache", "ticket", "retried", "error", "cost",
                                      "right", "task")
        self.effect_spans = _Records("start", "duration", "cost")
        self.core_price = {r: prices.routes.get(r, 0.0) for routes in self.physics.values() for r in routes}
        self.effect_price = prices.calls.get(self.effect, 0.0) if self.effect else 0.0
        self.token_price = {}
        for name, tier in calibration.tiers.items():
            price = prices.models.get(tier.model)
            self.token_price[name] = (tier.input_tokens * price.input_per_1m + tier.output_tokens * price.output_per_1m
                                      ) / 1e6 if price else 0.0
        self.lane = _Lane(self, config)
        self.canary_lane: _Lane | None = None
        self.canary_share = 0.0
        self.controller = None
        if arm.kind != "static":
            from tracetune.tuner import simarms

            self.controller = simarms.controller(arm, self)

    # ---- what controllers call -------------------------------------------------------------------
    def _next(self, changes: Mapping[str, Mapping[str, KnobValue]]) -> PipelineConfig:
        self.version += 1
        return replace(self.spec.merge(self.config, {s: dict(v) for s, v in changes.items()}), version=self.version)

    def _record(self, now: float, kind: str, changes: Any, reasons: Sequence[str]) -> None:
        self.decisions.append({"at_seconds": round(now, 1), "kind": kind, "changes": changes,
                               "reasons": list(reasons)})

    def change(self, changes: Mapping[str, Mapping[str, KnobValue]], reasons: Sequence[str], now: float) -> None:
        """Put `changes` in force for every task (executors pick them up one poll later)."""
        self.config = self._next(changes)
        self.last_change = now
        self.changes += 1
        self._record(now, "tune", changes, reasons)
        self.push(now + self.apply_delay, _APPLY, self.config)

    def start_canary(self, changes: Mapping[str, Mapping[str, KnobValue]], reasons: Sequence[str], now: float,
                     share: float) -> None:
        """Try `changes` on `share` of tasks (chosen by task, as the executor hashes task ids), from one poll on."""
        self.trial = Trial(self._next(changes), self.config.version, now, share, list(reasons),
                           {step: dict(values) for step, values in changes.items()})
        self._record(now, "canary_start", changes, reasons)
        self.push(now + self.apply_delay, _CANARY, self.trial)

    def canary_arms(self) -> tuple[canary_mod.Arm, canary_mod.Arm]:
        """Per-task samples of the config in force and of the canary since it started (as `canary.arms` reads)."""
        rows = self.requests.since(self.trial.started)
        thresholds = canary_mod.covariate_thresholds(self.spec, self.config, self.trial.config)
        # Each task's draws, by which the executor picks its routes (tracetune.base.routing): the same in both arms.
        index = rows["index"].astype(int)
        draws = {step: (self.u_route if step == self.model_step else self.u_steps[step])[index] for step in self.models}
        if self.cascade:
            draws[self.cascade] = self.u_tier[index]
        # The one model step's confidence: the step every cascade threshold reads.
        confidence = rows["confidence"].astype(float)
        x = canary_mod.both_covariates(self.spec, self.config, self.trial.config, draws,
                                       {step: confidence for step, _ in thresholds})
        arms = []
        for version in (self.trial.base_version, self.trial.config.version):
            mine = rows["version"] == version
            right = rows["right"][mine]
            arms.append(canary_mod.Arm.of(rows["latency_ms"][mine], rows["cost"][mine], 0, int(right.sum()),
                                          int(len(right)), x[mine] if x is not None else None))
        return arms[0], arms[1]

    def end_canary(self, promote: bool, reason: str, now: float) -> None:
        trial, self.trial = self.trial, None
        self.last_change = now
        self.canaries["promoted" if promote else "rolled_back"] += 1
        self._record(now, "canary_promote" if promote else "canary_rollback", trial.changes if promote else {},
                     [reason])
        if promote:
            self.config = trial.config
            self.changes += 1
        self.push(now + self.apply_delay, _APPLY, self.config)

    # ---- workload --------------------------------------------------------------------------------
    def _tickets(self, workload: Workload) -> None:
        """Every request's input and the draws that belong to it, the same for every arm (common random numbers)."""
        rng = np.random.default_rng(workload.seed)
        n = len(workload.arrivals)
        repeat = rng.random(n) < workload.duplicate_ratio
        pick = rng.random(n)
        ticket = np.empty(n, dtype=np.int64)
        recent: deque[int] = deque(maxlen=workload.recent)
        fresh = 0
        for i in range(n):
            if repeat[i] and recent:
                ticket[i] = recent[int(pick[i] * len(recent))]
            else:
                ticket[i] = fresh
                recent.append(fresh)
                fresh += 1
        self.ticket = ticket
        levels = np.linspace(0, 1, LEVELS)
        u_right, u_confidence = rng.random(fresh), rng.random(fresh)
        self.length = np.maximum(1, np.round(np.interp(rng.random(fresh), levels, self.cal.lengths))).astype(int)
        self.urgent = rng.random(fresh) < self.cal.effect_share
        self.right, self.confidence = {}, {}
        for name, route in self.cal.routes.items():  # one draw per ticket for every route: routes agree mostly
            right = u_right < route.accuracy
            self.right[name] = right
            self.confidence[name] = np.where(right, np.interp(u_confidence, levels, route.confidence_right),
                                             np.interp(u_confidence, levels, route.confidence_wrong))
        self.u_route, self.u_tier, self.u_remote = rng.random(n), rng.random(n), rng.random(n)
        self.z_remote, self.z_effect = rng.standard_normal(n), rng.standard_normal(n)
        self.u_canary = np.random.default_rng(workload.seed + 104_729).random(n)  # the task-id hash's stand-in
        self.u_steps = {step: np.random.default_rng([workload.seed, i]).random(n)  # routes of the other model steps
                        for i, step in enumerate(self.models) if step != self.model_step}

    # ---- events ----------------------------------------------------------------------------------
    def push(self, when: float, kind: int, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, kind, payload))

    def run(self) -> None:
        arrivals = self.workload.arrivals
        if len(arrivals):
            self.push(arrivals[0], _ARRIVE, 0)
        if self.controller is not None:
            self.push(self.settings.interval_seconds, _TICK)
        handlers = (self._arrive, self._model, self._timer, self._batch_done, self._attempt, self._call_done,
                    self._tick, self._apply_event, self._canary_event)
        end = self.workload.duration
        heap = self.heap
        while heap:
            when, _, kind, payload = heapq.heappop(heap)
            if kind == _TICK and when > end:
                continue
            self.now = when
            handlers[kind](when, payload)

    def _arrive(self, now: float, index: int) -> None:
        arrivals = self.workload.arrivals
        if index + 1 < len(arrivals):
            self.push(arrivals[index + 1], _ARRIVE, index + 1)
        lane = self.lane
        if self.canary_lane is not None and self.u_canary[index] < self.canary_share:
            lane = self.canary_lane
        self._advance(_Task(index, int(self.ticket[index]), now, lane), now)

    def _advance(self, task: _Task, now: float) -> None:
        """On to the task's next step that takes time of its own, after the plain steps before it."""
        task.stage += 1
        now += self.gaps[task.stage]
        if task.stage == len(self.stages):
            self.requests.add(task.start, (now - task.start) * 1000 + self.cal.overhead_ms, task.cost,
                              task.final_right, task.lane.config.version, task.tier, task.remote_ms, task.confidence,
                              task.index)
            return
        kind, step = self.stages[task.stage]
        if kind == "model":
            self.push(now, _MODEL, task)
        elif kind == "cascade":
            if task.confidence < task.lane.threshold:
                self._escalate(task, now)
            else:
                self._advance(task, now)
        elif self.urgent[task.ticket]:  # the side effect
            duration = self.cal.effect_median_ms * math.exp(self.cal.effect_sigma * self.z_effect[task.index])
            self.effect_spans.add(now, duration, self.effect_price)
            task.cost += self.effect_price
            self._advance(task, now + duration / 1000)
        else:
            self._advance(task, now)

    def _model(self, now: float, task: _Task) -> None:
        lane, step = task.lane, self.stages[task.stage][1]
        u = self.u_route if step == self.model_step else self.u_steps[step]
        route = lane.route(step, u[task.index])
        cache = lane.caches[step]
        if cache.enabled and cache.store.get(f"{route}|{task.ticket}") is not TTLCache.MISSING:
            self._modelled(task, step, route, now, now + self.cal.cache_hit_ms / 1000, 0, 0.0)
            return
        batcher = lane.batchers[step][route]
        batcher.queue.append((now, task))
        self._dispatch(batcher, now)

    def _dispatch(self, batcher: _Batcher, now: float) -> None:
        if batcher.busy or not batcher.queue:
            return
        due = now + seconds_until_due(len(batcher.queue), batcher.size, batcher.queue[0][0], batcher.wait_ms, now)
        if due > now + 1e-12:
            if batcher.timer is None or batcher.timer > due:
                batcher.timer = due
                self.push(due, _TIMER, batcher)
            return
        queued = [int(self.length[t.ticket]) for _, t in batcher.queue] if batcher.bucketing else \
            range(len(batcher.queue))  # without bucketing only the count matters (a backlog stays O(1) per batch)
        chosen = take_batch(queued, batcher.size, batcher.bucketing)
        batch = [batcher.queue[i] for i in chosen]
        for i in reversed(chosen):
            del batcher.queue[i]
        padding = padding_ratio([int(self.length[t.ticket]) for _, t in batch])
        route = self.physics[batcher.step][batcher.route]
        service = route.service.batch_ms(len(batch), padding) * math.exp(self.rng.gauss(0, route.service_sigma))
        batcher.busy = True
        self.batches.add(now, batcher.route, len(batch), service, padding, batcher.step)
        if batcher.step == self.model_step:
            self.batch_tasks.append(tuple(t.index for _, t in batch))
        self.push(now + service / 1000, _BATCH_DONE, (batcher, batch, service))

    def _timer(self, now: float, batcher: _Batcher) -> None:
        if batcher.timer is not None and batcher.timer <= now + 1e-12:
            batcher.timer = None
        self._dispatch(batcher, now)

    def _batch_done(self, now: float, payload) -> None:
        batcher, batch, service = payload
        batcher.busy = False
        share = service / 1000 / len(batch) * self.core_price.get(batcher.route, 0.0)
        for enqueued, task in batch:
            cache = task.lane.caches[batcher.step]
            if cache.enabled:
                cache.store.put(f"{batcher.route}|{task.ticket}", True)
            self._modelled(task, batcher.step, batcher.route, enqueued, now, 1 if cache.enabled else 2, share)
        self._dispatch(batcher, now)

    def _modelled(self, task: _Task, step: str, route: str, start: float, end: float, cache: int,
                  cost: float) -> None:
        task.cost += cost
        if step == self.model_step:  # the step whose confidence the cascade reads, and whose answer is judged
            task.route = route
            task.confidence = float(self.confidence[route][task.ticket])
            task.local_right = task.final_right = bool(self.right[route][task.ticket])
            self.model_spans.add(start, route, (end - start) * 1000, cache, task.ticket, task.local_right, cost,
                                 task.confidence, task.index)
        else:
            self.spans[step].add(start, route, (end - start) * 1000, cache, task.ticket, True, cost, 1.0, task.index)
        self._advance(task, end)

    def _escalate(self, task: _Task, now: float) -> None:
        lane = task.lane
        tier = lane.tier(self.u_tier[task.index])
        task.tier, task.escalate_start = tier, now
        if lane.cascade_cache.enabled:
            answer = lane.cascade_cache.store.get(f"{tier}|{task.ticket}")
            if answer is not TTLCache.MISSING:
                self._answered(task, now + self.cal.cache_hit_ms / 1000, 0, bool(answer), 0.0, False)
                return
        task.deadline = now + lane.timeout
        limit = lane.limit
        if limit.in_flight < limit.limit:
            limit.in_flight += 1
            self._attempt(now, task)
        else:
            limit.waiting.append(task)

    def _attempt(self, now: float, task: _Task) -> None:
        tier = self.cal.tiers[task.tier]
        task.attempts += 1
        bucket = self.buckets[task.tier]
        wait = 0.0
        if tier.rate_limit_rps > 0:
            capacity = max(1.0, tier.rate_limit_rps)
            bucket[0] = min(capacity, bucket[0] + (now - bucket[1]) * tier.rate_limit_rps)
            bucket[1] = now
            if bucket[0] >= 1:
                bucket[0] -= 1
            else:
                wait = (1 - bucket[0]) / tier.rate_limit_rps
        if not wait:
            z = self.z_remote[task.index] if task.attempts == 1 else self.rng.gauss(0, 1)
            latency = tier.median_ms * math.exp(tier.sigma * z) / 1000
            self.push(min(now + latency, task.deadline), _CALL_DONE, (task, now + latency <= task.deadline, True))
            return
        answered = now + self.cal.rejected_ms / 1000
        cap = min(self.cal.retry_max_seconds, self.cal.retry_base_seconds * 2 ** (task.attempts - 1))
        delay = min(self.cal.retry_max_seconds, max(cap * self.rng.random(), max(1, math.ceil(wait))))
        if task.attempts >= self.cal.retry_attempts or answered + delay > task.deadline:
            self.push(answered, _CALL_DONE, (task, False, False))
        else:
            self.push(answered + delay, _ATTEMPT, task)

    def _call_done(self, now: float, payload) -> None:
        task, ok, sent = payload  # sent: the provider took the call (not answered 429), so it bills it
        limit, cache = task.lane.limit, task.lane.cascade_cache
        limit.in_flight -= 1
        while limit.waiting and limit.in_flight < limit.limit:
            limit.in_flight += 1
            self._attempt(now, limit.waiting.popleft())
        if not ok:
            # A call the client stopped waiting for still ran at the provider, which bills its tokens: a timeout
            # keeps the local answer and cuts the task's latency, not its cost. A 429 ran nothing and costs nothing.
            self._answered(task, now, 2 if not cache.enabled else 1, None,
                           self.token_price[task.tier] if sent else 0.0, task.attempts > 1)
            return
        right = self.u_remote[task.index] < self.cal.tiers[task.tier].accuracy_at(task.confidence)
        if cache.enabled:
            cache.store.put(f"{task.tier}|{task.ticket}", bool(right))
        self._answered(task, now, 1 if cache.enabled else 2, right, self.token_price[task.tier], task.attempts > 1)

    def _answered(self, task: _Task, now: float, cache: int, right: bool | None, cost: float, retried: bool) -> None:
        task.cost += cost
        error = right is None
        task.final_right = task.local_right if error else bool(right)
        task.remote_ms = (now - task.escalate_start) * 1000
        self.cascade_spans.add(task.escalate_start, task.tier, (now - task.escalate_start) * 1000, cache, task.ticket,
                               retried, error, cost, -1 if error else int(bool(right)), task.index)
        self._advance(task, now)

    # ---- control ---------------------------------------------------------------------------------
    def _tick(self, now: float, _) -> None:
        self.push(now + self.settings.interval_seconds, _TICK)
        self.controller.tick(self, now)

    def _apply_event(self, now: float, config: PipelineConfig) -> None:
        """Executors poll `config`: the steps take its values and a canary that is no longer served ends."""
        if config is not self.config:  # a newer config is on its way
            return
        self.lane.set(config)
        if self.trial is None:
            self.canary_lane = None
        self._wake(self.lane)

    def _canary_event(self, now: float, trial: Trial) -> None:
        if trial is not self.trial:  # ended before executors saw it
            return
        self.canary_lane, self.canary_share = _Lane(self, trial.config, self.lane), trial.share

    def _wake(self, lane: _Lane) -> None:
        for batchers in lane.batchers.values():
            for batcher in batchers.values():
                self._dispatch(batcher, self.now)
        limit = lane.limit
        while limit.waiting and limit.in_flight < limit.limit:
            limit.in_flight += 1
            self._attempt(self.now, limit.waiting.popleft())

    def observe(self, now: float) -> Observation:
        """The last window of simulated spans as `tuner.observe.collect` would read them from ClickHouse."""
        window = float(self.settings.window_seconds)
        start, keep = now - window, now - max(window, float(self.settings.label_window_seconds)) - 120
        roots = self.requests.window(start, now, keep)
        first = float(roots["start"].min()) if len(roots["start"]) else now
        obs = Observation(self.spec.pipeline, float(min(window, max(1.0, now - first))))
        n = len(roots["start"])
        obs.requests = n
        if not n:
            return obs
        obs.p95_ms = float(np.quantile(roots["latency_ms"], 0.95))
        obs.p99_ms = float(np.quantile(roots["latency_ms"], 0.99))
        obs.p95_low_ms = float(np.quantile(roots["latency_ms"], low_level(0.95, n)))
        obs.p99_low_ms = float(np.quantile(roots["latency_ms"], low_level(0.99, n)))
        total = 0.0
        batches = self.batches.window(start, now, keep)
        for step in self.models:
            spans = self.spans[step].window(start, now, keep)
            obs.steps[step] = self._routes(spans, with_labels=step == self.model_step)
            mine = batches["step"] == step
            obs.batches[step] = [BatchSample(int(s), float(d), float(p)) for s, d, p in
                                 zip(batches["size"][mine][::-1][:5000], batches["duration"][mine][::-1][:5000],
                                     batches["padding"][mine][::-1][:5000], strict=True)]
            total += float(spans["cost"].sum())
        model = self.model_spans.window(start, now, keep)
        for step in self.plain:
            obs.steps[step] = {"": RouteObservation(spans=n, p95_ms=self.cal.plain_ms.get(step, self.cal.step_ms))}
        if self.cascade:
            spans = self.cascade_spans.window(start, now, keep)
            obs.steps[self.cascade] = self._routes(spans, with_labels=True)
            total += float(spans["cost"].sum())
            # As observe.collect reads them: the labelled answers of the label window, newest first, pooled in the
            # route mix of the window (every simulated task is labelled).
            label_start = now - max(window, float(self.settings.label_window_seconds))
            pooled = self.model_spans.window(label_start, now, keep)
            escalated = self.cascade_spans.window(label_start, now, keep)
            remote = dict(zip(escalated["task"].tolist(), escalated["right"].tolist(), strict=True))
            tier = dict(zip(escalated["task"].tolist(), escalated["route"].tolist(), strict=True))
            obs.cascade_samples[self.cascade] = pool(
                [CascadeSample(float(c), bool(r), None if remote.get(t, -1) < 0 else bool(remote[t]), str(route),
                               str(tier.get(t, "")), bool(at >= start))
                 for c, r, t, route, at in zip(pooled["confidence"][::-1], pooled["right"][::-1], pooled["task"][::-1],
                                               pooled["route"][::-1], pooled["start"][::-1], strict=True)],
                Counter(model["route"].tolist()), Counter(spans["route"][spans["right"] >= 0].tolist()))
            # As observe.collect reads them: each task's end-to-end latency, by the route it escalated to, if any.
            obs.task_latency[self.cascade] = task_latency(
                (ms, tier != "", tier, remote) for ms, tier, remote in zip(
                    roots["latency_ms"].tolist(), roots["tier"].tolist(), roots["remote_ms"].tolist(), strict=True))
            finals = [bool(remote[t]) if remote.get(t, -1) >= 0 else bool(r)
                      for r, t in zip(model["right"], model["task"], strict=True)]
            if finals:
                obs.quality, obs.labelled = sum(finals) / len(finals), len(finals)
        if self.effect:
            spans = self.effect_spans.window(start, now, keep)
            if len(spans["start"]):
                obs.steps[self.effect] = {self.cal.effect_route: RouteObservation(
                    spans=len(spans["start"]), p95_ms=float(np.quantile(spans["duration"], 0.95)),
                    cost=float(spans["cost"].sum()))}
                total += float(spans["cost"].sum())
        obs.cost_per_1k = 1000 * total / n
        return obs

    @staticmethod
    def _routes(spans: Mapping[str, np.ndarray], with_labels: bool) -> dict[str, RouteObservation]:
        out: dict[str, RouteObservation] = {}
        for route in sorted(set(spans["route"].tolist())):
            mine = spans["route"] == route
            cache, right = spans["cache"][mine], spans["right"][mine]
            answered = right >= 0 if right.dtype != bool else np.ones(len(right), dtype=bool)
            out[route] = RouteObservation(
                spans=int(mine.sum()), p95_ms=float(np.quantile(spans["duration"][mine], 0.95)),
                hits=int((cache == 0).sum()), misses=int((cache == 1).sum()), bypass=int((cache == 2).sum()),
                hashed=int(mine.sum()), distinct_inputs=len(set(spans["ticket"][mine].tolist())),
                retried=int(spans["retried"][mine].sum()) if "retried" in spans else 0,
                errors=int(spans["error"][mine].sum()) if "error" in spans else 0,
                cost=float(spans["cost"][mine].sum()),
                correct=int((right[answered] == 1).sum()) if with_labels else 0,
                labelled=int(answered.sum()) if with_labels else 0)
        return out


# ---- results ------------------------------------------------------------------------------------

def slo_windows(starts: np.ndarray, latencies: np.ndarray, slo: SLO | None, skip_seconds: float = 300.0,
                window_seconds: float = 60.0) -> tuple[float, list[dict[str, float]]]:
    """Share of whole `window_seconds` windows after `skip_seconds` whose p95 (and p99) meet the SLO, and the
    per-window figures (by request start time)."""
    if not len(starts):
        return math.nan, []
    bins = (np.asarray(starts) // window_seconds).astype(int)
    rows = []
    for b in range(int(bins.max()) + 1):
        mine = latencies[bins == b]
        if not len(mine):
            continue
        rows.append({"minute": b * window_seconds / 60, "requests": int(len(mine)),
                     "p95_ms": float(np.quantile(mine, 0.95)), "p99_ms": float(np.quantile(mine, 0.99))})
    judged = [r for r in rows if r["minute"] * 60 >= skip_seconds]
    if not judged:
        return math.nan, rows

    def inside(r: dict[str, float]) -> bool:
        return (slo is None or slo.p95_ms is None or r["p95_ms"] <= slo.p95_ms) and \
            (slo is None or slo.p99_ms is None or r["p99_ms"] <= slo.p99_ms)

    return sum(inside(r) for r in judged) / len(judged), rows


def _row(sim: _Simulation, skip_seconds: float) -> dict[str, Any]:
    roots = sim.requests.all()
    n = len(roots["start"])
    share, windows = slo_windows(roots["start"], roots["latency_ms"], sim.slo, skip_seconds)
    by_step = {step: float(np.sum(sim.spans[step].data["cost"])) for step in sim.models}
    if sim.cascade:
        by_step[sim.cascade] = float(np.sum(sim.cascade_spans.data["cost"]))
    if sim.effect:
        by_step[sim.effect] = float(np.sum(sim.effect_spans.data["cost"]))
    minutes = (roots["start"] // 60).astype(int) if n else np.array([], dtype=int)
    cost_by_minute = np.bincount(minutes, weights=roots["cost"]) if n else np.array([])
    count_by_minute = np.bincount(minutes) if n else np.array([])
    right_by_minute = np.bincount(minutes, weights=roots["right"].astype(float)) if n else np.array([])
    for w in windows:
        m = int(w["minute"])
        w["cost_per_1k"] = float(1000 * cost_by_minute[m] / count_by_minute[m]) if count_by_minute[m] else math.nan
        w["right"] = float(right_by_minute[m])
    late = roots["start"] >= skip_seconds
    end = sim.workload.duration
    settled = roots["start"] >= 0.75 * end
    half = roots["start"] >= 0.5 * end
    return {
        "arm": sim.arm.name,
        "requests": n,
        "cost_per_1k": float(1000 * roots["cost"].sum() / n) if n else math.nan,
        # Once a tuner has settled: the last quarter of the run (the rest holds its convergence, a change per
        # cooldown at most, each at most half a knob's value).
        "cost_per_1k_late": float(1000 * roots["cost"][settled].mean()) if settled.any() else math.nan,
        "cost_per_1k_half": float(1000 * roots["cost"][half].mean()) if half.any() else math.nan,
        "labelled_after": int(late.sum()),
        "p95_ms": float(np.quantile(roots["latency_ms"], 0.95)) if n else math.nan,
        "p99_ms": float(np.quantile(roots["latency_ms"], 0.99)) if n else math.nan,
        "slo_windows": share,
        "quality": float(np.mean(roots["right"])) if n else math.nan,
        "quality_after": float(np.mean(roots["right"][late])) if late.any() else math.nan,
        # Tasks the cascade sent to a remote tier (its spans, answer-cache hits included), per request.
        "escalated": float(len(sim.cascade_spans.all()["start"]) / n) if n and sim.cascade else 0.0,
        "changes": sim.changes,
        "canaries": dict(sim.canaries),
        "cost_by_step": {step: 1000 * cost / n for step, cost in by_step.items()} if n else {},
        "config": sim.config.steps,
        "decisions": sim.decisions,
        "windows": windows,
    }


def simulate(spec: PipelineSpec, calibration: Calibration, workload: Workload, arm: Arm, *, slo: SLO | None = None,
             settings: LoopSettings = _LOOP, prices: PriceTable | None = None, apply_delay: float = 5.0,
             skip_seconds: float = 300.0, seed: int = 1) -> dict[str, Any]:
    """One arm over the workload: a result row (cost per 1k, p95, p99, share of SLO windows after
    `skip_seconds`, quality, config changes, cost per 1k by step, the final config, decisions and per-minute
    figures). `apply_delay`: seconds until executors poll a new config."""
    slo = slo if slo is not None else (SLO(spec.pipeline, **spec.slo) if spec.slo else None)
    sim = _Simulation(spec, calibration.validate(), workload, slo, arm, prices or load_prices(), settings,
                      apply_delay, seed)
    sim.run()
    return _row(sim, skip_seconds)


def _meets(row: Mapping[str, Any], slo: SLO | None, min_windows: float) -> bool:
    floor = slo.quality_floor if slo else None
    return row["slo_windows"] >= min_windows and (floor is None or row["quality"] >= floor)


def default_grid(spec: PipelineSpec) -> list[dict[str, dict[str, KnobValue]]]:
    """Static configs worth trying: cascade threshold x tier mix x escalation cache, and the model step's
    route mix (each route alone and as declared); batching stays declared (it moves compute, ~1% of cost)."""
    cascade, model = roles(spec)
    model_weights = [None]
    declared = spec.steps[model].get("route_weights")
    if declared is not None:
        model_weights += [{r: float(r == only) for r in declared.default} for only in declared.default]
    cascade_options: list[dict[str, KnobValue]] = [{}]
    if cascade:
        knobs = spec.steps[cascade]
        thresholds = [round(t, 2) for t in np.arange(0.40, 0.801, 0.05)]
        tiers = [None]
        if "route_weights" in knobs:
            names = list(knobs["route_weights"].default)
            cheap = names[0]
            tiers = [{n: (share if n == cheap else (1 - share) / (len(names) - 1)) for n in names}
                     for share in (0.0, 0.5, 0.7, 0.85, 1.0)]
        caches = [False, True] if "cache_enabled" in knobs else [None]
        cascade_options = []
        for t in thresholds:
            for w in tiers:
                for on in caches:
                    values: dict[str, KnobValue] = {"cascade_threshold": t}
                    if w is not None:
                        values["route_weights"] = w
                    if on is not None:
                        values["cache_enabled"] = on
                    cascade_options.append(values)
    grid = []
    for weights in model_weights:
        for values in cascade_options:
            config: dict[str, dict[str, KnobValue]] = {}
            if weights is not None:
                config[model] = {"route_weights": weights}
            if cascade:
                config[cascade] = dict(values)
            grid.append(config)
    return grid


def oracle(spec: PipelineSpec, calibration: Calibration, workload: Workload, *, slo: SLO | None = None,
           grid: Sequence[Mapping[str, Mapping[str, KnobValue]]] | None = None, min_windows: float = 0.99,
           progress: Callable[[int, int], None] | None = None, **options) -> tuple[dict[str, Any], list[dict]]:
    """The cheapest static config of `grid` (default `default_grid`) whose SLO windows after the first five
    minutes are inside the SLO in >= `min_windows` and whose quality holds the floor, with every row tried.
    With none feasible, the one closest to feasible (most SLO windows, then quality), marked infeasible."""
    slo = slo if slo is not None else (SLO(spec.pipeline, **spec.slo) if spec.slo else None)
    grid = list(grid if grid is not None else default_grid(spec))
    rows = []
    for i, config in enumerate(grid):
        row = simulate(spec, calibration, workload, Arm("oracle", "static", config), slo=slo, **options)
        row["grid_config"] = {s: dict(v) for s, v in config.items()}
        rows.append(row)
        if progress:
            progress(i + 1, len(grid))
    feasible = [r for r in rows if _meets(r, slo, min_windows)]
    if feasible:
        best = dict(min(feasible, key=lambda r: r["cost_per_1k"]))
        best["feasible"] = True
    else:
        best = dict(max(rows, key=lambda r: (r["slo_windows"], r["quality"])))
        best["feasible"] = False
    return best, rows


def run(spec: PipelineSpec, calibration: Calibration, workload: Workload, *, slo: SLO | None = None,
        grid: Sequence[Mapping[str, Mapping[str, KnobValue]]] | None = None,
        progress: Callable[[str, int, int], None] | None = None, **options) -> list[dict[str, Any]]:
    """The four arms on one workload: default, AIMD on batch size, the tuner, and the grid-searched oracle."""
    rows = []
    for i, arm in enumerate((Arm("default"), Arm("aimd", "aimd"), Arm("tuner", "tuner"))):
        rows.append(simulate(spec, calibration, workload, arm, slo=slo, **options))
        if progress:
            progress("arms", i + 1, 3)
    best, _ = oracle(spec, calibration, workload, slo=slo, grid=grid,
                     progress=(lambda done, total: progress("oracle", done, total)) if progress else None, **options)
    best["arm"] = "oracle"
    rows.append(best)
    return rows

"""The controllers a simulated arm runs, every tuning interval, on the spans the simulation leaves.

- `tuner`: the loop's own look (`loop.look`, which `loop.tune_once` runs over the store): cooldown after any
  change or canary end, `min_requests` and half a window of data, `loop.decide`, moves a canary rolled back
  lately are not retried, then the change goes on trial for `canary_share` of tasks and `canary.judge`
  promotes or rolls it back;
- `aimd`: additive increase, multiplicative decrease on every numeric knob (Clipper's rule for batch size,
  applied to all): while every objective holds each knob grows by a tenth of its default, when one is
  missed each is halved toward its lower bound; changes go to every task at once;
- `optuna`: a black-box optimiser (Optuna's TPE) over the whole declared knob space, one trial per tuning
  interval, each trial a canary judged by the same `canary.judge`; the trial's value is the canary's cost
  per 1k, ten times over when it missed the p95 target or the quality floor.

Also here: the declared knob space (`space`, `sample`), shared with the oracles' search, and the static
config a gateway would set (`gateway_config`: each routed step's cheapest route that holds the floor).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracetune.analyzer import SLO, PriceTable
from tracetune.tuner import canary
from tracetune.tuner.config import Knob, KnobValue, PipelineSpec
from tracetune.tuner.loop import Moves, Rejected, look

if TYPE_CHECKING:
    from tracetune.tuner.calibration import Calibration
    from tracetune.tuner.simulate import Arm, _Simulation

__all__ = ["controller", "gateway_config", "sample", "space", "perturb"]

Config = dict[str, dict[str, KnobValue]]


# ---- the declared knob space --------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    """One knob to search: its step, name and declaration; numbers spanning more than 50x are searched
    on a log scale (from `floor` when the declared low is 0)."""

    step: str
    name: str
    knob: Knob

    @property
    def log(self) -> bool:
        low, high = self.floor, self.knob.high
        return self.knob.kind in ("int", "float") and high is not None and high / low > 50

    @property
    def floor(self) -> float:
        low = self.knob.low if self.knob.low is not None else 0.0
        return max(low, 1.0 if self.knob.kind == "int" else 0.1) if self.knob.high and self.knob.high > 50 * max(
            low, 1e-9) else low


def space(spec: PipelineSpec) -> list[Dimension]:
    """Every knob every step declares, as the oracles' search and the Optuna arm see them."""
    return [Dimension(step, name, knob) for step, knobs in spec.steps.items() for name, knob in knobs.items()]


def _draw(dim: Dimension, rng: random.Random) -> KnobValue:
    knob = dim.knob
    if knob.kind == "bool":
        return rng.random() < 0.5
    if knob.kind == "weights":
        weights = {route: rng.random() ** 2 for route in knob.default}
        if rng.random() < 0.3:  # one route alone: what a search of independent weights rarely draws
            only = rng.choice(list(weights))
            weights = {route: float(route == only) for route in weights}
        return _weights(weights)
    low, high = dim.floor, knob.high if knob.high is not None else 10 * max(1.0, float(knob.default))
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if dim.log else rng.uniform(low, high)
    return int(round(value)) if knob.kind == "int" else float(value)


def _weights(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        first = next(iter(weights))
        return {route: float(route == first) for route in weights}
    return {route: round(w / total, 4) for route, w in weights.items()}


def sample(spec: PipelineSpec, rng: random.Random) -> Config:
    """A config drawn uniformly (log-uniformly for wide ranges) from the whole declared space."""
    config: Config = {}
    for dim in space(spec):
        config.setdefault(dim.step, {})[dim.name] = _draw(dim, rng)
    return config


def perturb(spec: PipelineSpec, config: Mapping[str, Mapping[str, KnobValue]], rng: random.Random,
            scale: float = 0.3) -> Config:
    """A neighbour of `config` for local search: one to three knobs moved (numbers by up to `scale`
    relative, on the log scale where searched so; bools flipped; weights shifted)."""
    out: Config = {s: dict(v) for s, v in config.items()}
    dims = space(spec)
    for dim in rng.sample(dims, k=min(len(dims), rng.randint(1, 3))):
        knob, value = dim.knob, out.get(dim.step, {}).get(dim.name, dim.knob.default)
        if knob.kind == "bool":
            new: KnobValue = not value
        elif knob.kind == "weights":
            new = _weights({r: max(0.0, w + rng.uniform(-0.3, 0.3)) for r, w in dict(value).items()})
        else:
            low, high = dim.floor, knob.high if knob.high is not None else 10 * max(1.0, float(knob.default))
            x = float(value)
            step = rng.uniform(-scale, scale)
            x = x * math.exp(2 * step) if dim.log else x + step * (high - low)
            x = min(high, max(low, x))
            new = int(round(x)) if knob.kind == "int" else float(x)
        out.setdefault(dim.step, {})[dim.name] = new
    return out


# ---- the gateway's static rule ------------------------------------------------------------------

def gateway_config(spec: PipelineSpec, calibration: Calibration, slo: SLO | None, prices: PriceTable) -> Config:
    """Each routed step on its cheapest route whose accuracy (as measured for the calibration) holds the
    quality floor, else on its most accurate route; every other knob as declared. A static rule, as an
    LLM gateway or model router is configured by hand."""
    floor = slo.quality_floor if slo and slo.quality_floor is not None else 0.0
    config: Config = {}
    for step, knobs in spec.steps.items():
        if "route_weights" not in knobs:
            continue
        routes = list(knobs["route_weights"].default)
        options: dict[str, tuple[float, float]] = {}  # route -> (accuracy, price of one call)
        for route in routes:
            if route in calibration.routes:
                model = calibration.routes[route]
                options[route] = (model.accuracy, model.service.batch_ms(1, 0.0) / 1000 * prices.routes.get(route, 0))
            elif route in calibration.tiers:
                tier = calibration.tiers[route]
                price = prices.models.get(tier.model)
                per_call = (tier.input_tokens * price.input_per_1m + tier.output_tokens * price.output_per_1m) / 1e6 \
                    if price else 0.0
                options[route] = (tier.accuracy, per_call)
        if not options:
            continue
        holding = [r for r, (accuracy, _) in options.items() if accuracy >= floor]
        pick = min(holding, key=lambda r: options[r][1]) if holding else max(options, key=lambda r: options[r][0])
        config[step] = {"route_weights": {r: float(r == pick) for r in routes}}
    return config


# ---- controllers ----------------------------------------------------------------------------------

def controller(arm: Arm, sim: _Simulation) -> Any:
    """The controller for `arm` (kind tuner, aimd or optuna)."""
    if arm.kind == "tuner":
        return LoopController(remember_moves=bool((arm.options or {}).get("moves", True)))
    if arm.kind == "aimd":
        return AimdController()
    if arm.kind == "optuna":
        return OptunaController(sim.spec, arm.seed)
    raise ValueError(f"no controller for arm kind {arm.kind!r}")


def _enough(sim: _Simulation, now: float) -> Any:
    """The loop's guardrails before it decides: cooldown, then enough requests over half a window; the
    observation, or None."""
    s = sim.settings
    if sim.last_change is not None and now - sim.last_change < s.cooldown_seconds:
        return None
    obs = sim.observe(now)
    if obs.requests < s.min_requests or obs.window_seconds < s.window_seconds / 2:
        return None
    return obs


def _judge(sim: _Simulation, now: float) -> canary.Verdict:
    base, tried = sim.canary_arms()
    s = sim.settings
    return canary.judge(base, tried, sim.slo, min_requests=s.canary_min_requests,
                        **canary.out_of_time(now - sim.trial.started, s.canary_max_seconds))


class LoopController:
    """The loop in virtual time: each interval `loop.look` (the function `loop.tune_once` runs over the store)
    on what the simulation keeps, then the simulation does what `tune_once` writes: ends the canary, or puts
    the plan on trial (or in force, with `canary_share` 0)."""

    def __init__(self, remember_moves: bool = True) -> None:
        self.rejected: Rejected | None = None  # the canary rolled back last, as the loop reads it from the audit
        self.moves = Moves()  # the last applied move per knob, as the loop rebuilds it from the audit
        self.remember_moves = remember_moves  # False: decide without them (no hold on reversals)
        self.plan: Any = None  # the plan on trial

    def tick(self, sim: _Simulation, now: float) -> None:
        s = sim.settings
        outcome = look(sim.spec, sim.config, sim.slo, s, now, measure=lambda: sim.observe(now),
                       since_change=None if sim.last_change is None else now - sim.last_change,
                       trial_age=None if sim.trial is None else now - sim.trial.started, arms=sim.canary_arms,
                       moves=lambda: self.moves if self.remember_moves else None, rejected=lambda: self.rejected,
                       trial_figures=lambda: self.plan.figures() if self.plan is not None else {})
        if outcome.verdict is not None:
            verdict = outcome.verdict
            if verdict.action == "wait":
                return
            trial, before = sim.trial, sim.config
            sim.end_canary(verdict.action == "promote", verdict.reason, now)
            if verdict.action == "promote":
                self.moves.record(self.plan, now)
            else:
                self.rejected = Rejected(now, trial.config.version, before.steps, trial.config.steps,
                                         canary.failures(verdict.figures), self.plan.move_effects())
            return
        plan = outcome.plan
        if plan is None:
            return
        # A plan is about to be tried (as in tune_once).
        if s.canary_share > 0:
            self.plan = plan
            sim.start_canary(plan.changes, plan.reason.split("\n"), now, s.canary_share)
        else:
            self.moves.record(plan, now)
            sim.change(plan.changes, plan.reason.split("\n"), now)


class AimdController:
    """AIMD on every numeric knob: grow each by a tenth of its default while every objective holds, halve
    each toward its lower bound when one is missed; straight to every task, at most once per cooldown."""

    def tick(self, sim: _Simulation, now: float) -> None:
        obs = _enough(sim, now)
        if obs is None:
            return
        slo = sim.slo
        missed = slo is not None and (
            (slo.p95_ms is not None and (obs.p95_ms or 0) > slo.p95_ms)
            or (slo.p99_ms is not None and (obs.p99_ms or 0) > slo.p99_ms)
            or (slo.quality_floor is not None and obs.quality is not None and obs.quality < slo.quality_floor))
        changes: Config = {}
        for dim in space(sim.spec):
            knob = dim.knob
            if knob.kind not in ("int", "float"):
                continue
            value = float(sim.config.knob(dim.step, dim.name, knob.default))
            low = knob.low if knob.low is not None else 0.0
            high = knob.high if knob.high is not None else math.inf
            new = low + (value - low) / 2 if missed else value + max(0.1 * abs(float(knob.default)),
                                                                      1.0 if knob.kind == "int" else 0.0)
            new = min(high, max(low, new))
            new = int(round(new)) if knob.kind == "int" else float(new)
            if new != sim.config.knob(dim.step, dim.name, knob.default):
                changes.setdefault(dim.step, {})[dim.name] = new
        if changes:
            sim.change(changes, [f"AIMD: {'objective missed: halve' if missed else 'objectives hold: grow'} "
                                 f"{sum(len(v) for v in changes.values())} numeric knobs"], now)


class OptunaController:
    """Optuna's TPE over the whole declared space: each interval without a trial out asks for one and puts
    it on canary; the canary's verdict (promote or roll back) and its cost tell the study."""

    def __init__(self, spec: PipelineSpec, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        self.dims = space(spec)
        self.asked: Any = None

    def _suggest(self, trial: Any) -> Config:
        config: Config = {}
        for dim in self.dims:
            knob, key = dim.knob, f"{dim.step}.{dim.name}"
            if knob.kind == "bool":
                value: KnobValue = trial.suggest_categorical(key, [False, True])
            elif knob.kind == "weights":
                value = _weights({r: trial.suggest_float(f"{key}.{r}", 0.0, 1.0) for r in knob.default})
            else:
                high = knob.high if knob.high is not None else 10 * max(1.0, float(knob.default))
                if knob.kind == "int":
                    value = trial.suggest_int(key, int(dim.floor), int(high), log=dim.log)
                else:
                    value = trial.suggest_float(key, dim.floor, high, log=dim.log)
            config.setdefault(dim.step, {})[dim.name] = value
        return config

    def tick(self, sim: _Simulation, now: float) -> None:
        if sim.trial is not None:
            verdict = _judge(sim, now)
            if verdict.action == "wait":
                return
            _, tried = sim.canary_arms()
            cost = tried.figures().get("cost_per_1k", math.inf)
            slo = sim.slo
            missed = slo is not None and (
                (slo.p95_ms is not None and (tried.p95() or math.inf) > slo.p95_ms)
                or (slo.quality_floor is not None and tried.labelled
                    and tried.correct / tried.labelled < slo.quality_floor))
            self.study.tell(self.asked, cost * (10 if missed else 1))
            self.asked = None
            sim.end_canary(verdict.action == "promote", verdict.reason, now)
            return
        if sim.observe(now).requests < sim.settings.min_requests:
            return
        self.asked = self.study.ask()
        config = self._suggest(self.asked)
        changes = {step: {k: v for k, v in values.items() if sim.config.knob(step, k) != v}
                   for step, values in config.items()}
        changes = {step: values for step, values in changes.items() if values}
        if not changes:
            self.study.tell(self.asked, math.inf)
            self.asked = None
            return
        sim.start_canary(changes, [f"Optuna trial {self.asked.number}"], now, sim.settings.canary_share or 0.2)

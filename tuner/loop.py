"""The tuning loop: every interval, for every declared pipeline, observe, decide, guard, apply, audit.

`decide` is pure (spec, config, SLO, observation in; knob changes, reasons and predictions out), so
it is tested on constructed numbers; `tune_once` adds the guardrails that need the store (freeze,
pin, cooldown, enough samples) and writes the new version and its decision row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tracetune.analyzer import SLO, get_slo
from tracetune.tuner import decisions, observe, versions
from tracetune.tuner.config import KnobValue, PipelineConfig, PipelineSpec
from tracetune.tuner.policies import (
    Proposal,
    batching_policy,
    caching_policy,
    cascade_policy,
    clamp_change,
    concurrency_policy,
    fit_service_time,
    routing_policy,
)

log = logging.getLogger("tracetune.tuner")

# Decisions that start a cooldown: any change to the config, by the loop or by hand.
CHANGES = ("tune", "pin", "change", "rollback")


@dataclass(frozen=True)
class LoopSettings:
    """How often and how carefully the loop acts (from the `tuner_*` settings)."""

    interval_seconds: float = 60.0
    window_seconds: int = 300  # what one observation covers
    cooldown_seconds: float = 300.0  # no decision sooner after the last change (its effect must show first)
    min_requests: int = 200  # no decision on fewer requests in the window
    staleness_limit_seconds: float = 3600.0  # longest a cached answer may be served
    max_relative_change: float = 0.5  # the most one decision moves a number, relative to its current value


@dataclass
class Plan:
    """What `decide` proposes: knob values by step, one reason per change, and the predicted effects."""

    changes: dict[str, dict[str, KnobValue]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)

    def add(self, proposal: Proposal | None, spec: PipelineSpec, current: Mapping[str, Any], limit: float) -> None:
        if proposal is None:
            return
        knobs = spec.steps[proposal.step]
        values, clamped_any = {}, False
        for name, value in proposal.values.items():
            clamped = clamp_change(knobs[name], current.get(name, knobs[name].default), value, limit)
            clamped_any = clamped_any or clamped != value
            if clamped != current.get(name):
                values[name] = clamped
        if values:
            self.changes.setdefault(proposal.step, {}).update(values)
            # A clamped change is a step toward the proposal; its predictions describe the whole proposal.
            note = f" (clamped to {values}, at most {limit:.0%} per decision)" if clamped_any else ""
            self.reasons.append(f"{proposal.step}: {proposal.reason}{note}")
            prefix = f"{proposal.step}.proposal." if clamped_any else f"{proposal.step}."
            self.predicted.update({prefix + k: float(v) for k, v in proposal.predicted.items()})


def step_target_ms(slo: SLO | None, obs: observe.Observation, step: str) -> float | None:
    """The latency a step may take: the pipeline's p95 target minus what the rest of the pipeline takes now."""
    if slo is None or slo.p95_ms is None:
        return None
    own = obs.step_total(step).p95_ms
    rest = max(0.0, (obs.p95_ms or 0.0) - own)
    return max(0.1 * slo.p95_ms, slo.p95_ms - rest)


def decide(spec: PipelineSpec, config: PipelineConfig, slo: SLO | None, obs: observe.Observation,
           settings: LoopSettings = LoopSettings()) -> Plan:
    """The knob changes the policies propose for every step that declares the knobs they act on."""
    plan = Plan()
    floor = slo.quality_floor if slo else None
    for step, knobs in spec.steps.items():
        current = {**{name: knob.default for name, knob in knobs.items()}, **config.steps.get(step, {})}
        total = obs.step_total(step)
        if not total.spans:
            continue
        target = step_target_ms(slo, obs, step)
        if "batch_max_size" in knobs and target is not None:
            plan.add(batching_policy(fit_service_time(obs.batches.get(step, [])), obs.arrival_rate(step), current,
                                     knobs, target, total.p95_ms, padding_ratio=obs.padding_ratio(step), step=step),
                     spec, current, settings.max_relative_change)
        if "cache_enabled" in knobs and total.hashed:
            plan.add(caching_policy(total.hashed, total.hashed - total.distinct_inputs, total.hits, current, knobs,
                                    settings.staleness_limit_seconds, total.distinct_inputs, obs.window_seconds,
                                    step=step), spec, current, settings.max_relative_change)
        if "route_weights" in knobs:
            plan.add(routing_policy(obs.route_stats(step), current["route_weights"], knobs["route_weights"], floor,
                                    target, step=step), spec, current, settings.max_relative_change)
        if "cascade_threshold" in knobs:
            plan.add(cascade_policy(obs.cascade_samples.get(step, []), current["cascade_threshold"],
                                    knobs["cascade_threshold"], floor, obs.cost_per_call(step), step=step),
                     spec, current, settings.max_relative_change)
        if "max_concurrency" in knobs:
            plan.add(concurrency_policy(int(current["max_concurrency"]), knobs["max_concurrency"], total.spans,
                                        total.retried, step=step), spec, current, settings.max_relative_change)
    return plan


def _age_seconds(decision: Mapping[str, Any], now: datetime) -> float:
    decided = decision["decided_at"]
    if decided.tzinfo is None:
        decided = decided.replace(tzinfo=UTC)
    return (now - decided).total_seconds()


def tune_once(client, pipeline: str, settings: LoopSettings = LoopSettings(),
              now: datetime | None = None) -> decisions.Decision | None:
    """One look at `pipeline`: the decision taken, or None (frozen, pinned, cooling down, too little data,
    nothing to change). Records the observed effect of the previous decision once its window has passed."""
    now = now or datetime.now(UTC)
    spec, config = versions.latest_spec(client, pipeline), versions.latest(client, pipeline)
    if spec is None or config is None:
        return None
    state = decisions.state(client, pipeline)
    if state.frozen or state.pinned:
        return None
    last = decisions.last_decision(client, pipeline, CHANGES)
    if last is not None and last["kind"] == "tune" and not last["observed"] \
            and _age_seconds(last, now) >= settings.window_seconds:
        decisions.observe(client, last["decision_id"], observe.collect(client, spec, settings.window_seconds).summary())
    if last is not None and _age_seconds(last, now) < settings.cooldown_seconds:
        return None
    obs = observe.collect(client, spec, settings.window_seconds)
    if obs.requests < settings.min_requests or obs.window_seconds < settings.window_seconds / 2:
        return None  # too few requests, or data for less than half a window (rates and TTLs would be guesses)
    plan = decide(spec, config, get_slo(client, pipeline), obs, settings)
    if not plan.changes:
        return None
    reason = "; ".join(plan.reasons)
    with versions.write_lock:  # the API's pin, rollback and freeze take the same lock
        latest_state = decisions.state(client, pipeline)  # a pin or freeze may have landed while we measured
        if latest_state.frozen or latest_state.pinned or versions.latest(client, pipeline) != config:
            return None
        new = versions.change(client, spec, plan.changes, author="tuner", reason=reason)
        if new.version == config.version:
            return None
        decision = decisions.Decision(pipeline, "tune", config.version, new.version, config.to_dict(),
                                      new.to_dict(), reason, predicted={
                                          **{f"before.{k}": v for k, v in obs.summary().items()}, **plan.predicted})
        decisions.record(client, decision)
    log.info("tuned %s to version %s: %s", pipeline, new.version, reason)
    return decision


def run(client_factory: Callable[[], Any], settings: LoopSettings, stop: threading.Event) -> None:
    """Tune every declared pipeline each interval until `stop` is set; one failing pipeline does not stop the rest."""
    client = client_factory()
    while not stop.wait(settings.interval_seconds):
        try:
            pipelines = [row["pipeline"] for row in versions.pipelines(client)]
        except Exception as exc:  # noqa: BLE001 - the store may be restarting; try again next interval
            log.warning("tuning loop: cannot list pipelines: %s", exc)
            continue
        for pipeline in pipelines:
            try:
                tune_once(client, pipeline, settings)
            except Exception as exc:  # noqa: BLE001 - log and go on with the next pipeline
                log.warning("tuning %s failed: %s", pipeline, exc)

"""The tuning loop: every interval, for every declared pipeline, observe, decide, guard, try, apply, audit.

`decide` is pure (spec, config, SLO, observation in; knob changes, reasons and predictions out), so
it is tested on constructed numbers; `tune_once` adds the guardrails that need the store (freeze,
pin, cooldown, enough samples, not retrying a change a canary just rejected), puts the new version
on trial for a share of tasks (`tuner.canary`), then promotes or rolls it back on the evidence, each
step with its decision row. With `canary_share` 0 a change goes to every task at once (`tune`).
With several tuner replicas, only the one holding the `tuner` lease runs the loop (`tracetune.store.lease`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tracetune.analyzer import SLO, get_slo
from tracetune.store.lease import Lease, hold
from tracetune.tuner import canary, decisions, observe, versions
from tracetune.tuner.config import KnobValue, PipelineConfig, PipelineSpec
from tracetune.tuner.policies import (
    Proposal,
    batching_policy,
    caching_policy,
    cascade_policy,
    cascade_route_floor,
    clamp_change,
    concurrency_policy,
    fit_service_time,
    routing_policy,
    slow_weight_cap,
)

log = logging.getLogger("tracetune.tuner")

# Decisions that start a cooldown: any change to the config, by the loop or by hand, and a canary's end.
CHANGES = ("tune", "pin", "change", "rollback", "canary_promote", "canary_rollback", "canary_cancel")
# Decisions whose effect on the whole pipeline is observed a window later.
OBSERVED = ("tune", "canary_promote")


@dataclass(frozen=True)
class LoopSettings:
    """How often and how carefully the loop acts (from the `tuner_*` settings)."""

    interval_seconds: float = 60.0
    window_seconds: int = 300  # what one observation covers
    cooldown_seconds: float = 300.0  # no decision sooner after the last change (its effect must show first)
    min_requests: int = 200  # no decision on fewer requests in the window
    staleness_limit_seconds: float = 3600.0  # longest a cached answer may be served
    max_relative_change: float = 0.5  # the most one decision moves a number, relative to its current value
    canary_share: float = 0.2  # share of tasks a new config is tried on first (0: straight to every task)
    canary_min_requests: int = 200  # tasks on each arm before a canary is judged
    canary_max_seconds: float = 1800.0  # a canary without enough tasks by then is rolled back
    rejected_memory_seconds: float = 3600.0  # a change a canary rolled back is not tried again sooner
    lease_seconds: float = 30.0  # several tuners: the one holding the `tuner` lease decides (store.lease)


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
            spent = (obs.cost_per_1k or 0.0) * obs.requests / 1000
            share = total.cost / spent if spent > 0 else None  # this step's part of what the pipeline costs
            plan.add(batching_policy(fit_service_time(obs.batches.get(step, [])), obs.arrival_rate(step), current,
                                     knobs, target, total.p95_ms, padding_ratio=obs.padding_ratio(step), step=step,
                                     cost_share=share),
                     spec, current, settings.max_relative_change)
        if "cache_enabled" in knobs and total.hashed:
            plan.add(caching_policy(total.hashed, total.hashed - total.distinct_inputs, total.hits, current, knobs,
                                    settings.staleness_limit_seconds, total.distinct_inputs, obs.window_seconds,
                                    step=step), spec, current, settings.max_relative_change)
        if "route_weights" in knobs:
            route_floor, cap = floor, None
            if step in spec.cascades and "cascade_threshold" in current:
                # The escalated answers carry only part of the pipeline's quality, and only the escalated
                # tasks' latency: the floor they need and the slow-tier weight the p95 target allows.
                route_floor = cascade_route_floor(obs.cascade_samples.get(step, []), current["cascade_threshold"],
                                                  floor)
                cap = slow_weight_cap(total.spans / obs.requests if obs.requests else 1.0)
            plan.add(routing_policy(obs.route_stats(step), current["route_weights"], knobs["route_weights"],
                                    route_floor, target, step=step, slow_cap=cap),
                     spec, current, settings.max_relative_change)
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
              now: datetime | None = None, active: Callable[[], bool] = lambda: True) -> decisions.Decision | None:
    """One look at `pipeline`: the decision taken, or None (frozen, pinned, cooling down, too little data,
    nothing to change). Records the observed effect of the previous decision once its window has passed.
    Writes nothing once `active()` says no (the tuner lost its lease while it measured)."""
    now = now or datetime.now(UTC)
    spec, config = versions.latest_spec(client, pipeline), versions.latest(client, pipeline)
    if spec is None or config is None:
        return None
    state = decisions.state(client, pipeline)
    if state.frozen or state.pinned:
        return None
    trial = canary.running(client, pipeline)
    if trial is not None:
        return _judge(client, spec, config, trial, settings, now, active)
    last = decisions.last_decision(client, pipeline, CHANGES)
    if last is not None and last["kind"] in OBSERVED and not last["observed"] \
            and _age_seconds(last, now) >= settings.window_seconds and active():
        decisions.observe(client, last["decision_id"], observe.collect(client, spec, settings.window_seconds).summary())
    if last is not None and _age_seconds(last, now) < settings.cooldown_seconds:
        return None
    obs = observe.collect(client, spec, settings.window_seconds)
    if obs.requests < settings.min_requests or obs.window_seconds < settings.window_seconds / 2:
        return None  # too few requests, or data for less than half a window (rates and TTLs would be guesses)
    plan = decide(spec, config, get_slo(client, pipeline), obs, settings)
    _drop_rejected(client, pipeline, config, plan, settings, now)
    if not plan.changes:
        return None
    reason = "; ".join(plan.reasons)
    predicted = {**{f"before.{k}": v for k, v in obs.summary().items()}, **plan.predicted}
    with versions.write_lock:  # the API's pin, rollback and freeze take the same lock
        latest_state = decisions.state(client, pipeline)  # a pin or freeze may have landed while we measured
        if not active() or latest_state.frozen or latest_state.pinned or versions.latest(client, pipeline) != config:
            return None
        if settings.canary_share > 0:
            trial = canary.start(client, spec, config, plan.changes, settings.canary_share, reason)
            decision = decisions.Decision(pipeline, "canary_start", config.version, trial.version, config.to_dict(),
                                          trial.config.to_dict(), f"{reason} [on trial for "
                                          f"{settings.canary_share:.0%} of tasks]", predicted=predicted)
        else:
            new = versions.change(client, spec, plan.changes, author="tuner", reason=reason)
            if new.version == config.version:
                return None
            decision = decisions.Decision(pipeline, "tune", config.version, new.version, config.to_dict(),
                                          new.to_dict(), reason, predicted=predicted)
        decisions.record(client, decision)
    log.info("%s %s version %s: %s", "tuned" if decision.kind == "tune" else "trying", pipeline,
             decision.version_after, decision.reason)
    return decision


def _same_way(base: Any, tried: Any, proposed: Any) -> bool:
    """Whether `proposed` moves a knob from `base` the way a rejected trial (`tried`) did."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (base, tried, proposed))
    if numbers:
        return (tried - base) * (proposed - base) > 0
    return proposed == tried


def _drop_rejected(client, pipeline: str, config: PipelineConfig, plan: Plan, settings: LoopSettings,
                   now: datetime) -> None:
    """Take out of `plan` the knob moves a canary rolled back lately (they would fail the same way)."""
    last = decisions.last_decision(client, pipeline, ("canary_rollback",))
    if last is None or _age_seconds(last, now) >= settings.rejected_memory_seconds:
        return
    tried, base = last["config_before"].get("steps", {}), last["config_after"].get("steps", {})
    dropped = []
    for step, values in list(plan.changes.items()):
        for knob, value in list(values.items()):
            before = base.get(step, {}).get(knob, config.knob(step, knob))
            after = tried.get(step, {}).get(knob, before)
            if after != before and _same_way(before, after, value):
                del values[knob]
                dropped.append(f"{step}.{knob}")
        if not values:
            del plan.changes[step]  # and its reasons: they describe a change no longer made
            plan.reasons = [r for r in plan.reasons if not r.startswith(f"{step}: ")]
            plan.predicted = {k: v for k, v in plan.predicted.items() if not k.startswith(f"{step}.")}
    if dropped:
        plan.reasons.append(f"left {', '.join(dropped)} alone: canary version {last['version_before']} "
                            f"moved them that way and was rolled back")


def _judge(client, spec: PipelineSpec, config: PipelineConfig, trial: canary.Canary, settings: LoopSettings,
           now: datetime, active: Callable[[], bool] = lambda: True) -> decisions.Decision | None:
    """Promote or roll back the canary on trial once the evidence says which (None while it is still out)."""
    age = (now - trial.started_at).total_seconds()
    base, tried = canary.arms(client, spec, trial, observe.answers(client, spec, int(age) + 60))
    verdict = canary.judge(base, tried, get_slo(client, spec.pipeline), min_requests=settings.canary_min_requests,
                           expired=age >= settings.canary_max_seconds)
    if verdict.action == "wait" and config.version == trial.base_version:
        return None
    with versions.write_lock:
        still = canary.running(client, spec.pipeline)
        if not active() or still is None or still.version != trial.version:
            return None
        in_force = versions.latest(client, spec.pipeline)
        if in_force is None or in_force.version != trial.base_version:
            verdict = canary.Verdict("cancel", f"canary version {trial.version} cancelled: version "
                                               f"{in_force.version if in_force else 0} is in force now, not "
                                               f"{trial.base_version}", verdict.figures)
        elif verdict.action == "wait":
            return None
        status, kind = {"promote": ("promoted", "canary_promote"), "rollback": ("rolled_back", "canary_rollback"),
                        "cancel": ("cancelled", "canary_cancel")}[verdict.action]
        canary.finish(client, trial, status, verdict.reason)
        if kind == "canary_promote":
            started = decisions.last_decision(client, spec.pipeline, ("canary_start",))
            predicted = started["predicted"] if started and started["version_after"] == trial.version else {}
            decision = decisions.Decision(spec.pipeline, kind, trial.base_version, trial.version,
                                          config.to_dict(), trial.config.to_dict(), verdict.reason, predicted)
        else:
            back = in_force or config
            decision = decisions.Decision(spec.pipeline, kind, trial.version, back.version, trial.config.to_dict(),
                                          back.to_dict(), verdict.reason)
        decisions.record(client, decision)
        decisions.observe(client, decision.decision_id, verdict.figures)
    log.log(logging.WARNING if kind == "canary_rollback" else logging.INFO, "%s %s version %s: %s",
            kind.replace("_", " "), spec.pipeline, trial.version, verdict.reason)
    return decision


def run(client_factory: Callable[[], Any], settings: LoopSettings, stop: threading.Event,
        lease: Lease | None = None) -> None:
    """Tune every declared pipeline each interval until `stop` is set; one failing pipeline does not stop the rest.

    Only while holding the `tuner` lease (`lease`, else one of `settings.lease_seconds`): with several
    tuner replicas one decides, the others stand by (and serve the API)."""
    client = client_factory()
    lease = lease or Lease(client_factory(), "tuner", settings.lease_seconds)

    def work(lost: threading.Event) -> None:
        while not lost.wait(settings.interval_seconds) and lease.holding():
            _tune_all(client, settings, lease.holding)

    hold(lease, stop, work)


def _tune_all(client, settings: LoopSettings, active: Callable[[], bool]) -> None:
    try:
        pipelines = [row["pipeline"] for row in versions.pipelines(client)]
    except Exception as exc:  # noqa: BLE001 - the store may be restarting; try again next interval
        log.warning("tuning loop: cannot list pipelines: %s", exc)
        return
    for pipeline in pipelines:
        if not active():
            return
        try:
            tune_once(client, pipeline, settings, active=active)
        except Exception as exc:  # noqa: BLE001 - log and go on with the next pipeline
            log.warning("tuning %s failed: %s", pipeline, exc)

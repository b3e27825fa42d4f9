"""The tuning loop: every interval, for every declared pipeline, observe, decide, guard, try, apply, audit.

`decide` is pure (spec, config, SLO, observation in; knob changes, reasons and predictions out), so
it is tested on constructed numbers. `look` is one look at a pipeline (judge the canary on trial, else
cooldown, enough samples, `decide`, not retrying a change a canary just rejected), reading through
callables and writing nothing, so the simulation runs the same step; `tune_once` is `look` over the
store: freeze and pin first, then it puts the new version on trial for a share of tasks
(`tuner.canary`, in `_try`), and promotes or rolls it back on the evidence (`_finish`), each with its
decision row. With `canary_share` 0 a change goes to every task at once (`tune`).
With several tuner replicas, only the one holding the `tuner` lease runs the loop (`tracetune.store.lease`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from tracetune.analyzer import SLO, get_slo
from tracetune.base import routing
from tracetune.base.settings import Settings
from tracetune.store.lease import Lease, hold
from tracetune.tuner import approval, canary, decisions, observe, versions
from tracetune.tuner.batching import (
    BUCKETED_PADDING_SCALE,
    ServiceModel,
    batching_policy,
    fit_service_time,
    predict_batching,
)
from tracetune.tuner.config import Knob, PipelineConfig, PipelineSpec, is_number, same_way
from tracetune.tuner.plan import MOVE, Part, Plan, move_figure, pipeline_effect, plain, scale_effect, take_out
from tracetune.tuner.policies import (
    TAIL_MARGIN,
    TAIL_SHARE,
    CascadeSample,
    RouteStats,
    caching_policy,
    cascade_policy,
    cascade_route_floor,
    cascade_tiers_policy,
    concurrency_policy,
    escalation_shares,
    local_route_floor,
    local_tiers_policy,
    quantile_name,
    routing_policy,
    slow_weight_cap,
    tiers_on_escalated,
    wilson_lower,
)
from tracetune.tuner.proposal import Proposal

log = logging.getLogger("tracetune.tuner")

# Decisions that start a cooldown: any change to the config, by the loop or by hand, and a canary's end.
CHANGES = ("tune", "pin", "change", "rollback", "canary_promote", "canary_rollback", "canary_cancel")
# Decisions whose effect on the whole pipeline is observed a window later.
OBSERVED = ("tune", "canary_promote")


_SETTING_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def _setting(name: str) -> Any:
    """A LoopSettings field read from setting `name`, with that setting's default (tracetune/base/settings.py)."""
    return field(default=_SETTING_DEFAULTS[name], metadata={"setting": name})


@dataclass(frozen=True)
class LoopSettings:
    """How often and how carefully the loop acts: the `tuner_*` settings (`from_settings`; the defaults are
    the settings' own), and three the settings do not expose."""

    interval_seconds: float = _setting("tuner_interval_seconds")
    window_seconds: int = _setting("tuner_window_seconds")  # what one observation covers
    # the cascade's labelled answers are pooled over this (observe.pool), at least `window_seconds`
    label_window_seconds: int = _setting("tuner_label_window_seconds")
    # no decision sooner after the last change (its effect must show first)
    cooldown_seconds: float = _setting("tuner_cooldown_seconds")
    min_requests: int = _setting("tuner_min_requests")  # no decision on fewer requests in the window
    staleness_limit_seconds: float = _setting("cache_staleness_limit_seconds")  # longest a cached answer may be served
    max_relative_change: float = 0.5  # the most one decision moves a number, relative to its current value
    max_traffic_shift: float = 0.25  # the most of a step's traffic one decision moves between its routes
    max_threshold_step: float = 0.1  # the most one decision moves a cascade threshold
    # the share of tasks a new config is tried on first (0: straight to every task)
    canary_share: float = _setting("tuner_canary_share")
    canary_min_requests: int = _setting("tuner_canary_min_requests")  # tasks on each arm before a canary is judged
    # a canary without enough tasks by then is rolled back
    canary_max_seconds: float = _setting("tuner_canary_max_seconds")
    rejected_memory_seconds: float = 3600.0  # a change a canary rolled back is not tried again sooner
    reversal_hold_seconds: float = 3600.0  # a knob does not go back the way it moved sooner, on the same evidence
    # several tuners: the one holding the `tuner` lease decides (store.lease)
    lease_seconds: float = _setting("lease_seconds")
    # a proposal waiting for an operator expires after this (approval)
    approval_expiry_seconds: float = _setting("tuner_approval_expiry_seconds")

    @classmethod
    def from_settings(cls, settings: Settings) -> LoopSettings:
        """The loop's settings from the `tuner_*` settings (the rest at their defaults)."""
        return cls(**{f.name: getattr(settings, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata})


def step_target_ms(slo: SLO | None, obs: observe.Observation, step: str) -> float | None:
    """The latency a step may take: the pipeline's p95 target minus what the rest of the pipeline takes now."""
    if slo is None or slo.p95_ms is None:
        return None
    own = obs.step_total(step).p95_ms
    rest = max(0.0, (obs.p95_ms or 0.0) - own)
    return max(0.1 * slo.p95_ms, slo.p95_ms - rest)


def violations(slo: SLO | None, obs: observe.Observation, min_labelled: int = 30) -> dict[str, str]:
    """The objectives the pipeline misses now, each with its numbers: latency, quality, errors."""
    if slo is None:
        return {}
    missed = {}
    # A latency target is missed beyond doubt, as the floor is: its quantile's lower bound over the window's
    # requests over it (506 ms on a window of a few hundred requests is not a miss of 500 ms).
    for name, target, point, low in (("p95", slo.p95_ms, obs.p95_ms, obs.p95_low_ms),
                                     ("p99", slo.p99_ms, obs.p99_ms, obs.p99_low_ms)):
        if target is not None and point is not None and point > target and (low is None or low > target):
            missed[name] = f"{name} {point:.0f} ms over the {target:g} ms target"
    if slo.quality_floor is not None and obs.quality is not None and obs.labelled >= min_labelled \
            and 1 - wilson_lower((1 - obs.quality) * obs.labelled, obs.labelled) < slo.quality_floor:
        # Beyond doubt under the floor (its upper bound too): 0.929 on a few thousand labels is not a miss.
        missed["quality"] = f"quality {obs.quality:.3f} under the {slo.quality_floor:g} floor"
    if slo.error_rate is not None and obs.requests and obs.errors / obs.requests > slo.error_rate:
        missed["errors"] = f"errors {obs.errors / obs.requests:.2%} over {slo.error_rate:.2%}"
    return missed


def evidence(obs: observe.Observation, slo: SLO | None, spec: PipelineSpec | None = None) -> dict[str, float]:
    """What a move is made on, kept with it so a later reversal can be checked against it: load, each
    route's labelled accuracy, the price of a call that ran (cache hits aside) on routes whose cost per call
    the config does not set (not batched steps), and which objectives were missed. Not the pipeline's
    quality or cost: the knobs move those, so a change in them is the move's effect, not new evidence."""
    found = {"rate": obs.requests / obs.window_seconds if obs.window_seconds else 0.0,
             "window_seconds": obs.window_seconds}
    for step, routes in obs.steps.items():
        batched = spec is not None and "batch_max_size" in spec.steps.get(step, {})
        for route, r in routes.items():
            name = f"{step}.{route}"
            if r.labelled:
                found[f"{name}.correct"], found[f"{name}.labelled"] = float(r.correct), float(r.labelled)
            calls = r.spans - r.hits  # a cache hit costs nothing: the price is what a call that ran cost
            if calls > 0 and r.cost and not batched:
                found[f"{name}.unit_cost"], found[f"{name}.spans"] = r.cost / calls, float(calls)
    for name in violations(slo, obs):
        found[f"missed.{name}"] = 1.0
    return found


NO_GAIN = 0.02  # a cache resize predicting at most this many more hits (share of lookups) than now gains nothing
SATURATED = 0.01  # a remote step with more than this share of its calls answered 429 is at its providers' capacity
MIN_LABELLED = 30  # an accuracy on fewer labels than this is no evidence (as routing holds such a route)
NOISE_Z = 3.0  # a difference in load or accuracy counts as real beyond this many standard errors
PRICE_CHANGE = 0.2  # a per-call cost moving more than this share is a new price (not token-count noise)


def _proportion_z(c0: float, n0: float, c1: float, n1: float) -> float:
    if n0 <= 0 or n1 <= 0:
        return 0.0
    pooled = (c0 + c1) / (n0 + n1)
    spread = math.sqrt(max(pooled * (1 - pooled), 0.25 / (n0 + n1)) * (1 / n0 + 1 / n1))
    return (c1 / n1 - c0 / n0) / spread


def load_change(then: Mapping[str, float], now: Mapping[str, float]) -> str | None:
    """The load between two `evidence` records, in words, when it moved beyond noise (more than NOISE_Z
    standard errors of a Poisson count and 10%); else None. Evidence for going back only where it moves
    what the move was predicted to do (`_hold_reversals`)."""
    r0, r1 = then.get("rate", 0.0), now.get("rate", 0.0)
    w0, w1 = then.get("window_seconds", 0.0), now.get("window_seconds", 0.0)
    if r0 > 0 and w0 > 0 and w1 > 0:
        z = (r1 - r0) / math.sqrt(r0 / w0 + max(r1, 1e-9) / w1)  # Poisson counts
        if abs(z) > NOISE_Z and abs(r1 / r0 - 1) > 0.1:
            return f"load {r0:.1f} -> {r1:.1f} req/s"
    return None


def changed(then: Mapping[str, float], now: Mapping[str, float]) -> str | None:
    """What changed beyond noise between two `evidence` records besides load (a price, labelled accuracy, a
    newly missed objective), in words; None when nothing did. Load is `load_change`'s."""
    for key, price in now.items():
        if key.endswith(".unit_cost") and then.get(key):
            if abs(price / then[key] - 1) > PRICE_CHANGE:
                return f"{key.removesuffix('.unit_cost')} price {1000 * then[key]:.3g} -> {1000 * price:.3g} USD per 1k"
    for key in now:
        if key.endswith(".labelled") and key in then and min(now[key], then[key]) >= MIN_LABELLED:
            name = key.removesuffix(".labelled")
            z = _proportion_z(then.get(f"{name}.correct", 0.0), then[key], now.get(f"{name}.correct", 0.0), now[key])
            if abs(z) > NOISE_Z:
                return (f"{name} accuracy {then.get(f'{name}.correct', 0.0) / then[key]:.3f} -> "
                        f"{now.get(f'{name}.correct', 0.0) / now[key]:.3f}")
    for key in now:
        if key.startswith("missed.") and key not in then:
            return f"{key.removeprefix('missed.')} now missed"
    return None


def cost_effect(predicted: Mapping[str, float], step: str) -> float | None:
    """The change of cost a step's move was predicted to make (after minus before; its sign is what counts),
    from a plan's or a decision's predictions: cost per 1k (routing, the cascade) or compute per request
    (batching); None when no model predicted one (a cache, concurrency)."""
    for prefix in (f"{step}.", f"{step}.proposal."):
        for name in ("cost_per_1k", "compute_ms_per_request"):
            after, before = predicted.get(prefix + name), predicted.get(f"{prefix}{name}_before")
            if after is not None and before is not None:
                return float(after) - float(before)
    return None


@dataclass(frozen=True)
class Move:
    """The last move of one knob: from what to what, when (seconds on the caller's clock), on what evidence."""

    step: str
    knob: str
    before: Any
    after: Any
    at: float
    evidence: Mapping[str, float]
    cost_effect: float | None = None  # the step's predicted change of cost when it moved (`cost_effect`)

    def reversed_by(self, now: Any, proposed: Any) -> bool:
        """Whether moving the knob from `now` to `proposed` goes back the way this move came."""
        if isinstance(proposed, dict) and isinstance(self.after, dict):
            names = set(proposed) | set(self.after) | set(self.before or {}) | set(now or {})
            back = sum((float(proposed.get(n, 0)) - float((now or {}).get(n, 0)))
                       * (float(self.after.get(n, 0)) - float((self.before or {}).get(n, 0))) for n in names)
            return back < -1e-12
        if isinstance(proposed, bool) or isinstance(self.after, bool):
            return proposed == self.before and proposed != self.after
        try:
            return (float(proposed) - float(now)) * (float(self.after) - float(self.before)) < 0
        except (TypeError, ValueError):
            return proposed == self.before


class Moves(dict):
    """The last move per (step, knob): what `decide` checks a reversal against. The loop rebuilds it from
    the decision audit (`from_history`); a simulation keeps one and `record`s each plan it applies."""

    def record(self, plan: Plan, at: float) -> None:
        for step, values in plan.changes.items():
            for knob, value in values.items():
                self[(step, knob)] = Move(step, knob, plan.was(step, knob), value, at, dict(plan.evidence),
                                          cost_effect(plan.predicted, step))

    @classmethod
    def from_history(cls, rows: Sequence[Mapping[str, Any]]) -> Moves:
        """From `decisions.history` rows (newest first): the tuner's applied moves (tune, canary_promote)."""
        moves = cls()
        for row in reversed(list(rows)):
            if row["kind"] not in OBSERVED:
                continue
            before = row["config_before"].get("steps", {})
            after = row["config_after"].get("steps", {})
            evidence = {k.removeprefix("evidence."): v for k, v in row["predicted"].items()
                        if k.startswith("evidence.")}
            at = row["decided_at"].timestamp()
            for step, values in after.items():
                for knob, value in values.items():
                    if before.get(step, {}).get(knob) != value:
                        moves[(step, knob)] = Move(step, knob, before.get(step, {}).get(knob), value, at, evidence,
                                                   cost_effect(row["predicted"], step))
        return moves


def decide(spec: PipelineSpec, config: PipelineConfig, slo: SLO | None, obs: observe.Observation,
           settings: LoopSettings = LoopSettings(), *, moves: Mapping[tuple[str, str], Move] | None = None,
           now: float | None = None, bounds: Mapping[tuple[str, str], tuple[float, float]] | None = None,
           steps: Collection[str] | None = None, most_saving: bool = False, together: bool = True) -> Plan:
    """The knob changes the policies propose for every step that declares the knobs they act on.

    A missed objective (p95, quality, errors) comes first: proposals that would worsen it wait, and the
    rest move as far as their models say in one decision (no `max_relative_change` clamp). With `moves`
    (the last move per knob) and `now` (seconds, the clock `moves` were recorded on), a knob does not go
    back the way it last moved within `settings.reversal_hold_seconds` unless the evidence changed beyond
    noise (`changed`). `bounds`: (step, knob) -> the range a canary rolled back lately leaves a numeric knob
    (`Rejected.bounds`); a cascade threshold is searched within it, so the policy picks the best value left
    instead of one the rollback would hold back. `steps`: only these steps' knobs move, the others stay as they
    are. `together`: a cascade's local routes, threshold and tiers may be chosen together (`_with_cascade`); a
    plan some of whose moves chosen together a hold takes out or changes is decided again without it."""
    plan = Plan()
    floor = slo.quality_floor if slo else None
    missed = violations(slo, obs)
    plan.violated = list(missed)
    slow_now = "p95" in missed or "p99" in missed  # latency over a target: nothing may add to it
    limit = 1.0 if missed else settings.max_relative_change
    plan.before = {k: v for k, v in obs.summary().items() if k in ("cost_per_1k", "quality", "p95_ms")}
    plan.targets = {k: v for k, v in (("p95_ms", slo.p95_ms if slo else None), ("quality_floor", floor))
                    if v is not None}
    plan.evidence = evidence(obs, slo, spec)
    local_of = {local: cascade for cascade, local in spec.cascades.items()}
    # A cascade whose providers answer more than 1% of calls 429 is at their capacity now: any more load (a
    # burst) queues behind it. Its threshold and routes, and its local step's routes, move as far as their
    # models allow, as for a missed objective.
    saturated = {c for c in spec.cascades if obs.step_total(c).retried > SATURATED * max(obs.step_total(c).spans, 1)}
    joined: dict[str, Proposal | None] = {}  # a cascade's move chosen with its local step's routes
    for step, knobs in spec.steps.items():
        current = _in_force(spec, config, step)
        total = obs.step_total(step)
        if not total.spans or (steps is not None and step not in steps):
            continue
        target = step_target_ms(slo, obs, step)
        wide = bool(missed) or step in saturated  # an objective missed or its providers saturated: no step limit
        threshold_step = 1.0 if wide else settings.max_threshold_step
        knobs = _within(knobs, step, current, bounds or {}, quality_first="quality" in missed)
        if "batch_max_size" in knobs and target is not None:
            spent = (obs.cost_per_1k or 0.0) * obs.requests / 1000
            share = total.cost / spent if spent > 0 else None  # this step's part of what the pipeline costs
            model = fit_service_time(obs.batches.get(step, []))
            proposal = batching_policy(model, obs.arrival_rate(step), current,
                                       knobs, target, total.p95_ms, padding_ratio=obs.padding_ratio(step), step=step,
                                       cost_share=share)
            if proposal is not None and slow_now and proposal.predicted.get("p95_ms", 0.0) > total.p95_ms:
                plan.reasons.append(f"{step}: batching waits (it would add latency while p95 is over its target)")
                proposal = None
            plan.add(proposal, spec, current, limit)
            if proposal is not None and step in plan.changes and "p95_ms" in proposal.predicted \
                    and obs.p95_ms is not None:
                plan.effects.setdefault(step, {})["p95_ms"] = obs.p95_ms + proposal.predicted["p95_ms"] - total.p95_ms
            if proposal is not None and step in plan.changes and model is not None and total.cost > 0:
                _price_batching(plan, obs, proposal, model, current, step, total.cost / total.spans)
        if "cache_enabled" in knobs and total.hashed:
            proposal = caching_policy(total.hashed, total.hashed - total.distinct_inputs, total.hits, current, knobs,
                                      settings.staleness_limit_seconds, total.distinct_inputs, obs.window_seconds,
                                      step=step)
            hit_now = total.hits / total.hashed
            if proposal is not None and not missed and current.get("cache_enabled") \
                    and proposal.values.get("cache_enabled", True) \
                    and proposal.predicted.get("hit_ratio", 0.0) <= hit_now + NO_GAIN:
                # A resize of a cache that is on, predicting no more hits than now: nothing a canary could
                # show, so its trial could only run out of time while better moves wait.
                plan.reasons.append(f"{step}: cache size left as it is (predicted hit ratio "
                                    f"{proposal.predicted.get('hit_ratio', 0.0):.1%}, {hit_now:.1%} now)")
                proposal = None
            plan.add(proposal, spec, current, limit)
            hits_after = proposal.predicted.get("hit_ratio", 0.0) if proposal is not None else 0.0
            if step in plan.changes and total.cost > 0 and hits_after > hit_now:  # (a cache off predicts none)
                # Its saving: a hit is a call not paid for, so the step's calls cost (1 - hits) as much as the
                # misses now do. Filed as the pipeline's, so a cache whose saving no canary could show in its
                # time is not tried alone ("too small to show"), as any other move that only saves cost.
                _file_saving(plan, obs, proposal, total.cost / total.spans, (1 - hits_after) / (1 - hit_now))
        # A cascade's samples as its local step's routes will answer them once this decision is in force; while
        # quality is missed, the window's alone (the hour's pool would dilute a drift the window shows).
        samples = _as_mixed([s for s in obs.cascade_samples.get(step, []) if s.recent or "quality" not in missed],
                            config, plan, spec.cascades.get(step))
        joint = joined.get(step)  # chosen with its local step's routes, when that step came up
        if "cascade_threshold" in knobs and "route_weights" in knobs and "quality" not in missed and joint is None:
            every_target = _latency_targets(slo)
            joint = cascade_tiers_policy(samples, obs.route_stats(step), current["cascade_threshold"],
                                         current["route_weights"], knobs["cascade_threshold"], knobs["route_weights"],
                                         floor, step=step, max_step=threshold_step,
                                         max_shift=1.0 if wide else settings.max_traffic_shift,
                                         latency=obs.task_latency.get(step), latency_targets=every_target)
            plan.add(joint, spec, current, limit)
            if joint is not None and step in plan.changes:
                part = pipeline_effect(plan, obs, joint, share=1.0)
                if "p95_ms" in joint.predicted:
                    part.p95_ms = plan.effects[step]["p95_ms"] = joint.predicted["p95_ms"]
        if "cascade_threshold" in knobs and joint is None:
            remote_target = step_target_ms(slo, obs, step)
            slow = remote_target is not None and total.p95_ms > remote_target
            # Latency over a target: thresholds are judged on the pipeline's quantiles predicted at their share.
            targets = _latency_targets(slo) if slow_now else {}
            threshold_for = functools.partial(
                cascade_policy, current_threshold=current["cascade_threshold"], knob=knobs["cascade_threshold"],
                quality_floor=floor, remote_cost_per_call=obs.cost_per_call(step), step=step,
                max_step=threshold_step,
                escalation_cap=TAIL_MARGIN * TAIL_SHARE if slow else None,
                latency=obs.task_latency.get(step) if targets else None, latency_targets=targets,
                route_weights=current.get("route_weights"), quality_missed="quality" in missed)
            proposal = _not_worse_quality(threshold_for(samples), missed, plan)
            local = spec.cascades.get(step)
            if targets and not _restores(proposal, targets, slow) and "route_weights" in plan.changes.get(local, {}):
                # The local step's new mix leaves the cascade too few labelled answers from the routes it keeps
                # to prove the threshold that restores latency: latency first, the mix waits.
                as_now = list(obs.cascade_samples.get(step, []))
                restoring = _not_worse_quality(threshold_for(as_now), missed, plan)
                if _restores(restoring, targets, slow) and (floor is None or restoring.predicted.get(
                        "quality_lower_bound", -1.0) >= floor):  # shown to hold the floor, not on a point estimate
                    for part in [p for p in plan.parts if p.step == local and "route_weights" in p.knobs]:
                        take_out(plan, part)
                    plan.reasons.append(f"{local}: route_weights waits for a later decision: on the labelled "
                                        f"answers of the mix it sets, no {step} threshold could be shown to "
                                        f"restore {' and '.join(missed)}; on those of the mix in force one can")
                    samples, proposal = as_now, restoring
            plan.add(proposal, spec, current, limit)
            if proposal is not None and step in plan.changes:
                part = pipeline_effect(plan, obs, proposal, share=1.0)
                now_share = proposal.predicted.get("escalation_share_before", 0.0)
                if "p95_ms" in proposal.predicted:
                    part.p95_ms = plan.effects[step]["p95_ms"] = proposal.predicted["p95_ms"]
                elif slow and proposal.predicted.get("escalation_share", 1.0) <= TAIL_MARGIN * TAIL_SHARE < now_share:
                    # Escalations now fit in the tail the target allows: p95 becomes that of the tasks kept local.
                    part.p95_ms = plan.effects[step]["p95_ms"] = min(obs.p95_ms or math.inf, _local_ms(obs, spec, step))
        if "route_weights" in knobs and step in local_of and together and not missed \
                and (steps is None or local_of[step] in steps):
            busy = local_of[step] in saturated
            joined[local_of[step]] = _with_cascade(plan, spec, config, slo, obs, step, local_of[step], current, limit,
                                                   1.0 if busy else settings.max_threshold_step,
                                                   1.0 if busy else settings.max_traffic_shift)
        if "route_weights" in knobs and joint is None and joined.get(local_of.get(step, "")) is None:
            route_floor, cap = floor, None
            kept, reached = 1.0, total.spans / max(obs.requests, 1)  # the share of tasks the step's routes serve
            if step in spec.cascades and "cascade_threshold" in current:
                # The escalated answers carry only part of the pipeline's quality, and only the escalated
                # tasks' latency: the floor they need and the slow-tier weight the p95 target allows, at the
                # threshold this decision sets (the two knobs move together, in one decision).
                threshold = plan.changes.get(step, {}).get("cascade_threshold", current["cascade_threshold"])
                escalated = total.spans / obs.requests if obs.requests else 1.0
                if "cascade_threshold" in plan.changes.get(step, {}):
                    escalated = plan.predicted.get(f"{step}.escalation_share", escalated)
                route_floor = cascade_route_floor(samples, threshold, floor)
                cap = slow_weight_cap(escalated)
                reached = escalated
            stats = obs.route_stats(step)
            if step in spec.cascades and "cascade_threshold" in current:
                stats = tiers_on_escalated(stats, samples, threshold)
            if step in local_of:
                # A model step whose answers the cascade keeps only when sure: held to what the *pipeline's*
                # quality and floor leave it, not to the pipeline's floor itself; and a route is as dear as the
                # escalations its answers cause (a surer route sends fewer tasks to the remote tiers).
                route_floor, kept = _local_floor(spec, config, obs, step, local_of[step], floor)
                extra = _escalation_cost(config, obs, local_of[step])
                stats = _with_escalation_cost(stats, extra)
            shift = 1.0 if wide or local_of.get(step) in saturated else settings.max_traffic_shift
            proposal = _not_worse_quality(routing_policy(stats, current["route_weights"],
                                                         knobs["route_weights"], route_floor, target, step=step,
                                                         slow_cap=cap, max_shift=shift),
                                          missed, plan)
            plan.add(proposal, spec, current, limit)
            if proposal is not None and step in plan.changes:
                part = pipeline_effect(plan, obs, proposal, share=kept * reached, calls=reached)
                if step in local_of:  # the part of its cost change that is the cascade's, scaled by its moves
                    new = proposal.values["route_weights"]
                    part.escalations = (local_of[step], 1000 * reached * sum(
                        (float(new.get(r, 0.0)) - float(current["route_weights"].get(r, 0.0))) * extra[r]
                        for r in extra))
        if "max_concurrency" in knobs:
            plan.add(concurrency_policy(int(current["max_concurrency"]), knobs["max_concurrency"], total.spans,
                                        total.retried, step=step, latency_missed=slow_now,
                                        absorbed=total.errors == 0 or (slo is not None and slo.error_rate is not None
                                                                       and "errors" not in missed)),
                     spec, current, limit)
    _hold(plan, obs, floor, bool(missed), moves, now, settings, most_saving)
    if together and plan.together:
        apart = decide(spec, config, slo, obs, settings, moves=moves, now=now, bounds=bounds, steps=steps,
                       most_saving=most_saving, together=False)
        if broken := _broken(plan, plan.together):
            # Each was chosen for what the others do: with some held, the steps' own policies decide instead.
            apart.reasons.append(f"{'; '.join(_together_names(broken))}: chosen together, but a hold took some of "
                                 f"them out or changed them, so each step's own policy decided instead")
            return apart
        if _predicted_cost(apart) <= _predicted_cost(plan):
            # The moves chosen together beat each step's own policy at the local mix in force, not necessarily
            # the decision the steps' own policies make (a cheaper local route, say): the decision saving more.
            apart.reasons.append(f"{'; '.join(_together_names(plan.together))}: chosen together, predicted to cost "
                                 f"{_predicted_cost(plan):.4g} USD per 1k, not less than the "
                                 f"{_predicted_cost(apart):.4g} of each step's own policy, which decided instead")
            return apart
    if missed:
        plan.reasons.insert(0, "restoring first: " + "; ".join(missed.values())
                            + " (moves as far as the models allow, cost-only moves that would worsen it wait)")
    return plan


def _with_cascade(plan: Plan, spec: PipelineSpec, config: PipelineConfig, slo: SLO | None,
                  obs: observe.Observation, local: str, cascade: str, current: Mapping[str, Any], limit: float,
                  threshold_step: float, max_shift: float) -> Proposal | None:
    """A cascade's local routes, threshold and tiers chosen together (`local_tiers_policy`) when the cascade has
    a threshold and tiers: the local step's routes move with them instead of by the routing policy, each part
    filed with its share of the effect (the local move's alone, the cascade's the rest). Returns the cascade's
    proposal, added to `plan` already (None: no such move; the local step's and the cascade's own policies go
    on)."""
    knobs = spec.steps[cascade]
    if slo is None or "cascade_threshold" not in knobs or "route_weights" not in knobs \
            or not obs.step_total(cascade).spans:
        return None
    at_cascade = _in_force(spec, config, cascade)
    target = step_target_ms(slo, obs, local)
    stats = obs.route_stats(local)
    slow = {r.route for r in stats if target is not None and r.p95_ms is not None and r.p95_ms > target}
    found = local_tiers_policy(obs.cascade_samples.get(cascade, []), stats, obs.route_stats(cascade),
                               current["route_weights"], at_cascade["cascade_threshold"], at_cascade["route_weights"],
                               spec.steps[local]["route_weights"], knobs["cascade_threshold"], knobs["route_weights"],
                               slo.quality_floor, local, cascade, max_step=threshold_step, max_shift=max_shift,
                               slow=slow, latency=obs.task_latency.get(cascade), latency_targets=_latency_targets(slo))
    if found is None:
        return None
    local_move, cascade_move = found
    plan.add(local_move, spec, current, limit)
    plan.add(cascade_move, spec, at_cascade, limit)
    if local not in plan.changes or cascade not in plan.changes:
        for step, knob in ((local, "route_weights"), (cascade, "route_weights"), (cascade, "cascade_threshold")):
            plan.drop(step, knob)
        return None
    pipeline_effect(plan, obs, local_move, share=1.0, calls=obs.step_total(local).spans / max(obs.requests, 1))
    pipeline_effect(plan, obs, cascade_move, share=1.0)
    plan.together.append({(local, "route_weights"): plan.changes[local]["route_weights"],
                          **{(cascade, k): v for k, v in plan.changes[cascade].items()}})
    return cascade_move


def _in_force(spec: PipelineSpec, config: PipelineConfig, step: str) -> dict[str, Any]:
    """Every knob of `step` at its value in force: the config's, else the declared default."""
    return {**{name: knob.default for name, knob in spec.steps[step].items()}, **config.steps.get(step, {})}


def _latency_targets(slo: SLO | None) -> dict[float, float]:
    """The SLO's latency targets by quantile (0.95 -> p95_ms, 0.99 -> p99_ms), those it sets."""
    return {q: t for q, t in ((0.95, slo.p95_ms), (0.99, slo.p99_ms)) if t is not None} if slo else {}


def _predicted_cost(plan: Plan) -> float:
    """The pipeline's cost per 1k as `plan` predicts it (as now when it predicts none)."""
    return plan.after.get("cost_per_1k", plan.before.get("cost_per_1k", math.inf))


def _together_names(groups: Sequence[Mapping[tuple[str, str], Any]]) -> list[str]:
    """Moves chosen together, one group per item as `step.knob, ...`."""
    return [", ".join(sorted(f"{step}.{knob}" for step, knob in group)) for group in groups]


def _broken(plan: Plan, groups: Sequence[Mapping[tuple[str, str], Any]]) -> list[Mapping[tuple[str, str], Any]]:
    """The groups of moves chosen together some of which `plan` no longer makes as chosen (a hold or a rolled-back
    canary took them out, a reversal halved one)."""
    return [group for group in groups
            if any(plan.changes.get(step, {}).get(knob) != value for (step, knob), value in group.items())]


def _price_batching(plan: Plan, obs: observe.Observation, proposal: Proposal, model: ServiceModel,
                    current: Mapping[str, Any], step: str, per_call: float) -> None:
    """File a batching move's saving as the pipeline's: a batched step's calls are priced by their share of a
    batch's compute (batch time over batch size, per core-second), so the step costs what it costs now scaled by
    compute per request, predicted for the values the decision sets (a move clamped to half way saves less than
    the policy's best). A move whose saving no canary could show is then "too small to show", as any other."""
    before = proposal.predicted.get("compute_ms_per_request_before")
    values = {**current, **plan.changes[step]}
    padding = obs.padding_ratio(step)
    if bool(values.get("length_bucketing")) and not bool(current.get("length_bucketing")):
        padding *= BUCKETED_PADDING_SCALE
    after = predict_batching(model, obs.arrival_rate(step), int(values["batch_max_size"]),
                             float(values.get("batch_max_wait_ms", 0.0)), padding)["compute_ms_per_request"]
    if before and math.isfinite(after):
        _file_saving(plan, obs, proposal, per_call, after / before)


def _file_saving(plan: Plan, obs: observe.Observation, proposal: Proposal, per_call: float, factor: float) -> None:
    """File a move that makes its step's calls cost `factor` times the `per_call` (USD) they cost now as the
    pipeline's change of cost (a cache's hits, a batch's shared compute)."""
    proposal.predicted.update(cost_per_1k_before=1000 * per_call, cost_per_1k=1000 * per_call * factor)
    pipeline_effect(plan, obs, proposal, share=0.0)


def _hold(plan: Plan, obs: observe.Observation, floor: float | None, missed: bool,
          moves: Mapping[tuple[str, str], Move] | None, now: float | None, settings: LoopSettings,
          most_saving: bool = False) -> None:
    """Take out of `plan` what waits for a later decision. Reversals first: a move held as one must not take
    another out with it (the joint floor would hold a threshold back for a tier mix that is then held as a
    reversal, and the decision would change nothing)."""
    if moves and now is not None:
        _hold_reversals(plan, moves, now, settings)
    if not missed:
        _hold_unneeded_quality(plan, obs, floor)
    _hold_at_risk(plan)
    _hold_joint_floor(plan, floor, most_saving)


def _within(knobs: Mapping[str, Knob], step: str, current: Mapping[str, Any],
            bounds: Mapping[tuple[str, str], tuple[float, float]], quality_first: bool = False) -> Mapping[str, Knob]:
    """A step's cascade threshold knob narrowed to what a rolled-back canary leaves it (its current value kept
    inside); the other knobs as declared. While quality is missed, a threshold going up is quality first and
    not bounded (as `drop_rejected` does not hold back a move raising quality then)."""
    found = bounds.get((step, "cascade_threshold"))
    knob = knobs.get("cascade_threshold")
    if found is None or knob is None:
        return knobs
    low, high = found
    high = math.inf if quality_first else high
    value = float(current["cascade_threshold"])
    low = max(knob.low if knob.low is not None else -math.inf, min(low, value))
    high = min(knob.high if knob.high is not None else math.inf, max(high, value))
    return {**knobs, "cascade_threshold": replace(knob, default=value, low=low if math.isfinite(low) else None,
                                                  high=high if math.isfinite(high) else None)}


def _hold_unneeded_quality(plan: Plan, obs: observe.Observation, floor: float | None) -> None:
    """Moves that pay for quality wait while the pipeline's own quality holds its floor beyond doubt (its
    one-sided 95% lower bound over the window's labelled tasks at the floor or above). A step's floor is derived
    from the pipeline's through bounds on bounds (a tier mix on its few answers to the hard questions), so it
    can call for a dearer route the pipeline does not need; the floor is the pipeline's, and a canary judged on
    its gain could not promote such a move. Quality falling toward the floor lets them through again."""
    if floor is None or obs.quality is None or not obs.labelled:
        return
    bound = wilson_lower(obs.quality * obs.labelled, obs.labelled)
    if bound < floor:
        return
    for part in [p for p in plan.parts if p.live and p.cost_delta > 0 and p.quality_delta > 0
                 and not _buys_a_saving(plan, p)]:
        take_out(plan, part)
        left = "they are" if len(part.knobs) > 1 else "it is"
        plan.reasons.append(f"{part.step}: {', '.join(part.knobs)} left as {left}: the move would pay "
                            f"{part.cost_delta:+.4f} USD per 1k for quality, and the pipeline's quality "
                            f"{obs.quality:.3f} holds the {floor:g} floor beyond doubt (lower bound {bound:.3f} "
                            f"on {obs.labelled} labelled tasks)")


def _buys_a_saving(plan: Plan, part: Part) -> bool:
    """Whether `part` pays for quality that moves chosen with it spend on a saving (a surer local route that
    lets a cheaper tier hold the floor): the moves together cost less."""
    for group in plan.together:
        if any((part.step, knob) in group for knob in part.knobs):
            members = [p for p in plan.parts if p.live and any((p.step, knob) in group for knob in p.knobs)]
            return sum(p.cost_delta for p in members) < 0
    return False


def _hold_at_risk(plan: Plan) -> None:
    """While a threshold moves up because the one in force no longer holds the floor at its lower bound
    (quality first, not yet a missed objective), moves that lower quality wait for a later decision: the
    decision buys quality, and is judged on doing so (`canary.judge`'s `buys_quality`)."""
    at_risk = [p.step for p in plan.parts if p.live and p.quality_delta > 0
               and plan.predicted.get(f"{p.step}.floor_held_before") == 0.0]
    if not at_risk:
        return
    for part in [p for p in plan.parts if p.live and p.quality_delta < 0]:
        take_out(plan, part)
        plan.reasons.append(f"{part.step}: {', '.join(part.knobs)} waits for a later decision: it would lower "
                            f"quality while {at_risk[0]}'s threshold in force no longer holds the floor at its "
                            f"lower bound")


def _hold_joint_floor(plan: Plan, floor: float | None, most_saving: bool = False) -> None:
    """A decision whose predicted quality is not surely over the floor does not go with moves that lower it.

    Each policy holds the floor on its own lower bound, but moves each within it can stack their margins under
    it: the decision's quality is predicted as now plus every move's effect and, with more than one move
    lowering it, its lower bound as that minus the moves' margins (point minus lower bound, each on its own
    labels) added in quadrature. While the bound is under the floor, the move costing the most quality waits
    for a later decision, one knob group at a time (a threshold and a tier mix of one step are two moves);
    moves that restore a missed p95 (those predicting it) wait last, so a cheaper mix waits before the
    threshold that brings latency back. A point estimate under the floor (not yet beyond doubt, so not a
    missed objective) is not pushed further down either.

    `most_saving`: instead, of the sets of those moves whose bound holds the floor, the one keeping the most
    that restore a missed p95, then saving the most, goes (`look` asks for it when what the rule above leaves
    is too small for a canary to show)."""
    if floor is None or "quality" not in plan.before:
        return
    if most_saving:
        _keep_most_saving(plan, floor)
        return
    while True:
        alive = [p for p in plan.parts if p.live]
        losing = [p for p in alive if p.quality_delta < 0]
        if "quality" not in plan.after or not losing:
            return
        predicted = plan.after["quality"]
        # One move alone: its policy held its own lower bound. Several: the bound of their sum.
        margin = math.sqrt(sum(p.quality_margin ** 2 for p in losing)) if len(losing) > 1 else 0.0
        if predicted - margin >= floor:
            return
        part = min(losing, key=lambda p: (p.p95_ms is not None and bool(plan.violated), p.quality_delta))
        _wait_for_floor(plan, part, predicted, predicted - margin, floor)


def _wait_for_floor(plan: Plan, part: Part, point: float, low: float, floor: float) -> None:
    """Take `part` out of `plan` for a later decision: with it, the decision's quality would be `point` as
    predicted, `low` at its bound, under the floor."""
    take_out(plan, part)
    with_what = "the other moves" if plan.changes else "its moves"
    bound = f" (lower bound {low:.3f})" if low != point else ""
    plan.reasons.append(f"{part.step}: {', '.join(part.knobs)} waits for a later decision: with {with_what}, "
                        f"quality {point:.3f} as predicted{bound}, under the {floor:.3g} floor (quality "
                        f"{plan.before['quality']:.3f} now)")


def _keep_most_saving(plan: Plan, floor: float) -> None:
    """`_hold_joint_floor`'s other rule: the set of the moves lowering quality that holds the floor at the bound
    of its sum and saves the most goes; the others wait, each with its reason."""
    if "quality" not in plan.after:
        return
    losing = [p for p in plan.parts if p.live and p.quality_delta < 0]
    predicted = plan.after["quality"]

    def quality(kept: Sequence[Part]) -> tuple[float, float]:
        """The decision's predicted quality with only `kept` of the losing moves, and its lower bound."""
        point = predicted - sum(p.quality_delta for p in losing if not any(p is k for k in kept))
        return point, point - (math.sqrt(sum(p.quality_margin ** 2 for p in kept)) if len(kept) > 1 else 0.0)

    if not losing or quality(losing)[1] >= floor:
        return
    restoring = [p.p95_ms is not None and bool(plan.violated) for p in losing]
    best: tuple[int, ...] = ()
    best_key = (-1, -math.inf)
    for size in range(len(losing) - 1, 0, -1):
        for chosen in itertools.combinations(range(len(losing)), size):
            key = (sum(restoring[i] for i in chosen), -sum(losing[i].cost_delta for i in chosen))
            if key > best_key and quality([losing[i] for i in chosen])[1] >= floor:
                best, best_key = chosen, key
    kept = [losing[i] for i in best]
    for part in sorted((p for i, p in enumerate(losing) if i not in best), key=lambda p: p.cost_delta):
        _wait_for_floor(plan, part, *quality([*kept, part]), floor)


def _restores(proposal: Proposal | None, targets: Mapping[float, float], slow: bool) -> bool:
    """Whether a cascade's threshold proposal predicts the pipeline back inside its latency targets: its
    predicted p95 (and p99) under them, or, without those predictions, escalations fitting in the tail."""
    if proposal is None:
        return False
    predicted = proposal.predicted
    if any(quantile_name(q) in predicted for q in targets):
        return all(predicted.get(quantile_name(q), 0.0) <= t for q, t in targets.items())
    return slow and predicted.get("escalation_share", 1.0) <= TAIL_MARGIN * TAIL_SHARE \
        < predicted.get("escalation_share_before", 0.0)


def _not_worse_quality(proposal: Proposal | None, missed: Mapping[str, str], plan: Plan) -> Proposal | None:
    """While quality is under its floor, a proposal predicted to lower it waits."""
    if proposal is None or "quality" not in missed:
        return proposal
    if proposal.predicted.get("quality", 1.0) < proposal.predicted.get("quality_before", 0.0):
        plan.reasons.append(f"{proposal.step}: a cheaper mix waits (it would lower quality, which is under its floor)")
        return None
    return proposal


def _as_mixed(samples: Sequence[CascadeSample], config: PipelineConfig, plan: Plan,
              local: str | None) -> list[CascadeSample]:
    """A cascade's samples re-drawn for the local step's route mix `plan` sets (the same samples when it sets
    none): each route keeps the share of its samples its new weight over its old allows, so the threshold and
    the tiers are chosen for the answers the cascade will see, in the same decision."""
    new = plan.changes.get(local, {}).get("route_weights") if local else None
    old = config.knob(local, "route_weights") if local else None
    if not new or not old:
        return list(samples)
    ratios = {r: float(new.get(r, 0.0)) / float(w) for r, w in old.items() if float(w) > 0}
    top = max(ratios.values(), default=0.0)
    if top <= 0:
        return list(samples)
    counts = {r: sum(1 for s in samples if s.route == r) for r in ratios}
    keep = {r: round(counts[r] * ratios[r] / top) for r in ratios}
    out, seen = [], dict.fromkeys(ratios, 0)
    for s in samples:
        if s.route in ratios:
            if seen[s.route] >= keep[s.route]:
                continue
            seen[s.route] += 1
        out.append(s)
    return out


def _escalation_cost(config: PipelineConfig, obs: observe.Observation, cascade: str) -> dict[str, float]:
    """Per route of a cascade's local step, what the escalations its answers cause cost per answer (USD): the
    share of them the threshold in force escalates times what an escalation costs ({} when not known)."""
    threshold = config.knob(cascade, "cascade_threshold")
    per_call = obs.cost_per_call(cascade)
    if threshold is None or per_call <= 0:
        return {}
    shares = escalation_shares(obs.cascade_samples.get(cascade, []), float(threshold))
    return {route: share * per_call for route, share in shares.items()} if len(shares) >= 2 else {}


def _with_escalation_cost(stats: Sequence[RouteStats], extra: Mapping[str, float]) -> list[RouteStats]:
    """A cascade's local routes priced with the escalations they cause (`extra`, `_escalation_cost`): each
    route's cost per request plus what its answers' escalations cost."""
    return [replace(r, compute_cost_per_request=r.compute_cost_per_request + extra[r.route])
            if r.route in extra else r for r in stats]


def _local_ms(obs: observe.Observation, spec: PipelineSpec, cascade: str) -> float:
    """Roughly the p95 of a task that does not escalate: the other steps' p95s added (an upper bound)."""
    return sum(obs.step_total(step).p95_ms for step in spec.steps if step != cascade)


def _local_floor(spec: PipelineSpec, config: PipelineConfig, obs: observe.Observation, step: str, cascade: str,
                 floor: float | None) -> tuple[float | None, float]:
    """The route floor of a cascade's model step, from the pipeline's quality, and the share of answers it keeps."""
    threshold = config.knob(cascade, "cascade_threshold")
    samples = obs.cascade_samples.get(cascade, [])
    kept = sum(1 for s in samples if s.confidence >= threshold) / len(samples) if samples and threshold is not None \
        else 1.0
    stats = [r for r in obs.route_stats(step) if r.labelled >= 30]
    weights = config.knob(step, "route_weights") or {}
    mass = sum(float(weights.get(r.route, 0.0)) for r in stats)
    if not stats or mass <= 0:
        return floor, kept
    mix_lower = sum(float(weights.get(r.route, 0.0)) * wilson_lower(r.correct, r.labelled) for r in stats) / mass
    return local_route_floor(mix_lower, obs.quality, obs.labelled, floor, kept), kept


def _hold_reversals(plan: Plan, moves: Mapping[tuple[str, str], Move], now: float, settings: LoopSettings) -> None:
    """Take out of `plan` the knob changes that would undo a recent move on evidence no different beyond noise.

    A change of load counts only where it moves what the move was predicted to do (`_load_moves`): load
    alone does not change a route's accuracy or price. A cascade threshold going back up because the one in
    force no longer holds the floor at its lower bound is quality first, never held. A reversal that goes ahead
    while no objective is missed moves at most half as far as the move it undoes (`_damped`), so a knob pushed
    back and forth by evidence at the edge of noise settles instead of swinging."""
    held = []
    for step, values in list(plan.changes.items()):
        for knob, value in list(values.items()):
            move = moves.get((step, knob))
            if move is None or now - move.at >= settings.reversal_hold_seconds:
                continue
            was = plan.was(step, knob)
            if not move.reversed_by(was, value):
                continue
            ago = f"{(now - move.at) / 60:.0f} min ago"
            why, load = changed(move.evidence, plan.evidence), None
            held_floor = (plan.predicted.get(f"{step}.floor_held_before"),
                          plan.predicted.get(f"{step}.proposal.floor_held_before"))
            if why is None and knob == "cascade_threshold" and value > was and 0.0 in held_floor:
                why = "quality: the threshold in force no longer holds the floor at its lower bound on the labels since"
            if why is None:
                load = load_change(move.evidence, plan.evidence)
                moved = _load_moves(move, plan, step, knob) if load is not None else None
                why = f"{load}, and at that load {moved}" if moved else None
            if why is None:
                plan.drop(step, knob)
                held.append(f"{step}.{knob} (moved {ago}" + (f"; {load} leaves what it was predicted to do as it was"
                                                              if load else "") + ")")
                continue
            damped = value if plan.violated else _damped(move, was, value)
            if damped == was:
                plan.drop(step, knob)
                plan.reasons.append(f"{step}.{knob} stays: half of its move {ago} back rounds to no change")
                continue
            note = ""
            if damped != value:
                scale_effect(plan, step, _share_of(was, value, damped))
                plan.changes[step][knob] = damped
                note = f" (at most half of that move back while no objective is missed: {plain({knob: damped})})"
            plan.reasons.append(f"{step}.{knob} goes back the way it moved {ago}: {why}{note}")
    if held:
        plan.reasons.append(f"held {', '.join(held)}: going back needs prices or quality to have changed beyond "
                            f"noise since, an objective newly missed, or load changed so that the move's predicted "
                            f"effect changes sign or crosses the p95 target, and none has")

LOAD_INPUT_KNOBS = frozenset({"batch_max_size", "batch_max_wait_ms", "length_bucketing", "cache_enabled",
                              "cache_ttl_seconds", "cache_max_entries", "max_concurrency"})
"""Knobs whose policies take the load as an input (arrivals per batch wait, inputs per TTL, calls at once): a
change of load can change what moving them does. Routes and the cascade threshold are priced and judged per
task, so load alone leaves their predicted effect as it was (except on latency, `_load_moves`)."""


def _load_moves(move: Move, plan: Plan, step: str, knob: str) -> str | None:
    """How the load now changes what `move` was predicted to do, in words; None when it does not: the pipeline's
    p95 is over its target with the move and predicted within it without, or (a knob whose policy takes load
    as an input) the move's effect on cost changed sign: going back is predicted to cut cost where the move
    was too, or to add cost where the move did."""
    target, p95 = plan.targets.get("p95_ms"), plan.before.get("p95_ms")
    without = plan.effects.get(step, {}).get("p95_ms")
    if target is not None and p95 is not None and without is not None and p95 > target >= without:
        return f"p95 {p95:.0f} ms with the move is over the {target:g} ms target, {without:.0f} ms predicted without"
    back = cost_effect(plan.predicted, step)
    if knob in LOAD_INPUT_KNOBS and back is not None and move.cost_effect is not None and back * move.cost_effect > 0:
        return (f"the move's predicted effect on cost changed sign ({'cheaper' if move.cost_effect < 0 else 'dearer'}"
                f" then, going back {'cheaper' if back < 0 else 'dearer'} now)")
    return None


def _damped(move: Move, was: Any, proposed: Any) -> Any:
    """`proposed`, moved from `was` at most half as far as `move` went (bools as proposed: no half of a switch)."""
    if isinstance(proposed, bool) or not isinstance(proposed, (int, float, dict)):
        return proposed
    if isinstance(proposed, dict):
        names = list(dict.fromkeys([*proposed, *(was or {}), *(move.after or {}), *(move.before or {})]))

        def at(values: Any, name: str) -> float:
            return float((values or {}).get(name, 0.0))

        last = 0.5 * sum(abs(at(move.after, n) - at(move.before, n)) for n in names)
        shift = 0.5 * sum(abs(at(proposed, n) - at(was, n)) for n in names)
        if shift <= 0.5 * last or shift <= 0:
            return proposed
        share = 0.5 * last / shift
        return {n: at(was, n) + share * (at(proposed, n) - at(was, n)) for n in proposed}
    try:
        last, delta = abs(float(move.after) - float(move.before)), float(proposed) - float(was)
    except (TypeError, ValueError):
        return proposed
    if abs(delta) <= 0.5 * last:
        return proposed
    value = float(was) + math.copysign(0.5 * last, delta)
    if isinstance(proposed, int):
        return int(math.floor(value) if delta > 0 else math.ceil(value))  # toward `was`: never past half
    return value


def _share_of(was: Any, proposed: Any, damped: Any) -> float:
    """How much of the way from `was` to `proposed` `damped` goes (1 when it cannot be told)."""
    if isinstance(proposed, dict):
        full = sum(abs(float(proposed.get(n, 0.0)) - float((was or {}).get(n, 0.0))) for n in proposed)
        part = sum(abs(float(damped.get(n, 0.0)) - float((was or {}).get(n, 0.0))) for n in proposed)
        return part / full if full else 1.0
    full = float(proposed) - float(was)
    return (float(damped) - float(was)) / full if full else 1.0


def _age_seconds(decision: Mapping[str, Any], now: datetime) -> float:
    decided = decision["decided_at"]
    if decided.tzinfo is None:
        decided = decided.replace(tzinfo=UTC)
    return (now - decided).total_seconds()


@dataclass(frozen=True)
class Rejected:
    """The canary rolled back last: when (seconds, the caller's clock), its version, the steps of the config in
    force then and of the config it tried. Moves it made are not proposed again within the hour."""

    at: float
    version: int
    base: Mapping[str, Mapping[str, Any]]
    tried: Mapping[str, Mapping[str, Any]]
    failed: frozenset[str] = frozenset()  # the objectives it was rolled back for (none: for want of tasks or time)
    effects: Mapping[str, float] = field(default_factory=dict)  # its moves' predicted effects (Plan.move_effects)

    def to_blame(self) -> set[tuple[str, str]] | None:
        """The moves that could explain the rollback, or None for all of them. A canary rolled back for its cost
        or its quality blames the moves predicted to raise that cost or lower that quality, and those no model
        predicted; a move predicted to help there (a cache beside a dearer tier) is not to blame and may be
        tried again. Rolled back for latency or errors (no per-move prediction), for want of tasks or time, or
        with no move predicted to hurt what failed (the predictions were wrong): all of them."""
        if not self.failed or self.failed - {"cost", "quality"}:
            return None
        blamed, hurting = set(), False
        for step, values in self.tried.items():
            for knob, value in values.items():
                if self.base.get(step, {}).get(knob) == value:
                    continue
                cost = self.effects.get(move_figure(step, knob, "cost_delta"))
                quality = self.effects.get(move_figure(step, knob, "quality_delta"))
                hurts = ("cost" in self.failed and cost is not None and cost > 0) or (
                    "quality" in self.failed and quality is not None and quality < 0)
                hurting = hurting or hurts
                if hurts or cost is None or quality is None:
                    blamed.add((step, knob))
        return blamed if hurting else None

    def remembered(self, now: float, settings: LoopSettings) -> bool:
        """Whether it still holds moves back at `now` (within `settings.rejected_memory_seconds`)."""
        return now - self.at < settings.rejected_memory_seconds

    def bounds(self, config: PipelineConfig) -> dict[tuple[str, str], tuple[float, float]]:
        """Where the numeric knobs it moved and is blamed for may go next, from where it started: no further than
        half its move that way (a bisection: 0.90 -> 0.66 rolled back, then no lower than 0.78), any way
        else. Only for knobs still where the trial started (once the config in force moved on, it is another
        move)."""
        blamed, found = self.to_blame(), {}
        for step, values in self.tried.items():
            for knob, after in values.items():
                before = self.base.get(step, {}).get(knob, config.knob(step, knob))
                moved = is_number(before) and is_number(after) and after != before
                held = blamed is None or (step, knob) in blamed
                if not moved or not held or config.knob(step, knob) != before:
                    continue
                half = before + (after - before) / 2
                found[(step, knob)] = (half, math.inf) if after < before else (-math.inf, half)
        return found


def _short(value: float) -> str:
    return f"{value:.3g}"


@dataclass
class Outcome:
    """What one look at a pipeline comes to: a running canary's verdict, a plan to try, or nothing (`idle` says why)."""

    verdict: canary.Verdict | None = None
    plan: Plan | None = None
    observation: observe.Observation | None = None
    idle: str = ""


def look(spec: PipelineSpec, config: PipelineConfig, slo: SLO | None, settings: LoopSettings, now: float, *,
         measure: Callable[[], observe.Observation],
         since_change: float | None = None,
         trial_age: float | None = None,
         arms: Callable[[], tuple[canary.Arm, canary.Arm]] | None = None,
         moves: Callable[[], Mapping[tuple[str, str], Move] | None] = lambda: None,
         rejected: Callable[[], Rejected | None] = lambda: None,
         trial_figures: Callable[[], Mapping[str, float]] = dict) -> Outcome:
    """One look at a pipeline, the same for the tuner (`tune_once`, over the store) and the simulation: judge
    the canary on trial (`trial_age` seconds old, `arms` its per-task samples, `trial_figures` what the decision
    that started it predicted, as `_try` records them); else the guardrails (cooldown
    since the last change, enough requests over half a window in what `measure` reads), `decide`, and the
    moves a canary rolled back lately taken out. The callables read what the caller keeps (the store or the
    simulation) only when needed; nothing is written here: the caller acts on the outcome."""
    if trial_age is not None:
        if arms is None:
            raise ValueError("a canary on trial is judged on its arms: pass arms")
        base, tried = arms()
        figures = trial_figures()
        return Outcome(verdict=canary.judge(base, tried, slo, min_requests=settings.canary_min_requests,
                                            **canary.out_of_time(trial_age, settings.canary_max_seconds),
                                            lowers_quality=lowers_quality(figures),
                                            buys_quality=buys_quality(figures)))
    if since_change is not None and since_change < settings.cooldown_seconds:
        return Outcome(idle="cooling down")
    obs = measure()
    if obs.requests < settings.min_requests or obs.window_seconds < settings.window_seconds / 2:
        # Too few requests, or data for less than half a window (rates and TTLs would be guesses).
        return Outcome(observation=obs, idle="too little data")
    last, last_moves = rejected(), moves()
    bounds = last.bounds(config) if last is not None and last.remembered(now, settings) else None
    plan = decide(spec, config, slo, obs, settings, moves=last_moves, now=now, bounds=bounds)
    together = [dict(group) for group in plan.together]
    drop_rejected(plan, config, last, now, settings)
    if _broken(plan, together):
        # A rolled-back canary's moves taken out of moves chosen together: each step's own policy decides instead.
        plan = decide(spec, config, slo, obs, settings, moves=last_moves, now=now, bounds=bounds, together=False)
        drop_rejected(plan, config, last, now, settings)
    if not plan.changes:
        return Outcome(observation=obs, idle="nothing to change")
    too_small = unprovable(plan, obs, settings, spec)
    if too_small and spec.cascades and not canary.adjustable(spec, plan.changes):
        # Its moves outside the cascades keep the canary's costs from being adjusted for the escalations in force
        # (`canary.covariate_thresholds`): the cascades' own moves, decided again with every other step as it is
        # (their samples are then those of the routes in force), may be a saving a canary can show.
        alone = decide(spec, config, slo, obs, settings, moves=last_moves, now=now, bounds=bounds,
                       steps=set(spec.cascades))
        drop_rejected(alone, config, last, now, settings)
        if alone.changes and not unprovable(alone, obs, settings, spec):
            return Outcome(plan=alone, observation=obs)
    if too_small and any(" waits for a later decision: with " in r for r in plan.reasons):
        # Moves stacked under the floor: the one costing more quality waited, and what is left is too small to
        # show. The set saving the most that holds the floor may be a saving a canary can show.
        saving = decide(spec, config, slo, obs, settings, moves=last_moves, now=now, bounds=bounds, most_saving=True)
        drop_rejected(saving, config, last, now, settings)
        if saving.changes and not unprovable(saving, obs, settings, spec):
            return Outcome(plan=saving, observation=obs)
    if too_small:
        return Outcome(observation=obs, idle=too_small)
    return Outcome(plan=plan, observation=obs)


TOO_SMALL = "saving too small to show"
NO_SAVING = "no saving to show"


def _moved(plan: Plan, obs: observe.Observation, spec: PipelineSpec | None) -> dict[str, float] | None:
    """Cascade step -> share of the window's tasks the plan's threshold escalates and the one in force does not
    (or the other way), when the plan changes nothing but cascades: its canary's costs are then adjusted for the
    config in force's escalations (`canary.covariate_thresholds`), and only these tasks and the calls' own
    spread are left to tell the arms apart. None otherwise."""
    if spec is None or not canary.adjustable(spec, plan.changes):
        return None
    moved = {}
    for step in spec.cascades:
        if "cascade_threshold" not in plan.changes.get(step, {}):
            moved[step] = 0.0
            continue
        old, new = plan.was(step, "cascade_threshold"), plan.changes[step]["cascade_threshold"]
        confidences = [sample.confidence for sample in obs.cascade_samples.get(step, [])]
        if not is_number(old) or not confidences:
            return None  # not known: the spread as it is
        low, high = sorted((float(old), float(new)))
        moved[step] = sum(low <= c < high for c in confidences) / len(confidences)
    return moved


def _switched(plan: Plan, spec: PipelineSpec | None) -> dict[str, dict[tuple[str, str], float]] | None:
    """Routed step -> (route in force, route tried) -> share of tasks the plan's weights send the other way
    (`routing.moves`; empty where its weights do not move), for each step that declares routes: the executor
    picks a task's route by a draw fixed per task and step, so a canary's costs are adjusted for the route the
    config in force takes (`canary.covariates`). None without the spec."""
    if spec is None:
        return None
    found = {}
    for step, knobs in spec.steps.items():
        if "route_weights" not in knobs:
            continue
        after = plan.changes.get(step, {}).get("route_weights")
        if after is None:
            found[step] = {}
            continue
        before = plan.was(step, "route_weights")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            try:
                found[step] = routing.moves(before, after)
            except ValueError:  # no positive weight: not known
                pass
    return found


def unprovable(plan: Plan, obs: observe.Observation, settings: LoopSettings, spec: PipelineSpec | None = None) -> str:
    """Why a plan that only saves cost is not worth a canary ("" when it is): it predicts a rise of cost
    (`canary.judge` promotes such a canary only on a saving shown), or its predicted saving is smaller than a
    canary can show in its time, at this load and this spread of per-task cost (`canary.tasks_needed` against
    the tasks its share gets in twice `canary_max_seconds`, as long as a cheaper canary may run on). Such a
    canary could only run its time out and be rolled back for want of tasks, holding its moves back for the
    hour and the loop from anything else. A plan restoring a missed objective or buying quality for a floor at
    risk is tried whatever its cost; one with no cost predicted (no model of it) too."""
    if settings.canary_share <= 0 or plan.violated or buys_quality(plan.figures()) is not None:
        return ""
    before, after = obs.cost_per_1k, plan.after.get("cost_per_1k")
    if not before or after is None or not math.isfinite(after) or after == before:
        return ""  # no cost predicted: not known
    if after > before:
        # `canary.judge` promotes a canary restoring nothing and buying no quality only on a saving shown.
        return (f"{NO_SAVING}: {(after - before) / before:+.1%} predicted, and it restores no missed objective "
                f"nor buys quality for a floor at risk, so a canary could only run its time out. Not tried: "
                f"{plan.summary}")
    spread = obs.cost_spread(_moved(plan, obs, spec), _switched(plan, spec))
    if not spread:
        return ""
    effect, mean = (after - before) / 1000, before / 1000
    share = settings.canary_share
    # A cheaper canary its tasks cannot show yet runs on up to twice its time (`canary.judge`'s `may_run_on`).
    seconds = canary.RUN_ON * settings.canary_max_seconds
    available = obs.requests / max(obs.window_seconds, 1.0) * share * seconds
    needed = canary.tasks_needed(effect, spread, canary.TAU_COST * mean, share)
    if needed is not None and needed <= available:
        return ""
    return (f"{TOO_SMALL}: a canary on {share:.0%} of tasks would need "
            + (f"about {needed:,}" if needed is not None else "more than 100 million")
            + f" tasks to show {(after - before) / before:+.1%} at this spread of per-task cost "
            f"({spread / mean:.1f}× the mean), and gets about {available:,.0f} in its {seconds:.0f} s (twice its "
            f"{settings.canary_max_seconds:.0f} s, running on). Not tried: {plan.summary}")


def tune_once(client, pipeline: str, settings: LoopSettings = LoopSettings(),
              now: datetime | None = None, active: Callable[[], bool] = lambda: True) -> decisions.Decision | None:
    """One look at `pipeline` (`look`, over the store): the decision taken, or None (frozen, pinned, cooling
    down, too little data, nothing to change). Records the observed effect of the previous decision once its
    window has passed. Writes nothing once `active()` says no (the tuner lost its lease while it measured)."""
    now = now or datetime.now(UTC)
    spec, config = versions.latest_spec(client, pipeline), versions.latest(client, pipeline)
    if spec is None or config is None:
        return None
    state = decisions.state(client, pipeline)
    if state.frozen or state.pinned:
        return None
    trial = canary.running(client, pipeline)
    last = None
    if trial is None:
        last = decisions.last_decision(client, pipeline, CHANGES)
        if last is not None and last["kind"] in OBSERVED and not last["observed"] \
                and _age_seconds(last, now) >= settings.window_seconds and active():
            decisions.observe(client, last["decision_id"],
                              observe.collect(client, spec, settings.window_seconds).summary())
    age = None if trial is None else (now - trial.started_at).total_seconds()
    outcome = look(
        spec, config, get_slo(client, pipeline), settings, now.timestamp(),
        measure=lambda: observe.collect(client, spec, settings.window_seconds, settings.label_window_seconds),
        since_change=None if last is None else _age_seconds(last, now),
        trial_age=age,
        arms=lambda: canary.arms(client, spec, trial, observe.answers(client, spec, int(age or 0) + 60)),
        moves=lambda: Moves.from_history(decisions.history(client, pipeline, limit=200)),
        rejected=lambda: _rejected(client, pipeline),
        trial_figures=lambda: _trial_predicted(client, pipeline, trial))
    if trial is not None:
        return _finish(client, spec, config, trial, outcome.verdict, active)
    if outcome.plan is not None or outcome.idle == "nothing to change" or outcome.idle.startswith(TOO_SMALL):
        from tracetune.tuner import shadow  # a plan moving a quality knob is shadowed before its canary; judge one out
        handled, shadowed = shadow.before_trial(client, spec, config, outcome.plan or Plan(), outcome.observation,
                                                settings, now, active)
        if handled:
            return shadowed
    if outcome.plan is None:
        if outcome.idle.startswith(TOO_SMALL) and not _said.get(pipeline, "").startswith(TOO_SMALL):
            log.info("%s: %s", pipeline, outcome.idle)  # once a spell, not every look: why the tuner holds still
        _said[pipeline] = outcome.idle
        return None
    return _try(client, spec, config, outcome.plan, outcome.observation, settings, now, active)


_said: dict[str, str] = {}  # the last idle reason logged per pipeline


def _try(client, spec: PipelineSpec, config: PipelineConfig, plan: Plan, obs: observe.Observation,
         settings: LoopSettings, now: datetime, active: Callable[[], bool]) -> decisions.Decision | None:
    """Put `plan` on trial for a share of tasks (or, with `canary_share` 0, in force for every task), with its
    decision row; None when a pin, freeze or another change landed while the loop measured."""
    pipeline = spec.pipeline
    reason = plan.reason
    predicted = {**{f"before.{k}": v for k, v in obs.summary().items()}, **plan.figures(),
                 **{f"evidence.{k}": v for k, v in plan.evidence.items()}}
    with versions.write_lock:  # the API's pin, rollback and freeze take the same lock
        latest_state = decisions.state(client, pipeline)  # a pin or freeze may have landed while we measured
        if (not active() or latest_state.frozen or latest_state.pinned or versions.latest(client, pipeline) != config
                or canary.running(client, pipeline) is not None):  # e.g. an approved proposal's canary
            return None
        # A plan is about to be tried: `plan.changes` on top of `config`, for the reasons in `reason`. The
        # pipeline's approval mode may hold it as a proposal instead (tuner/approval.py).
        held, proposed = approval.gate(client, spec, config, plan, predicted, settings, now)
        if held:  # approve or observe mode, a change class marked for approval, or a proposal already waiting
            return proposed
        if settings.canary_share > 0:
            trial = canary.start(client, spec, config, plan.changes, settings.canary_share, reason)
            summary, _, details = reason.partition("\n")
            decision = decisions.Decision(pipeline, "canary_start", config.version, trial.version, config.to_dict(),
                                          trial.config.to_dict(), f"Trying on {settings.canary_share:.0%} of tasks: "
                                          f"{summary[0].lower()}{summary[1:]}\n{details}", predicted=predicted)
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



def buys_quality(predicted: Mapping[str, float]) -> float | None:
    """The relative change of cost a decision (its figures, `predicted`) was to pay for quality, when it
    restored a missed floor or a threshold in force that no longer held the floor at its lower bound, and
    predicted quality up; None otherwise (it is judged on what it gains)."""
    after, before = predicted.get("quality"), predicted.get("before.quality")
    if after is None or before is None or after <= before or predicted.get("moves.lowering_quality", 0.0) > 0:
        return None  # (a decision that also lowers quality somewhere is judged on what it gains)
    if predicted.get("violated.quality") != 1.0 and not any(
            k.endswith(".floor_held_before") and v == 0.0 for k, v in predicted.items()):
        return None
    cost, cost_before = predicted.get("cost_per_1k"), predicted.get("before.cost_per_1k")
    return cost / cost_before - 1.0 if cost is not None and cost_before else 0.0


def lowers_quality(predicted: Mapping[str, float]) -> bool:
    """Whether a decision's figures (`predicted` as `_try` records them) say its moves lower quality."""
    after, before = predicted.get("quality"), predicted.get("before.quality")
    return after is not None and before is not None and after < before


def _trial_predicted(client, pipeline: str, trial: canary.Canary | None) -> Mapping[str, float]:
    """The figures of the `canary_start` decision that put `trial` on trial ({} when it cannot be found)."""
    started = decisions.last_decision(client, pipeline, ("canary_start",))
    if trial is None or started is None or started["version_after"] != trial.version:
        return {}
    return started["predicted"] or {}


def _rejected(client, pipeline: str) -> Rejected | None:
    """The canary rolled back last, from the audit: what it was rolled back for (the verdict's figures, observed
    on the rollback) and what its `canary_start` predicted of each move."""
    last = decisions.last_decision(client, pipeline, ("canary_rollback",))
    if last is None:
        return None
    decided = last["decided_at"] if last["decided_at"].tzinfo else last["decided_at"].replace(tzinfo=UTC)
    version = int(last["version_before"])  # a rollback's row goes from the canary back to the config in force
    failed = canary.failures(last["observed"])
    # Its moves' predictions matter only when it failed something (else every move is held): no query otherwise.
    started = next((d for d in decisions.history(client, pipeline, 20, kinds=("canary_start",))
                    if d["version_after"] == version), None) if failed else None
    return Rejected(decided.timestamp(), version, last["config_after"].get("steps", {}),
                    last["config_before"].get("steps", {}), failed,
                    {k: v for k, v in (started or {}).get("predicted", {}).items() if k.startswith(MOVE)})


def drop_rejected(plan: Plan, config: PipelineConfig, rejected: Rejected | None, now: float,
                  settings: LoopSettings) -> None:
    """Take out of `plan` the knob moves a canary rolled back lately (they would fail the same way)."""
    if rejected is None or not rejected.remembered(now, settings):
        return
    bounds = rejected.bounds(config)
    dropped = []
    # While quality is missed, a move predicted to raise it is quality first: a canary that moved it that way
    # beside other moves, and was rolled back for them or for want of tasks, does not hold it back.
    raising = {(p.step, k) for p in plan.parts if p.quality_delta > 0 for k in p.knobs} \
        if "quality" in plan.violated else set()
    blamed = rejected.to_blame()
    halved = []
    for step, values in list(plan.changes.items()):
        for knob, value in list(values.items()):
            if (step, knob) in raising or (blamed is not None and (step, knob) not in blamed):
                continue
            before = rejected.base.get(step, {}).get(knob, config.knob(step, knob))
            after = rejected.tried.get(step, {}).get(knob, before)
            low, high = bounds.get((step, knob), (math.nan, math.nan))
            if is_number(value) and low - 1e-9 <= value <= high + 1e-9:
                if same_way(before, after, value):  # half the rolled-back move or less: a bisection's next step
                    halved.append(f"{step}.{knob} {_short(before)} -> {_short(value)}, half or less of its "
                                  f"{_short(before)} -> {_short(after)}")
                continue
            # Only from where that trial started: once the config in force moved on, the move is another one.
            if after != before and config.knob(step, knob) == before and same_way(before, after, value):
                plan.drop(step, knob)  # and, once none of the step's changes is left, its reasons and predictions
                dropped.append(f"{step}.{knob}")
    if dropped:
        why = "" if blamed is None else f" for its {' and '.join(sorted(rejected.failed))}, which they could explain"
        plan.reasons.append(f"left {', '.join(dropped)} alone: canary version {rejected.version} "
                            f"moved them that way and was rolled back{why}")
    if halved:
        plan.reasons.append(f"moved {'; '.join(halved)}: canary version {rejected.version} went that far and was "
                            f"rolled back, so this tries half the way")


def _finish(client, spec: PipelineSpec, config: PipelineConfig, trial: canary.Canary, verdict: canary.Verdict,
            active: Callable[[], bool] = lambda: True) -> decisions.Decision | None:
    """Promote or roll back the canary on trial once the evidence says which (None while it is still out);
    cancel it when the config in force is no longer the one it was measured against."""
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
            decision = decisions.Decision(spec.pipeline, kind, trial.base_version, trial.version,
                                          config.to_dict(), trial.config.to_dict(), verdict.reason,
                                          dict(_trial_predicted(client, spec.pipeline, trial)))
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
    try:
        approval.expire_due(client)  # proposals nobody answered in time, recorded even when no plan comes
    except Exception as exc:  # noqa: BLE001 - the store may be restarting; try again next interval
        log.warning("expiring proposals failed: %s", exc)
    for pipeline in pipelines:
        if not active():
            return
        try:
            tune_once(client, pipeline, settings, active=active)
        except Exception as exc:  # noqa: BLE001 - log and go on with the next pipeline
            log.warning("tuning %s failed: %s", pipeline, exc)

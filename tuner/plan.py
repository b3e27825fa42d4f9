"""A decision's plan: the knob changes `decide` proposes, one reason each, and their predicted effects on the
pipeline's cost, quality and p95, kept per proposal (`Part`) so a move held back takes its effect with it.

`tuner/loop.py` builds plans (`decide`) and holds moves back from them; this module is their bookkeeping: how a
proposal's predictions become the pipeline's (`pipeline_effect`), how moves of one step combine their cost
(`combine_cost`), and the sentence a product owner reads (`Plan.summary`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracetune.tuner import observe
from tracetune.tuner.config import KnobValue, PipelineSpec
from tracetune.tuner.decisions import describe_change, sentence
from tracetune.tuner.policies import clamp_change
from tracetune.tuner.proposal import Proposal

__all__ = ["Part", "Plan", "combine_cost", "move_figure", "pipeline_effect", "plain", "scale_effect", "take_out"]

MOVE = "move."  # a decision's per-move predictions: move.<step>.<knob>.cost_delta / .quality_delta


def move_figure(step: str, knob: str, name: str) -> str:
    """The name a decision's figures file one move's predicted `name` (cost_delta, quality_delta) under."""
    return f"{MOVE}{step}.{knob}.{name}"


@dataclass
class Part:
    """One proposal's predicted effect on the pipeline: the knobs it moves, its change of cost and quality,
    how far its quality could be below its point estimate (the pipeline's share of the policy's point minus its
    lower bound), and the p95 it predicts, if it sets the step's."""

    step: str
    knobs: tuple[str, ...]
    cost_delta: float = 0.0
    quality_delta: float = 0.0
    quality_margin: float = 0.0
    p95_ms: float | None = None
    cost_before: float = 0.0  # the step's cost `cost_delta` changes, in the pipeline's USD per 1k tasks
    live: bool = True  # False once its changes are dropped from the plan (and its effect with them)
    # A cascade's local route mix priced with the escalations it causes: (the cascade step, the part of
    # `cost_delta` that is the cascade's cost), which the cascade's own moves in the plan scale (`Plan.after`).
    escalations: tuple[str, float] | None = None


@dataclass
class Plan:
    """What `decide` proposes: knob values by step, one reason per change, the predicted effects, and the
    sentence a product owner reads (`summary`), with the evidence the moves were made on."""

    changes: dict[str, dict[str, KnobValue]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)  # one phrase per knob change, in words
    before: dict[str, float] = field(default_factory=dict)  # the pipeline's figures now
    effects: dict[str, dict[str, float]] = field(default_factory=dict)  # per step: cost/quality deltas, p95
    targets: dict[str, float] = field(default_factory=dict)  # p95_ms, quality_floor
    evidence: dict[str, float] = field(default_factory=dict)  # what the moves were made on (see `evidence`)
    violated: list[str] = field(default_factory=list)  # objectives missed now, restored first
    parts: list[Part] = field(default_factory=list)  # each proposal's share of `effects`, for `_hold_joint_floor`
    # Moves chosen together, (step, knob) -> value, the first one's effect predicted as if it went alone (a local
    # step's routes at the cascade in force) and the others' as if it went too: dropping the first drops them all.
    together: list[dict[tuple[str, str], Any]] = field(default_factory=list)
    _current: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

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
            self._current.setdefault(proposal.step, {}).update({k: current.get(k) for k in values})
            # A clamped change is a step toward the proposal; its predictions describe the whole proposal.
            note = f" (clamped to {plain(values)}, at most {limit:.0%} per decision)" if clamped_any else ""
            self.reasons.append(f"{proposal.step}: {proposal.reason}{note}")
            prefix = f"{proposal.step}.proposal." if clamped_any else f"{proposal.step}."
            self.predicted.update({prefix + k: float(v) for k, v in proposal.predicted.items()})

    def drop(self, step: str, knob: str) -> None:
        """Take one knob change out (and the step's reasons and predictions once none of its changes is left),
        with the predicted effect of each part none of whose changes is left."""
        self.changes.get(step, {}).pop(knob, None)
        left = self.changes.get(step, {})
        for part in self.parts:
            if part.step == step and part.live and not any(k in left for k in part.knobs):
                part.live = False
                effect = self.effects.get(step, {})
                if "cost_per_1k.delta" in effect:
                    combine_cost(effect, part, -1)
                if "quality.delta" in effect:
                    effect["quality.delta"] -= part.quality_delta
                if part.p95_ms is not None:
                    effect.pop("p95_ms", None)
        if step in self.changes and not self.changes[step]:
            del self.changes[step]
            self.reasons = [r for r in self.reasons if not r.startswith(f"{step}: ")]
            self.predicted = {k: v for k, v in self.predicted.items() if not k.startswith(f"{step}.")}
        for group in [g for g in self.together if next(iter(g)) == (step, knob)]:
            self.together.remove(group)  # the others were predicted with it: they go out with it
            for other_step, other in list(group)[1:]:
                self.drop(other_step, other)

    @property
    def after(self) -> dict[str, float]:
        """The pipeline's figures as predicted: now, plus the effects of the steps still changed."""
        figures = {}
        for step, effect in self.effects.items():
            if step not in self.changes:
                continue
            for name in ("cost_per_1k", "quality"):
                if f"{name}.delta" in effect and name in self.before:
                    figures[name] = figures.get(name, self.before[name]) + effect[f"{name}.delta"]
            if "p95_ms" in effect:
                figures["p95_ms"] = min(figures.get("p95_ms", math.inf), effect["p95_ms"])
        for part in self.parts:
            # A local mix's escalations are priced as now; the cascade's moves in the same plan (a cheaper tier, a
            # threshold) scale what they cost, so the two savings multiply instead of adding up.
            if part.live and part.escalations and "cost_per_1k" in figures and part.step in self.changes:
                cascade, delta = part.escalations
                effect = self.effects.get(cascade, {})
                base = effect.get("cost_per_1k.before", 0.0)
                if cascade in self.changes and base > 0 and "cost_per_1k.delta" in effect:
                    figures["cost_per_1k"] += delta * effect["cost_per_1k.delta"] / base
        if "p95_ms" not in figures and any(step not in self.effects or "p95_ms" not in self.effects[step]
                                           for step in self.changes):
            figures["p95_ms"] = math.nan  # a change whose latency no model predicts: not "unchanged"
        return figures

    def was(self, step: str, knob: str) -> Any:
        """The value a change moves the knob from."""
        return self._current.get(step, {}).get(knob)

    @property
    def summary(self) -> str:
        """One sentence: what changes, and cost, quality and p95 before -> as predicted."""
        actions = [describe_change(step, knob, self.was(step, knob), value)
                   for step, values in self.changes.items() for knob, value in values.items()]
        text = sentence(actions, self.before, self.after, self.targets)
        return (f"Restoring {' and '.join(self.violated)} first. " if self.violated else "") + text

    def figures(self) -> dict[str, float]:
        """The decision's predicted figures as its audit row keeps them: the policies' predictions, the
        pipeline's figures before and as predicted, the objectives it restores (`violated.<name>`: 1) and how
        many of its moves lower quality."""
        return {**{f"before.{k}": v for k, v in self.before.items()}, **self.predicted,
                **{k: round(v, 6) for k, v in self.after.items() if math.isfinite(v)},  # NaN: not predicted
                **{f"violated.{name}": 1.0 for name in self.violated},
                "moves.lowering_quality": float(sum(1 for p in self.parts if p.live and p.quality_delta < 0)),
                **self.move_effects()}

    def move_effects(self) -> dict[str, float]:
        """Each moved knob's predicted change of the pipeline's cost and quality (`move.<step>.<knob>.cost_delta`,
        `.quality_delta`: its proposal's, shared by the knobs it moves together), so a canary rolled back for one
        objective holds back only the moves predicted to hurt it."""
        figures: dict[str, float] = {}
        for part in self.parts:
            for knob in part.knobs if part.live else ():
                if knob in self.changes.get(part.step, {}):
                    for name, delta in (("cost_delta", part.cost_delta), ("quality_delta", part.quality_delta)):
                        key = move_figure(part.step, knob, name)
                        figures[key] = round(figures.get(key, 0.0) + delta, 9)
        return figures

    @property
    def reason(self) -> str:
        """The sentence, then the policies' workings one per line (the audit's `reason`)."""
        return "\n".join([self.summary, *self.reasons])


def plain(values: Mapping[str, Any]) -> str:
    """Knob values as words and rounded numbers, not a dict dump."""
    def one(v: Any) -> str:
        if isinstance(v, dict):
            return "/".join(f"{k} {float(w):.2f}" for k, w in v.items())
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k} {one(v)}" for k, v in values.items())


def pipeline_effect(plan: Plan, obs: observe.Observation, proposal: Proposal, share: float,
                     calls: float | None = None) -> Part:
    """File a proposal's predicted change of cost (per 1k of its step's own calls) and accuracy as the
    pipeline's, added to what the step's other proposals in this decision change (a threshold sets how many
    tasks escalate, the tiers' mix what each costs and how often it is right: the two add up); `share`: the
    part of the pipeline's answers the step gives (a cascade's predictions are the pipeline's); `calls`: the
    step's calls per task once the decision is in force (default: as now). Returns the proposal's part."""
    step, predicted = proposal.step, proposal.predicted
    effect = plan.effects.setdefault(step, {})
    part = Part(step, tuple(k for k in proposal.values if k in plan.changes.get(step, {})))
    cascade = "escalation_share" in predicted
    if "cost_per_1k" in predicted and "cost_per_1k_before" in predicted:
        per_task = 1.0 if cascade else calls if calls is not None else obs.step_total(step).spans / max(obs.requests, 1)
        part.cost_delta = (predicted["cost_per_1k"] - predicted["cost_per_1k_before"]) * per_task
        part.cost_before = predicted["cost_per_1k_before"] * per_task
        combine_cost(effect, part, +1)
    if "quality" in predicted and "quality_before" in predicted:
        weight = 1.0 if cascade else share
        part.quality_delta = weight * (predicted["quality"] - predicted["quality_before"])
        if "quality_lower_bound" in predicted:
            part.quality_margin = weight * max(0.0, predicted["quality"] - predicted["quality_lower_bound"])
        effect["quality.delta"] = effect.get("quality.delta", 0.0) + part.quality_delta
    plan.parts.append(part)
    return part


def combine_cost(effect: dict[str, float], part: Part, sign: int) -> None:
    """Add (`sign` +1) or take out (-1) a part's change of its step's cost. Moves of one step scale its cost
    one after another (a cheaper tier mix makes each call cheaper, a cache takes a share of the calls, a
    threshold a share of the escalations), so they combine as factors, not as sums: two savings of 80% and
    20% leave 16% of the cost, where their sum would promise more than all of it."""
    total = effect.get("cost_per_1k.delta", 0.0)
    base = effect.setdefault("cost_per_1k.before", part.cost_before)
    factor = 1.0 + part.cost_delta / part.cost_before if part.cost_before > 0 and base > 0 else None
    if factor is None or (sign < 0 and factor <= 1e-9):
        effect["cost_per_1k.delta"] = total + sign * part.cost_delta  # nothing to scale against: as a sum
    elif sign > 0:
        effect["cost_per_1k.delta"] = total + (base + total) * (factor - 1.0)
    else:
        effect["cost_per_1k.delta"] = (base + total) / factor - base


def take_out(plan: Plan, part: Part) -> None:
    """Drop a part's knob changes from `plan` (`Plan.drop` takes its effect out of its step's figures)."""
    for knob in part.knobs:
        plan.drop(part.step, knob)


def scale_effect(plan: Plan, step: str, share: float) -> None:
    """A step's predicted change of cost and quality for `share` of its proposal (both about linear in it)."""
    effect = plan.effects.get(step)
    if effect:
        for name in ("cost_per_1k.delta", "quality.delta"):
            if name in effect:
                effect[name] *= share

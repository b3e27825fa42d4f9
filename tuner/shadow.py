"""Shadow trials: a change that affects quality runs on a sample of tasks beside the config in force first.

When the loop is about to try a plan that moves a quality-affecting knob (`QUALITY_KNOBS`: route weights,
the cascade threshold), `before_trial` starts a shadow trial instead of the canary: the tuner serves the
candidate under `shadow` (`served`), executors run the changed model steps of `share` of tasks again under
it after the real task answered, and record the shadow's answer, time and cost on spans marked
`tracetune.shadow` (no user figure counts them). Each later look compares the shadow with the config in
force on the same tasks (`judge`): agreement, quality against labels where there are labels (paired, with a
confidence bound), the changed steps' latency and cost. A shadow that passes goes on to the canary with the
plan it was started for (`shadow_pass`, then `canary_start`); one that fails is rejected (`shadow_reject`)
and its moves are not proposed again for an hour, as after a rolled-back canary. The shadow's own cost is
capped: executors stop shadowing past `cost_cap_usd_per_hour`, and the tuner ends the trial when the shadow
spans show the cap reached.

State lives in `tracetune_shadows` (append-only; the newest row per trial wins). Settings: `ShadowSettings`
(from the `tuner_shadow_*` settings, `configure`); a share of 0 (the default) sends plans straight to the canary.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy.stats import binomtest

from tracetune.analyzer import SLO, get_slo
from tracetune.store import next_seq
from tracetune.tuner import approval, canary, decisions, versions
from tracetune.tuner.config import PipelineConfig, PipelineSpec, same_way

__all__ = ["QUALITY_KNOBS", "ShadowSettings", "Trial", "Samples", "Verdict", "configure", "running", "served",
           "start", "finish", "samples", "judge", "before_trial", "STATUSES"]

log = logging.getLogger("tracetune.tuner")

QUALITY_KNOBS = frozenset({"route_weights", "cascade_threshold"})
"""Knobs whose move changes answers, not only speed or cost: such a plan is shadowed before its canary."""
STATUSES = ("running", "passed", "rejected", "cancelled")
ALPHA = 0.05  # each of the questions `judge` asks is answered at this level
MIN_LABELLED = 30  # labelled shadowed tasks before quality is compared
MIN_AGREEMENT = 0.8  # without enough labels, a shadow beyond doubt agreeing less often than this is rejected
COST_TOLERANCE = 0.02  # a shadow dearer by less than this share is not rejected for it
# Mixing spread of the cost test, relative to the dearer arm's mean: only the changed steps are priced, so most
# tasks cost nothing on one side (a cascade that did not escalate) and differences are large against the mean.
TAU_COST = 0.5
REJECTED_MEMORY_SECONDS = 3600.0  # a move a shadow rejected is not shadowed again sooner


@dataclass(frozen=True)
class ShadowSettings:
    """How shadow trials run (the `tuner_shadow_*` settings): the share of tasks sampled (0: no shadow, plans
    go straight to the canary), the shadowed tasks needed for a verdict, the longest a trial lasts, and the
    most its own runs may cost per hour (USD, per executor and over all of them)."""

    share: float = 0.0
    min_samples: int = 200
    max_seconds: float = 1800.0
    cost_cap_usd_per_hour: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any) -> ShadowSettings:
        return cls(share=settings.tuner_shadow_share, min_samples=settings.tuner_shadow_min_samples,
                   max_seconds=settings.tuner_shadow_max_seconds,
                   cost_cap_usd_per_hour=settings.tuner_shadow_cost_cap_usd_per_hour)


SETTINGS = ShadowSettings()


def configure(settings: ShadowSettings) -> None:
    """Set the shadow settings the loop's hook uses (the tuner process calls this at start)."""
    global SETTINGS
    SETTINGS = settings


RUNNING_SQL = """
SELECT trial, argMax(base_version, (changed_at, seq)), argMax(share, (changed_at, seq)),
       argMax(status, (changed_at, seq)) AS status, argMax(steps, (changed_at, seq)), argMax(plan, (changed_at, seq)),
       argMax(reason, (changed_at, seq)), toUnixTimestamp64Micro(min(changed_at))
FROM tracetune_shadows
WHERE pipeline = {pipeline:String}
GROUP BY trial
HAVING status = 'running'
ORDER BY trial DESC
LIMIT 1
"""

NEXT_TRIAL_SQL = "SELECT max(trial) + 1 FROM tracetune_shadows"

# Shadow runs of one trial (their root spans): the real task they shadowed, both answers, times and costs.
SAMPLES_SQL = """
SELECT SpanAttributes['tracetune.shadow_of'] AS real_trace,
       SpanAttributes['tracetune.shadow_answer'] AS answer,
       SpanAttributes['tracetune.shadow_real_answer'] AS real_answer,
       toFloat64OrZero(SpanAttributes['tracetune.shadow_ms']) AS ms,
       toFloat64OrZero(SpanAttributes['tracetune.shadow_real_ms']) AS real_ms,
       toFloat64OrZero(SpanAttributes['tracetune.shadow_cost_usd']) AS cost,
       toFloat64OrZero(SpanAttributes['tracetune.shadow_real_cost_usd']) AS real_cost,
       StatusCode IN ('Error', 'STATUS_CODE_ERROR') AS failed,
       Timestamp >= now64(6) - toIntervalSecond(3600) AS last_hour
FROM otel_traces
WHERE Timestamp >= fromUnixTimestamp64Micro({since:Int64}) AND ParentSpanId = ''
  AND SpanAttributes['tracetune.shadow_pipeline'] = {pipeline:String}
  AND SpanAttributes['tracetune.shadow'] = {trial:String}
"""

# Labels of the shadowed tasks: user feedback (for the whole answer or the answer's step) wins over ground truth.
LABELS_SQL = """
SELECT trace_id, argMax(answer, priority)
FROM (
    SELECT trace_id, argMax(label, created_at) AS answer, 1 AS priority
    FROM tracetune_feedback
    WHERE pipeline = {pipeline:String} AND trace_id IN {traces:Array(String)} AND step IN ('', {step:String})
    GROUP BY trace_id
    UNION ALL
    SELECT trace_id, argMax(label, sent_at) AS answer, 0 AS priority
    FROM tracetune_ground_truth
    WHERE pipeline = {pipeline:String} AND label != '' AND trace_id IN {traces:Array(String)}
    GROUP BY trace_id
)
GROUP BY trace_id
"""


@dataclass(frozen=True)
class Trial:
    """A shadow trial: the candidate's knob changes (`steps`) against `base_version`, on `share` of tasks, and
    what the loop needs to go on to the canary (`plan`: reason, predicted, cap, limits)."""

    pipeline: str
    trial: int
    base_version: int
    share: float
    steps: dict[str, dict[str, Any]]
    plan: dict[str, Any]
    reason: str
    started_at: datetime

    @property
    def until(self) -> float:
        return self.started_at.timestamp() + float(self.plan.get("max_seconds", SETTINGS.max_seconds))

    def to_dict(self) -> dict[str, Any]:
        """What `GET .../config` serves under `shadow`."""
        return {"id": self.trial, "base_version": self.base_version, "share": self.share, "steps": self.steps,
                "answer_step": self.plan.get("answer_step", ""), "unit_costs": self.plan.get("unit_costs", {}),
                "cost_cap_usd_per_hour": self.plan.get("cost_cap_usd_per_hour", SETTINGS.cost_cap_usd_per_hour),
                "started_at": self.started_at.isoformat(), "until": self.until}


@dataclass
class Samples:
    """Per shadowed task, the shadow against the config in force on the same task."""

    answers: list[tuple[str, str]] = field(default_factory=list)  # (shadow, real)
    labelled: list[tuple[bool, bool]] = field(default_factory=list)  # (shadow right, real right)
    ms: list[tuple[float, float]] = field(default_factory=list)
    costs: list[tuple[float, float]] = field(default_factory=list)
    failed: int = 0
    spent_last_hour: float = 0.0
    spent: float = 0.0

    @property
    def n(self) -> int:
        return len(self.answers)


@dataclass(frozen=True)
class Verdict:
    """`wait`, `pass` or `reject`, why (one sentence), and the comparison's figures."""

    action: str
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


# ---- the maths (pure) ---------------------------------------------------------------------------------

def wilson(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion (0, 1 with no data)."""
    if n <= 0:
        return 0.0, 1.0
    interval = binomtest(int(hits), int(n)).proportion_ci(0.95, method="wilson")
    return float(interval.low), float(interval.high)


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test on the discordant pairs (McNemar's exact test): the chance of at least `worse`
    of them going against the shadow if either way were equally likely."""
    if worse + better == 0:
        return 1.0
    return float(binomtest(worse, worse + better, 0.5, alternative="greater").pvalue)


def judge(found: Samples, slo: SLO | None, *, min_samples: int, expired: bool = False, capped: bool = False,
          restoring: bool = False) -> Verdict:
    """Pass, reject, or wait: the shadow against the config in force on the same tasks.

    Rejected when, on labelled tasks (MIN_LABELLED at least), it is beyond doubt less often right than the
    config in force (sign test on the tasks only one of them got right) and under the quality floor, or beyond
    doubt under the floor and no better; with fewer labels, when it beyond doubt agrees with the config in force
    on fewer than MIN_AGREEMENT of tasks; when the changed steps alone take longer than the p95 target at their
    p95 (and longer than under the config in force); when it is beyond doubt dearer by more than COST_TOLERANCE
    and restores no missed objective (`restoring`). Passed once it has `min_samples` tasks and none of that
    holds; rejected when its time or its cost cap runs out first."""
    figures: dict[str, float] = {"shadow.samples": float(found.n), "shadow.failed": float(found.failed),
                                 "shadow.cost_usd": round(found.spent, 6),
                                 "shadow.cost_usd_last_hour": round(found.spent_last_hour, 6)}
    if found.n:
        agree = sum(a == b for a, b in found.answers)
        low, high = wilson(agree, found.n)
        figures.update({"shadow.agreement": round(agree / found.n, 6), "shadow.agreement_lower": round(low, 6),
                        "shadow.agreement_upper": round(high, 6)})
    if found.n < min_samples:
        if expired or capped:
            why = "its cost cap was reached" if capped else "its time ran out"
            return Verdict("reject", f"shadow rejected: {why} with {found.n} shadowed tasks of the {min_samples} "
                                     f"a verdict needs", figures)
        return Verdict("wait", f"{found.n} shadowed tasks of {min_samples}", figures)
    problems = []
    floor = slo.quality_floor if slo and slo.quality_floor is not None else None
    if len(found.labelled) >= MIN_LABELLED:
        n = len(found.labelled)
        right, real_right = sum(s for s, _ in found.labelled), sum(r for _, r in found.labelled)
        worse = sum(1 for s, r in found.labelled if r and not s)
        better = sum(1 for s, r in found.labelled if s and not r)
        p = sign_test_p(worse, better)
        low, high = wilson(right, n)
        quality, real_quality = right / n, real_right / n
        figures.update({"shadow.labelled": float(n), "shadow.quality": round(quality, 6),
                        "shadow.real_quality": round(real_quality, 6), "shadow.quality_lower": round(low, 6),
                        "shadow.quality_upper": round(high, 6), "p.quality": round(p, 6)})
        if p < ALPHA and quality < (floor if floor is not None else 1.0):
            problems.append(f"less often right on the same tasks: {quality:.3f} against {real_quality:.3f} "
                            f"({worse} tasks only the config in force got right, {better} only the shadow)"
                            + (f", under the {floor:g} floor" if floor is not None else ""))
        elif floor is not None and high < floor and quality <= real_quality:
            problems.append(f"quality {quality:.3f} (at most {high:.3f}) is under the {floor:g} floor")
    elif found.n:
        if figures["shadow.agreement_upper"] < MIN_AGREEMENT:
            problems.append(f"agrees with the config in force on {figures['shadow.agreement']:.1%} of tasks (at "
                            f"most {figures['shadow.agreement_upper']:.1%}, under {MIN_AGREEMENT:.0%}) and too few "
                            f"labels ({len(found.labelled)}) to tell which is right")
    ms, real_ms = np.array([m for m, _ in found.ms]), np.array([r for _, r in found.ms])
    p95, real_p95 = float(np.percentile(ms, 95)), float(np.percentile(real_ms, 95))
    figures.update({"shadow.steps_p95_ms": round(p95, 3), "shadow.real_steps_p95_ms": round(real_p95, 3)})
    target = slo.p95_ms if slo and slo.p95_ms is not None else None
    if target is not None and p95 > target and p95 > real_p95:
        problems.append(f"the changed steps alone take {p95:.0f} ms at p95 (against {real_p95:.0f} ms), over the "
                        f"{target:g} ms target")
    cost, real_cost = np.array([c for c, _ in found.costs]), np.array([r for _, r in found.costs])
    if (real_cost.sum() > 0 or cost.sum() > 0) and len(cost) >= 2:
        difference = cost - (1 + COST_TOLERANCE) * real_cost
        scale = TAU_COST * max(float(real_cost.mean()), float(cost.mean()))
        p = canary.msprt_p(float(difference.mean()), float(difference.var(ddof=1)) / len(difference), scale)
        before, after = 1000 * float(real_cost.mean()), 1000 * float(cost.mean())
        figures.update({"shadow.steps_cost_per_1k": round(after, 6),
                        "shadow.real_steps_cost_per_1k": round(before, 6), "p.dearer": round(p, 6)})
        if p < ALPHA and difference.mean() > 0 and not restoring:
            problems.append(f"dearer: {after:.4f} against {before:.4f} USD per 1k tasks for the changed steps")
    tasks = f"{found.n} shadowed tasks"
    if problems:
        return Verdict("reject", "shadow rejected: " + "; ".join(problems) + f" ({tasks})", figures)
    said = [f"agrees on {figures['shadow.agreement']:.1%} of tasks"]
    if "shadow.quality" in figures:
        said.append(f"quality {figures['shadow.quality']:.3f} against {figures['shadow.real_quality']:.3f} on "
                    f"{int(figures['shadow.labelled'])} labelled tasks")
    if "shadow.steps_cost_per_1k" in figures:
        said.append(f"{figures['shadow.steps_cost_per_1k']:.4f} against "
                    f"{figures['shadow.real_steps_cost_per_1k']:.4f} USD per 1k for the changed steps")
    said.append(f"changed steps p95 {p95:.0f} against {real_p95:.0f} ms")
    return Verdict("pass", "shadow passed: " + ", ".join(said) + f" ({tasks}; shadow cost "
                                                                f"{found.spent:.4f} USD)", figures)


# ---- state in the store -------------------------------------------------------------------------------

def running(client, pipeline: str) -> Trial | None:
    """The pipeline's running shadow trial, or None."""
    rows = client.query(RUNNING_SQL, parameters={"pipeline": pipeline}).result_rows
    if not rows:
        return None
    trial, base, share, _, steps, plan, reason, started = rows[0]
    return Trial(pipeline, int(trial), int(base), float(share), json.loads(steps), json.loads(plan), reason,
                 datetime.fromtimestamp(started / 1_000_000, UTC))


def served(client, config: PipelineConfig) -> dict[str, Any] | None:
    """The shadow trial executors should run beside `config` (the config in force), or None: only a running
    trial against that very version, within its time, while the pipeline is neither frozen nor pinned."""
    trial = running(client, config.pipeline)
    if trial is None or trial.base_version != config.version or datetime.now(UTC).timestamp() > trial.until:
        return None
    state = decisions.state(client, config.pipeline)
    return None if state.frozen or state.pinned else trial.to_dict()


def _append(client, trial: Trial, status: str, reason: str) -> None:
    client.insert("tracetune_shadows", [[datetime.now(UTC), next_seq(), trial.pipeline, trial.trial, trial.base_version,
                                         trial.share, status, json.dumps(trial.steps), json.dumps(trial.plan), reason]],
                  column_names=["changed_at", "seq", "pipeline", "trial", "base_version", "share", "status", "steps",
                                "plan", "reason"])


def start(client, pipeline: str, base: PipelineConfig, steps: dict, share: float, plan: dict, reason: str) -> Trial:
    """Store a running shadow trial of `steps` against `base` (the config in force)."""
    if not 0 < share <= 1:
        raise ValueError(f"a shadow's share of tasks must be in (0, 1], got {share}")
    with versions.write_lock:
        number = int(client.query(NEXT_TRIAL_SQL).result_rows[0][0] or 1)
        trial = Trial(pipeline, number, base.version, share, steps, plan, reason, datetime.now(UTC))
        _append(client, trial, "running", reason)
    return trial


def finish(client, trial: Trial, status: str, reason: str) -> None:
    """End `trial`: `passed`, `rejected` or `cancelled`."""
    if status not in STATUSES[1:]:
        raise ValueError(f"a shadow trial ends passed, rejected or cancelled, not {status!r}")
    _append(client, trial, status, reason)


def samples(client, trial: Trial, answer_step: str = "") -> Samples:
    """What the shadow runs of `trial` recorded, with the labels of the tasks they shadowed."""
    rows = client.query(SAMPLES_SQL, parameters={
        "pipeline": trial.pipeline, "trial": str(trial.trial),
        "since": int(trial.started_at.timestamp() * 1_000_000) - 60_000_000}).result_rows
    found = Samples()
    for _, _, _, _, _, cost, _, failed, last_hour in rows:
        found.spent += float(cost)
        found.spent_last_hour += float(cost) if last_hour else 0.0
        found.failed += bool(failed)
    rows = [row for row in rows if not row[7]]
    labels: dict[str, str] = {}
    traces = [row[0] for row in rows if row[0]]
    if traces:
        labels = dict(client.query(LABELS_SQL, parameters={"pipeline": trial.pipeline, "traces": traces,
                                                           "step": answer_step}).result_rows)
    for real_trace, answer, real_answer, ms, real_ms, cost, real_cost, _, _ in rows:
        found.answers.append((answer, real_answer))
        found.ms.append((float(ms), float(real_ms)))
        found.costs.append((float(cost), float(real_cost)))
        if real_trace in labels:
            found.labelled.append((answer == labels[real_trace], real_answer == labels[real_trace]))
    return found


# ---- the loop's hook ------------------------------------------------------------------------------------

def quality_moves(changes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The quality-affecting knob moves in `changes`, as step.knob."""
    return [f"{step}.{knob}" for step, values in changes.items() for knob in values if knob in QUALITY_KNOBS]


def unit_costs(spec: PipelineSpec, obs: Any) -> dict[str, float]:
    """USD per call of every route of every step, measured over the window (a route with no calls measured takes
    the dearest of its step's, so a shadow on an unused route is never counted as free)."""
    found: dict[str, float] = {}
    for step, knobs in spec.steps.items():
        routes = dict(obs.steps.get(step, {}))
        measured = {route: r.cost / max(1, r.spans - r.hits) for route, r in routes.items() if r.cost > 0}
        declared = knobs.get("route_weights")
        names = set(routes) | (set(declared.default) if declared is not None else set())
        dearest = max(measured.values(), default=0.0)
        for route in names:
            found[f"{step}.{route}"] = round(measured.get(route, dearest), 12)
    return found


def _drop_rejected(client, spec: PipelineSpec, config: PipelineConfig, plan: Any, now: datetime) -> list[str]:
    """Take out of `plan` the moves a shadow rejected lately (they would fail the same way): only the knobs the
    trial changed (its candidate against the config in force then, the decision's after and before), not one
    the config in force moved since."""
    last = decisions.last_decision(client, spec.pipeline, ("shadow_reject",))
    if last is None or _age(last, now) >= REJECTED_MEMORY_SECONDS:
        return []
    tried, then = last["config_before"].get("steps", {}), last["config_after"].get("steps", {})
    dropped = []
    for step, values in list(plan.changes.items()):
        for knob, value in list(values.items()):
            before = config.knob(step, knob)
            after = tried.get(step, {}).get(knob, before)
            declared = spec.steps.get(step, {}).get(knob)
            was = then.get(step, {}).get(knob, declared.default if declared is not None else after)
            if knob in QUALITY_KNOBS and after != was and after != before and _same_way(before, after, value):
                plan.drop(step, knob)
                dropped.append(f"{step}.{knob}")
    if dropped:
        plan.reasons.append(f"left {', '.join(dropped)} alone: shadow trial of decision {last['decision_id'][:8]} "
                            f"moved them that way and was rejected")
    return dropped


def _same_way(base: Any, tried: Any, proposed: Any) -> bool:
    """`config.same_way`, with route weights moved the same way route by route (not only to the same mix)."""
    if isinstance(base, dict) and isinstance(tried, dict) and isinstance(proposed, dict):
        def moved(values: Mapping[str, Any], route: str) -> float:
            return float(values.get(route, 0)) - float(base.get(route, 0))
        return proposed != base and all(moved(tried, r) * moved(proposed, r) >= 0 for r in base)
    return same_way(base, tried, proposed)


def _age(decision: Mapping[str, Any], now: datetime) -> float:
    decided = decision["decided_at"]
    return (now - (decided if decided.tzinfo else decided.replace(tzinfo=UTC))).total_seconds()


def before_trial(client, spec: PipelineSpec, config: PipelineConfig, plan: Any, obs: Any, loop_settings: Any,
                 now: datetime, active: Callable[[], bool] = lambda: True,
                 settings: ShadowSettings | None = None) -> tuple[bool, decisions.Decision | None]:
    """The loop's hook where a plan is about to be tried: (handled, the decision taken). Not handled (False):
    the loop tries the plan as before. Handled: a running shadow was judged (passed -> its canary starts,
    rejected, cancelled, or still waiting: None), or a shadow of this plan started (`shadow_start`)."""
    settings = settings or SETTINGS
    trial = running(client, spec.pipeline)
    if trial is not None:
        return True, _look(client, spec, config, trial, loop_settings, settings, now, active)
    if settings.share <= 0 or not quality_moves(plan.changes):
        return False, None
    _drop_rejected(client, spec, config, plan, now)
    if not plan.changes:
        return True, None
    if not quality_moves(plan.changes):
        return False, None
    predicted = {**{f"before.{k}": v for k, v in obs.summary().items()}, **plan.predicted,
                 **{k: round(v, 6) for k, v in plan.after.items() if math.isfinite(v)},
                 **{f"evidence.{k}": v for k, v in plan.evidence.items()}}
    answer_step = next(iter(spec.cascades.values()), "")
    record = {"reason": plan.reason, "predicted": predicted, "restoring": bool(plan.violated),
              "violated": list(plan.violated),
              "answer_step": answer_step, "unit_costs": unit_costs(spec, obs), "min_samples": settings.min_samples,
              "max_seconds": settings.max_seconds, "cost_cap_usd_per_hour": settings.cost_cap_usd_per_hour}
    with versions.write_lock:
        state = decisions.state(client, spec.pipeline)
        if not active() or state.frozen or state.pinned or versions.latest(client, spec.pipeline) != config:
            return True, None
        trial = start(client, spec.pipeline, config, plan.changes, settings.share, record, plan.summary)
        candidate = {**spec.merge(config, plan.changes).to_dict(), "version": config.version}  # runs beside it
        summary, _, details = plan.reason.partition("\n")
        decision = decisions.Decision(
            spec.pipeline, "shadow_start", config.version, config.version, config.to_dict(), candidate,
            f"Shadowing on {settings.share:.0%} of tasks before a canary (it changes "
            f"{', '.join(quality_moves(plan.changes))}; its answers are recorded, never returned): "
            f"{summary[0].lower()}{summary[1:]}\n{details}\nshadow trial {trial.trial}: at least "
            f"{settings.min_samples} tasks, at most {settings.max_seconds:g} s and "
            f"{settings.cost_cap_usd_per_hour:g} USD per hour of its own cost", predicted=predicted)
        decisions.record(client, decision)
    log.info("shadowing %s (trial %s): %s", spec.pipeline, trial.trial, plan.summary)
    return True, decision


def _look(client, spec: PipelineSpec, config: PipelineConfig, trial: Trial, loop_settings: Any,
          settings: ShadowSettings, now: datetime, active: Callable[[], bool]) -> decisions.Decision | None:
    """Judge the running trial; pass it on to the canary, reject or cancel it, or leave it running (None)."""
    if config.version != trial.base_version:
        verdict = Verdict("cancel", f"shadow trial {trial.trial} cancelled: version {config.version} is in force "
                                    f"now, not {trial.base_version}")
    else:
        found = samples(client, trial, str(trial.plan.get("answer_step", "")))
        cap = float(trial.plan.get("cost_cap_usd_per_hour", settings.cost_cap_usd_per_hour))
        verdict = judge(found, get_slo(client, spec.pipeline),
                        min_samples=int(trial.plan.get("min_samples", settings.min_samples)),
                        expired=now.timestamp() > trial.until, capped=found.spent_last_hour >= cap,
                        restoring=bool(trial.plan.get("restoring")))
        if verdict.action == "wait":
            return None
    with versions.write_lock:
        still = running(client, spec.pipeline)
        if not active() or still is None or still.trial != trial.trial:
            return None
        kind = {"pass": "shadow_pass", "reject": "shadow_reject", "cancel": "shadow_cancel"}[verdict.action]
        finish(client, trial, {"pass": "passed", "reject": "rejected", "cancel": "cancelled"}[verdict.action],
               verdict.reason)
        figures = {k: v for k, v in verdict.figures.items() if isinstance(v, float) and math.isfinite(v)}
        try:
            candidate = {**spec.merge(config, trial.steps).to_dict(), "version": config.version}
        except ValueError:  # the declaration changed under a cancelled trial: show its changes as they were
            candidate = {**config.to_dict(), "steps": trial.steps}
        decision = decisions.Decision(spec.pipeline, kind, config.version, config.version, candidate, config.to_dict(),
                                      verdict.reason + "\n" + json.dumps({"shadow_trial": trial.trial, **figures},
                                                                         sort_keys=True))
        decisions.record(client, decision)
        if figures:
            decisions.observe(client, decision.decision_id, figures)
        log.log(logging.WARNING if kind == "shadow_reject" else logging.INFO, "%s %s: %s", kind.replace("_", " "),
                spec.pipeline, verdict.reason)
        if kind != "shadow_pass":
            return decision
        return _to_canary(client, spec, config, trial, loop_settings, now)


@dataclass
class _Passed:
    """A passed shadow's plan as the approval gate reads one (tuner/approval.py `gate`)."""

    changes: dict[str, dict[str, Any]]
    reason: str
    violated: list[str]
    reasons: list[str] = field(default_factory=list)

    def drop(self, step: str, knob: str) -> None:
        self.changes.get(step, {}).pop(knob, None)
        if step in self.changes and not self.changes[step]:
            del self.changes[step]


def _to_canary(client, spec: PipelineSpec, config: PipelineConfig, trial: Trial,
               loop_settings: Any, now: datetime) -> decisions.Decision | None:
    """Try the plan the passed shadow was started for, as the loop would have (hold `versions.write_lock`):
    through the pipeline's approval mode first, so in `approve` mode (or for a marked change in `auto`) it
    waits as a proposal, with the shadow's verdict in the audit just before it."""
    reason, predicted = str(trial.plan.get("reason", trial.reason)), dict(trial.plan.get("predicted", {}))
    passed = _Passed(json.loads(json.dumps(trial.steps)), reason, list(trial.plan.get("violated", [])))
    held, proposed = approval.gate(client, spec, config, passed, predicted, loop_settings, now)
    if held:
        return proposed
    if passed.changes != trial.steps:  # a move an operator rejected was dropped: try the rest, or nothing
        return None
    share = float(getattr(loop_settings, "canary_share", 0.0))
    if share > 0:
        tried = canary.start(client, spec, config, trial.steps, share, reason)
        summary, _, details = reason.partition("\n")
        decision = decisions.Decision(spec.pipeline, "canary_start", config.version, tried.version, config.to_dict(),
                                      tried.config.to_dict(), f"Trying on {share:.0%} of tasks after its shadow "
                                      f"trial passed: {summary[0].lower()}{summary[1:]}\n{details}",
                                      predicted=predicted)
    else:
        new = versions.change(client, spec, trial.steps, author="tuner", reason=reason)
        if new.version == config.version:
            return None
        decision = decisions.Decision(spec.pipeline, "tune", config.version, new.version, config.to_dict(),
                                      new.to_dict(), reason, predicted=predicted)
    decisions.record(client, decision)
    return decision

"""Canaries: a new config serves a share of tasks first, and is promoted or rolled back on evidence.

The loop stores a proposed config as the next version and starts a canary on it (`start`): the tuner
then serves the config in force plus `{"canary": {version, share, steps}}`, and executors run that
share of tasks (chosen by a hash of the task id) on the canary's values. Spans say which version ran
them (`tracetune.config_version`), so both arms are measured over the same minutes.

`judge` compares the arms (pure, on per-task samples) with sequential tests whose p-values are always
valid (the mixture SPRT, `msprt_p`), so the loop looks after every interval and a canary ends as soon
as the evidence is clear: rolled back when it is beyond doubt slower past the p95 target, failing more,
less often right under the floor, or dearer without buying back an objective the config in force misses;
promoted when it is beyond doubt better at what it was tried for (cheaper, or better on the missed
objective); rolled back, the config in force kept, when its time runs out without either.

State lives in `tracetune_canaries` (append-only; newest row per version wins). A version whose
latest state is not `promoted` is never the config in force (`versions.latest` skips it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from tracetune.analyzer import SLO, PricesError, cost_per_request
from tracetune.base import routing
from tracetune.store import next_seq
from tracetune.tuner import versions
from tracetune.tuner.config import PipelineConfig, PipelineSpec

__all__ = ["ALPHA", "Arm", "Canary", "Verdict", "running", "start", "finish", "judge", "arms", "msprt_p", "STATUSES",
           "limits_for", "tasks_needed", "failures", "Compared", "covariates", "both_covariates",
           "covariate_thresholds", "escalated_by"]

ALPHA = 0.05
"""Chance that a canary no different from the config in force ends in anything but "no evidence either way"
(split evenly over the five questions `judge` asks; each test is always valid, so looking every interval
does not spend it)."""

MIN_LABELLED = 30  # labelled tasks per arm before quality is compared
COST_TOLERANCE = 0.02  # a canary dearer by less than this share is not rolled back for it, however sure the test
BUY_MARGIN = 0.10  # a canary buying quality at a predicted rise of cost goes once its rise is shown under this more
QUESTIONS = 5  # slower, fails more, less often right, dearer, better (the gain it was tried for)
# Mixing spreads of the mSPRT (the effect sizes each test is most sensitive to): cost relative to the
# config in force's mean, the rest as differences of proportions.
TAU_COST = 0.1
TAU_OVER_TARGET = 0.05
TAU_ERRORS = 0.02
TAU_QUALITY = 0.05
SLO_TAIL = 0.05  # a p95 target lets this share of tasks be slower
STATUSES = ("running", "promoted", "rolled_back", "cancelled")

RUNNING_SQL = """
SELECT version, argMax(base_version, (changed_at, seq)), argMax(share, (changed_at, seq)),
       argMax(status, (changed_at, seq)) AS status, argMax(reason, (changed_at, seq)),
       toUnixTimestamp64Micro(min(changed_at))
FROM tracetune_canaries
WHERE pipeline = {pipeline:String}
GROUP BY version
HAVING status = 'running'
ORDER BY version DESC
LIMIT 1
"""

# The root spans of both arms since the canary started, of tasks started before {until} (SETTLED_SQL):
# version, duration, outcome.
ROOTS_SQL = """
SELECT TraceId, toUInt32OrZero(SpanAttributes['tracetune.config_version']) AS version, Duration / 1e6,
       StatusCode IN ('Error', 'STATUS_CODE_ERROR'), SpanId, SpanAttributes['tracetune.task_id']
FROM otel_traces
WHERE Timestamp >= fromUnixTimestamp64Micro({since:Int64}) AND Timestamp < fromUnixTimestamp64Micro({until:Int64})
  AND ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
  AND version IN ({base:UInt32}, {canary:UInt32})
"""

# The confidences of the model steps cascades read, of tasks since the canary started: trace id, step, confidence.
CONFIDENCES_SQL = """
SELECT TraceId, SpanAttributes['tracetune.step'] AS step,
       toFloat64OrNull(SpanAttributes['tracetune.feature.confidence']) AS confidence
FROM otel_traces
WHERE Timestamp >= fromUnixTimestamp64Micro({since:Int64}) AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
  AND SpanAttributes['tracetune.step'] IN {steps:Array(String)} AND confidence IS NOT NULL
"""

# A task's root span is stored once the task ends and its spans are exported and written, so the tasks started
# last are missing, and the slow ones longest: judged on them, an arm looks faster and cheaper than it is. A
# task started before (the newest stored end) - (the longest task stored) has ended by that newest end unless it
# is the longest yet, so its spans are in: the arms count tasks started before then (microseconds; 0 with none).
SETTLED_SQL = """
SELECT max(toUnixTimestamp64Micro(Timestamp) + toInt64(intDiv(Duration, 1000)))
       - max(toInt64(intDiv(Duration, 1000)))
FROM otel_traces
WHERE Timestamp >= fromUnixTimestamp64Micro({since:Int64}) AND ParentSpanId = ''
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
"""


@dataclass(frozen=True)
class Canary:
    """A running canary: the version on trial, the version in force it is compared with, its share of tasks."""

    pipeline: str
    version: int
    base_version: int
    share: float
    reason: str
    started_at: datetime
    config: PipelineConfig

    def to_dict(self) -> dict:
        """What `GET .../config` serves under `canary`."""
        return {"version": self.version, "base_version": self.base_version, "share": self.share,
                "started_at": self.started_at.isoformat(), "steps": self.config.to_dict()["steps"]}


@dataclass(frozen=True)
class Arm:
    """Per-task samples of one arm: end-to-end durations (ms), costs (USD, NaN when unpriced), failures,
    and how many labelled tasks it answered right."""

    durations_ms: np.ndarray
    costs: np.ndarray
    errors: int = 0
    correct: int = 0
    labelled: int = 0
    covariates: np.ndarray | None = None  # per task (rows), beside `costs`: see `both_covariates` and `Compared`

    @property
    def n(self) -> int:
        return len(self.durations_ms)

    def p95(self) -> float | None:
        return self._p95

    @functools.cached_property
    def _p95(self) -> float | None:  # read by `figures` and by `judge`: computed once per arm
        return float(np.percentile(self.durations_ms, 95)) if self.n else None

    def figures(self) -> dict[str, float]:
        priced = self.costs[~np.isnan(self.costs)]
        values = {"requests": float(self.n), "p95_ms": self.p95(),
                  "cost_per_1k": 1000 * float(priced.mean()) if len(priced) else None,
                  "error_rate": self.errors / self.n if self.n else None,
                  "quality": self.correct / self.labelled if self.labelled else None}
        return {k: round(v, 6) for k, v in values.items() if v is not None}

    @classmethod
    def of(cls, durations_ms: Sequence[float], costs: Sequence[float] = (), errors: int = 0, correct: int = 0,
           labelled: int = 0, covariates: Sequence | np.ndarray | None = None) -> Arm:
        """`covariates`: one number per task, or a row of them."""
        durations = np.asarray(durations_ms, dtype=float)
        cost = np.asarray(costs, dtype=float) if len(costs) else np.full(len(durations), np.nan)
        x = None if covariates is None else np.asarray(covariates, dtype=float)
        return cls(durations, cost, errors, correct, labelled, x.reshape(len(x), -1) if x is not None else None)


def adjustable(spec: PipelineSpec, steps: Collection[str]) -> bool:
    """Whether a canary changing `steps` has its costs adjusted for whether each config escalates a task
    (`covariates`, `Compared`): it changes cascade steps and nothing else."""
    return bool(spec.cascades) and bool(steps) and set(steps) <= set(spec.cascades)


def covariate_thresholds(spec: PipelineSpec, base: PipelineConfig, trial: PipelineConfig) -> list[tuple[str, float]]:
    """(model step, threshold): the confidences each cascade reads and the config in force's threshold on them,
    when `trial` changes nothing but cascade steps (`adjustable`); else none.

    Those model steps then answer alike in both arms, so whether the config in force would escalate a task is
    fixed before the arms differ, and it explains most of a task's cost (`Compared`). A trial that changes
    any other step (a model step's routes change its confidences) gets none: its arms' costs are compared as
    they are."""
    return list(_escalating(spec, base, trial).values())


def _escalating(spec: PipelineSpec, base: PipelineConfig, trial: PipelineConfig) -> dict[str, tuple[str, float]]:
    """Cascade -> (the model step it reads, the config in force's threshold), as `covariate_thresholds`."""
    changed = {step for step in set(base.steps) | set(trial.steps) if base.steps.get(step) != trial.steps.get(step)}
    if not adjustable(spec, changed):
        return {}
    found = {}
    for cascade, after in spec.cascades.items():
        knob = spec.steps.get(cascade, {}).get("cascade_threshold")
        threshold = base.knob(cascade, "cascade_threshold", knob.default if knob is not None else None)
        if isinstance(threshold, int | float):
            found[cascade] = (after, float(threshold))
    return found


def escalated_by(confidences: Mapping[str, float | np.ndarray], thresholds: Sequence[tuple[str, float]]
                 ) -> float | np.ndarray:
    """How many of the cascades in `thresholds` would escalate a task whose model steps were this sure (each step's
    confidence a number, or an array over tasks; NaN or missing: not escalated)."""
    return sum((np.asarray(confidences.get(step, math.nan), dtype=float) < threshold).astype(float)
               for step, threshold in thresholds) + 0.0


def routed_steps(spec: PipelineSpec, config: PipelineConfig) -> dict[str, dict[str, float]]:
    """Step -> its route weights in `config`, for each step that declares routes to choose between."""
    found = {}
    for step, knobs in spec.steps.items():
        knob = knobs.get("route_weights")
        weights = config.knob(step, "route_weights", knob.default) if knob is not None else None
        if isinstance(weights, Mapping) and any(float(w) > 0 for w in weights.values()):
            found[step] = {name: float(w) for name, w in weights.items()}
    return found


def covariates(spec: PipelineSpec, base: PipelineConfig, trial: PipelineConfig, draws: Mapping[str, np.ndarray],
               confidences: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Per task of both arms (rows), what is fixed before the arms differ and explains its cost (columns), as
    `base` sets it (`both_covariates` asks for both configs'); None when nothing is.

    - The route the config in force gives each routed step of the task (`routing.pick` on the task's draw at
      that step, `draws`: one per task, NaN where not known), one column per route but one. Both arms pick by
      the same draws, so where their weights agree the task takes the same route in either, and only the tasks
      whose draws fall where the weights differ are left to tell the arms apart.
    - When `trial` changes nothing but cascade steps (`covariate_thresholds`), whether the config in force would
      escalate the task at each cascade (`confidences`: of the model step it reads, NaN where not known), and
      when the cascade routes its escalations, that times the route the config in force picks: one column
      per route.

    A step with a draw missing for any task gives no column (spans of an executor that drew routes its own way)."""
    n = len(next(iter(draws.values()))) if draws else len(next(iter(confidences.values()), ()))
    columns: list[np.ndarray] = []
    escalated = {cascade: (np.asarray(confidences.get(after, np.full(n, np.nan)), dtype=float) < threshold
                           ).astype(float)  # NaN: not escalated
                 for cascade, (after, threshold) in _escalating(spec, base, trial).items()}
    for step, weights in routed_steps(spec, base).items():
        u = draws.get(step)
        if u is None or len(u) != n or not n or np.isnan(np.asarray(u, dtype=float)).any():
            continue
        picked = np.array(routing.picks(weights, u))
        names = sorted(set(picked.tolist()))
        scale = escalated.pop(step, None)  # a cascade's route costs only where it escalates
        for name in (names if scale is not None else names[1:]):
            columns.append((picked == name).astype(float) * (scale if scale is not None else 1.0))
    columns.extend(escalated.values())  # cascades whose routes are not known: whether they escalate
    return np.column_stack(columns) if columns else None


def both_covariates(spec: PipelineSpec, base: PipelineConfig, trial: PipelineConfig,
                    draws: Mapping[str, np.ndarray], confidences: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """`covariates` as the config in force gives them, then as the trial does (the route each takes by the task's
    draw, whether each would escalate it): what `Compared` fits each arm's costs on. Both are fixed before the arms
    differ; each arm's cost follows its own config's columns."""
    found = [x for x in (covariates(spec, base, trial, draws, confidences),
                         covariates(spec, trial, base, draws, confidences)) if x is not None]
    return np.column_stack(found) if found else None


@dataclass(frozen=True)
class Compared:
    """The two arms' mean costs and the variance of their difference, for the cost tests.

    With covariates on both arms (`both_covariates`), each arm's costs are fitted on them by least squares, and each
    arm's mean is its fit at the covariates' mean over both arms (regression adjustment with a slope per arm: Lin,
    "Agnostic notes on regression adjustments to experimental data", 2013). A threshold move's canary escalates
    the tasks under its threshold and the config in force those under its own: with both columns known for every
    task, which tasks fall between the two is counted over both arms, not left to chance in each, and what is left
    to each arm is its calls' own spread. The variance of canary minus (1 + shift) times base is each arm's
    residual spread (pooled over both arms) over its tasks, plus the spread of the covariates' mean over all the
    tasks through the difference of the slopes. Without covariates (or too few tasks per column), the means as
    measured and the variance of both arms pooled (a small arm that happens to hold few escalations would
    otherwise show a low mean *and* a low variance, a false "cheaper")."""

    base_mean: float
    canary_mean: float
    spread: float  # per-task variance left in each arm
    n_base: int
    n_canary: int
    slopes: tuple[np.ndarray, np.ndarray] | None = None  # base's, the canary's
    covariance: np.ndarray | None = None  # of the covariates over both arms

    @property
    def adjusted(self) -> bool:
        return self.slopes is not None

    def difference(self, shift: float = 0.0) -> float:
        return self.canary_mean - (1 + shift) * self.base_mean

    def variance(self, shift: float = 0.0) -> float:
        v = self.spread * (1 / self.n_canary + (1 + shift) ** 2 / self.n_base)
        if self.slopes is not None and self.covariance is not None:
            d = self.slopes[1] - (1 + shift) * self.slopes[0]
            v += float(d @ self.covariance @ d) / (self.n_base + self.n_canary)
        return v

    def per_task_spread(self) -> float:
        """The standard deviation a task of either arm would need to give `variance()` unadjusted (for
        `tasks_needed`)."""
        return math.sqrt(max(self.variance(), 0.0) / (1 / self.n_canary + 1 / self.n_base))

    def test(self, tau: float, alpha: float, shift: float = 0.0) -> Test:
        """mSPRT on canary minus (1 + shift) times base (`msprt_p`)."""
        if min(self.n_base, self.n_canary) < 2:
            return Test(math.nan, 1.0, False)
        difference = self.difference(shift)
        p = msprt_p(difference, self.variance(shift), tau)
        return Test(difference, p, p < alpha)

    @classmethod
    def of(cls, base: Arm, canary: Arm) -> Compared:
        b_ok, c_ok = ~np.isnan(base.costs), ~np.isnan(canary.costs)
        b, c = base.costs[b_ok], canary.costs[c_ok]
        if base.covariates is None or canary.covariates is None \
                or base.covariates.shape[1:] != canary.covariates.shape[1:]:
            return cls._plain(b, c)
        xb, xc = base.covariates[b_ok], canary.covariates[c_ok]
        k = xb.shape[1]
        if min(len(b), len(c)) < 10 * (k + 1):
            return cls._plain(b, c)
        both = np.vstack([xb, xc])
        mean = both.mean(axis=0)
        centred = both - mean
        fits, left = [], 0.0
        for design, y in ((centred[:len(b)], b), (centred[len(b):], c)):
            design = np.column_stack([np.ones(len(y)), design])
            # Least squares on the normal equations (a few columns, thousands of tasks); the pseudo-inverse gives
            # the least-norm fit where columns repeat (a config that leaves a step as it is).
            coefficients = np.linalg.pinv(design.T @ design, rcond=1e-10, hermitian=True) @ (design.T @ y)
            residual = y - design @ coefficients
            fits.append(coefficients)
            left += float(residual @ residual)
        spread = left / max(len(b) + len(c) - 2 * (k + 1), 1)
        covariance = centred.T @ centred / max(len(centred) - 1, 1)
        return cls(float(fits[0][0]), float(fits[1][0]), spread, len(b), len(c), (fits[0][1:], fits[1][1:]),
                   covariance)

    @classmethod
    def _plain(cls, b: np.ndarray, c: np.ndarray) -> Compared:
        """The means as measured, with the variance of both arms pooled."""
        return cls(float(b.mean()) if len(b) else math.nan, float(c.mean()) if len(c) else math.nan,
                   float(np.concatenate([b, c]).var(ddof=1)) if len(b) + len(c) > 1 else math.nan, len(b), len(c))


@dataclass(frozen=True)
class Verdict:
    """`wait`, `promote` or `rollback`, why (one sentence), and the figures behind it."""

    action: str
    reason: str
    figures: dict[str, float] = field(default_factory=dict)



def msprt_p(estimate: float, variance: float, tau: float) -> float:
    """Always-valid p-value of "the true difference is 0" from an estimate with `variance`: the mixture
    SPRT of Johari, Pekelis and Walsh (Always Valid Inference, 2017), normal mixture N(0, tau^2) over the
    effect, on the normal approximation of a difference of means. 1 / (mixture likelihood ratio), capped at 1.

    Rejecting the first time this is under alpha keeps the chance of a false rejection under alpha however
    often one looks (Ville's inequality), which is what lets a canary stop as soon as the evidence is clear."""
    if not (math.isfinite(estimate) and math.isfinite(variance)) or tau <= 0:
        return 1.0
    if variance <= 0:
        return 0.0 if estimate != 0 else 1.0
    tau2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + tau2)) + tau2 * estimate * estimate / (
        2 * variance * (variance + tau2))
    return float(min(1.0, math.exp(-log_ratio)))


def tasks_needed(effect: float, spread: float, tau: float, share: float, alpha: float = ALPHA / QUESTIONS,
                 limit: int = 100_000_000) -> int | None:
    """Tasks on the canary before the mSPRT can show a true difference of `effect` (canary minus base, in the
    metric's unit) when tasks spread by `spread` (standard deviation) and the canary gets `share` of them (the
    config in force the rest): the smallest canary arm with `msprt_p` under `alpha` at the expected estimate.
    None when not even `limit` tasks would do (no difference, or none to see).

    What a canary's size and time limit must allow for: a per-task cost carried by a few escalations spreads
    wide, and a real saving then needs thousands of tasks, not hundreds."""
    if not 0 < share < 1 or not effect or not math.isfinite(effect) or spread <= 0 or tau <= 0:
        return None

    def shown(n: int) -> bool:
        return msprt_p(abs(effect), spread * spread * (1 / n + share / ((1 - share) * n)), tau) < alpha

    high = 2
    while not shown(high):
        high *= 2
        if high > limit:
            return None
    low = high // 2
    while high - low > 1:  # the first n past which it stays shown (p falls with n once the effect dominates)
        middle = (low + high) // 2
        low, high = (low, middle) if shown(middle) else (middle, high)
    return high


def limits_for(seconds: float, rate: float, spread: float, *, effect: float = 0.3, share: float = 0.5,
               floor_tasks: int = 30, default_min_requests: int = 200) -> dict[str, float]:
    """Canary limits for a run of `seconds` at a mean `rate` of tasks/s whose per-task cost spreads by `spread`
    (coefficient of variation): `share` of tasks on the canary (half: the soonest verdict for a difference),
    time enough for the mSPRT to show a cost difference of `effect` (relative) -- at least a quarter of the run,
    at most a third -- and a minimum of tasks per arm the canary reaches well within that time.

    What a time-compressed run (the benchmark's) sets instead of the loop's defaults, which assume hours."""
    needed = tasks_needed(-effect, spread, TAU_COST, share)
    wanted = needed / (share * rate) if needed and rate > 0 else math.inf
    max_seconds = round(min(seconds / 3, max(seconds / 4, wanted)))
    min_requests = max(floor_tasks, min(default_min_requests, int(share * rate * max_seconds / 4)))
    return {"share": share, "max_seconds": float(max_seconds), "min_requests": min_requests,
            "tasks_needed": float(needed or math.inf)}


@dataclass(frozen=True)
class Test:
    """One sequential comparison of the canary with the config in force: the difference (canary minus base,
    in the metric's unit), its always-valid p-value, and whether it is beyond doubt at the test's alpha."""

    difference: float
    p: float
    significant: bool


def _proportions(hits_c: int, n_c: int, hits_b: int, n_b: int, tau: float, alpha: float) -> Test:
    """mSPRT on a difference of two proportions (canary minus base), with the pooled proportion's variance
    (as under the null; a small arm at 100% right would otherwise claim a variance of 0)."""
    if n_c == 0 or n_b == 0:
        return Test(math.nan, 1.0, False)
    pooled = (hits_c + hits_b) / (n_c + n_b)
    spread = max(pooled * (1 - pooled), 0.5 / (n_c + n_b))  # kept off 0: 0 of n is not known exactly
    p = msprt_p(hits_c / n_c - hits_b / n_b, spread * (1 / n_c + 1 / n_b), tau)
    return Test(hits_c / n_c - hits_b / n_b, p, p < alpha)


def _under(hits: int, n: int, floor: float, tau: float, alpha: float) -> Test:
    """mSPRT on one proportion against a fixed floor (its difference from the floor, negative when under),
    with the floor's variance (as under the null)."""
    if n == 0:
        return Test(math.nan, 1.0, False)
    p = msprt_p(hits / n - floor, max(floor * (1 - floor), 0.5 / n) / n, tau)
    return Test(hits / n - floor, p, p < alpha and hits / n < floor)


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old:+.0%}" if old else "n/a"


RUN_ON = 2.0  # a cheaper canary its tasks cannot show yet may run on up to this many times its time


def out_of_time(age_seconds: float, max_seconds: float) -> dict[str, bool]:
    """`judge`'s `expired` and `may_run_on` for a canary `age_seconds` old with `max_seconds` to run."""
    return {"expired": age_seconds >= max_seconds, "may_run_on": age_seconds < RUN_ON * max_seconds}


def judge(base: Arm, canary: Arm, slo: SLO | None, *, min_requests: int = 200, expired: bool = False,
          alpha: float = ALPHA, lowers_quality: bool = False, buys_quality: float | None = None,
          may_run_on: bool = False) -> Verdict:
    """Promote, roll back, or wait for more tasks: the canary against the config in force over the same time.

    Every comparison is a sequential test with an always-valid p-value (`msprt_p`), so the loop may judge
    after every interval and stop at the first clear answer. Rolled back as soon as the canary is beyond
    doubt slower past the p95 target, failing more past the error objective, less often right under the
    floor (than the config in force, or than a floor the config in force holds), or dearer (by more than
    COST_TOLERANCE) without buying back an objective the config in force misses. Promoted as soon as it is
    beyond doubt better at what it was tried for: cheaper, or — when the config in force misses an
    objective — better on that objective (a dearer canary only so, and the reason says so). A canary whose
    moves were predicted to lower quality (`lowers_quality`) is never promoted while that is open: labelled
    answers come in but it has too few to judge, or its labelled quality is under the floor and the config
    in force's without the doubt settled either way (it waits for labels). Neither when the time runs out
    (`expired`): rolled back, the config in force stays. Except (`may_run_on`, while it has run less than
    twice its time) a canary cheaper by a difference its tasks are too few to show, and that twice as many
    would: it runs on (its tests are always valid, so looking again later costs no false promotions).

    A canary whose decision bought quality for a floor at risk (`buys_quality`: the relative change of cost it
    was predicted to pay, when the floor was missed or the config in force no longer held it at its lower
    bound, and its moves were predicted to raise quality) is judged on doing no harm at the cost predicted: not
    slower, failing more, less often right or dearer than predicted (by more than COST_TOLERANCE) beyond doubt,
    its labelled quality not under both the floor and the config in force's (then it waits for labels, as one
    predicted to lower quality does), its p95 not over a target the config in force meets (then it waits, and
    is rolled back for latency when its time runs out), and promoted once shown no dearer than predicted by
    BUY_MARGIN more, or,
    when its time runs out, on its cost's point estimate within that. Its gain, a margin over the floor, is too
    small for its tasks to show: a test of it could only run its time out while the floor stays at risk.

    A rollback's figures name the objectives it is for (`failed.<name>`: 1 for latency, errors, quality or cost),
    none when it ran out of tasks or time without a finding: the loop holds back only the moves that could be to
    blame (`loop.drop_rejected`)."""
    each = alpha / QUESTIONS
    figures = {**{f"base.{k}": v for k, v in base.figures().items()},
               **{f"canary.{k}": v for k, v in canary.figures().items()}}
    if min(base.n, canary.n) < min_requests:
        if expired:
            return Verdict("rollback", f"too few tasks to judge ({canary.n} on the canary, {base.n} on the config "
                                       f"in force; {min_requests} each needed) before the canary's time ran out",
                           figures)
        return Verdict("wait", f"{canary.n} and {base.n} tasks of {min_requests} each", figures)
    target = slo.p95_ms if slo and slo.p95_ms is not None else None
    base_p95, canary_p95 = base.p95() or 0.0, canary.p95() or 0.0
    problems, gains, misses = [], [], []
    failed: list[str] = []  # the objectives a rollback is for (`_fail`: the loop's blame)

    # Latency: the share of tasks slower than the target (the p95 target allows SLO_TAIL of them).
    limit = target if target is not None else 1.1 * base_p95
    over = _proportions(int((canary.durations_ms > limit).sum()), canary.n, int((base.durations_ms > limit).sum()),
                        base.n, TAU_OVER_TARGET, each)
    figures["p.latency"] = round(over.p, 6)
    base_misses_latency = target is not None and base_p95 > target
    if base_misses_latency:
        misses.append("latency")
    if over.significant and over.difference > 0 and canary_p95 > limit:
        what = f"the {target:g} ms target" if target is not None else "the config in force's p95 +10%"
        problems.append(f"slower: p95 {canary_p95:.0f} against {base_p95:.0f} ms, over {what}")
        failed.append("latency")
    elif over.significant and over.difference < 0 and base_misses_latency:
        gains.append(f"p95 {base_p95:.0f} -> {canary_p95:.0f} ms against the {target:g} ms target")

    allowed = slo.error_rate if slo and slo.error_rate is not None else 0.0
    errors = _proportions(canary.errors, canary.n, base.errors, base.n, TAU_ERRORS, each)
    figures["p.errors"] = round(errors.p, 6)
    base_rate, canary_rate = base.errors / base.n, canary.errors / canary.n
    if base_rate > allowed:
        misses.append("errors")
    if errors.significant and errors.difference > 0 and canary_rate > allowed:
        problems.append(f"fails more often: {canary_rate:.2%} of tasks against {base_rate:.2%}")
        failed.append("errors")
    elif errors.significant and errors.difference < 0 and base_rate > allowed:
        gains.append(f"errors {base_rate:.2%} -> {canary_rate:.2%} against the {allowed:.2%} objective")

    floor = slo.quality_floor if slo and slo.quality_floor is not None else None
    unsettled = ""  # an open question on quality: the canary may not go yet, whatever else it shows
    if min(base.labelled, canary.labelled) >= MIN_LABELLED:
        quality = _proportions(canary.correct, canary.labelled, base.correct, base.labelled, TAU_QUALITY, each)
        figures["p.quality"] = round(quality.p, 6)
        base_q, canary_q = base.correct / base.labelled, canary.correct / canary.labelled
        if floor is not None and base_q < floor:
            misses.append("quality")
        under = _under(canary.correct, canary.labelled, floor, TAU_QUALITY, each) if floor is not None else None
        if under is not None:
            figures["p.under_floor"] = round(under.p, 6)
        if quality.significant and quality.difference < 0 and canary_q < (floor if floor is not None else 1.0):
            problems.append(f"less often right: {canary_q:.3f} against {base_q:.3f}"
                            + (f", under the {floor:.3g} floor" if floor is not None else ""))
            failed.append("quality")
        elif under is not None and under.significant and base_q >= floor:
            problems.append(f"less often right: {canary_q:.3f}, beyond doubt under the {floor:.3g} floor the "
                            f"config in force holds ({base_q:.3f})")
            failed.append("quality")
        elif quality.significant and quality.difference > 0 and floor is not None and base_q < floor:
            gains.append(f"quality {base_q:.3f} -> {canary_q:.3f} against the {floor:.3g} floor")
        elif (lowers_quality or buys_quality is not None) and floor is not None and canary_q < min(floor, base_q):
            unsettled = (f"quality {canary_q:.3f} on the canary's {canary.labelled} labelled tasks, under the "
                         f"{floor:.3g} floor (the config in force {base_q:.3f})")
    elif (lowers_quality or buys_quality is not None) and floor is not None and base.labelled >= MIN_LABELLED:
        # too few labels on the canary yet
        unsettled = f"{canary.labelled} labelled tasks on the canary of the {MIN_LABELLED} its quality is judged on"

    base_cost, canary_cost = base.costs[~np.isnan(base.costs)], canary.costs[~np.isnan(canary.costs)]
    priced = len(base_cost) >= 2 and len(canary_cost) >= 2 and base_cost.mean() > 0
    cost_text = ""
    # The cost tests read the arms' costs fitted on what both configs fix for each task (`Compared`); the figures
    # and the words, the costs as measured.
    tested = Compared.of(base, canary)
    if priced:
        scale = TAU_COST * float(base_cost.mean())
        allowed_rise = max(0.0, buys_quality) if buys_quality is not None else 0.0
        dearer = tested.test(scale, each, shift=COST_TOLERANCE + allowed_rise)
        cheaper = tested.test(scale, each)
        if tested.adjusted:
            figures["cost_adjusted"] = 1.0
        figures["p.dearer"], figures["p.cheaper"] = round(dearer.p, 6), round(cheaper.p, 6)
        before, after = 1000 * float(base_cost.mean()), 1000 * float(canary_cost.mean())
        cost_text = f"{after:.4f} against {before:.4f} USD per 1k ({_pct(after, before)})"
        if cheaper.significant and cheaper.difference < 0:
            gains.insert(0, f"cheaper: {cost_text}")
        elif dearer.significant and dearer.difference > 0:
            if gains:  # paying more is worth it only to buy back an objective the config in force misses
                gains = [f"dearer ({cost_text}) to buy back what the config in force misses: " + "; ".join(gains)]
            elif buys_quality is not None:
                problems.append(f"dearer than the {buys_quality:+.0%} predicted for the quality it buys: {cost_text}")
                failed.append("cost")
            else:
                problems.append(f"dearer: {cost_text}"
                                + (" and it buys back nothing (the config in force meets every objective)"
                                   if not misses else f" and not better on {', '.join(misses)}"))
                failed.append("cost")
    tasks = f"{canary.n} tasks on the canary against {base.n}"
    _fail(figures, *failed)
    if problems:
        return Verdict("rollback", "canary " + "; ".join(problems) + f" ({tasks})", figures)
    if unsettled:  # nothing else outweighs a floor the canary may be under: more labels settle it either way
        if expired:
            _fail(figures, "quality")
            return Verdict("rollback", f"no evidence the canary holds the floor before its time ran out: "
                                       f"{unsettled} ({tasks}); the config in force stays", figures)
        return Verdict("wait", f"{unsettled}: more labels before it can go ({tasks})", figures)
    if gains:
        if priced and not any(g.startswith(("cheaper", "dearer")) for g in gains):
            if canary_cost.mean() > base_cost.mean():  # dearer, if not beyond doubt: say what it buys
                gains = [f"dearer ({cost_text}) to buy back what the config in force misses: " + "; ".join(gains)]
            else:
                gains.append(f"cost {cost_text}")
        return Verdict("promote", "canary better: " + "; ".join(gains) + f" ({tasks})", figures)
    if buys_quality is not None:
        quality_text = (f"quality {canary.correct / canary.labelled:.3f} against {base.correct / base.labelled:.3f}"
                        if min(base.labelled, canary.labelled) else "quality not labelled yet")
        floor_text = f" (floor {floor:.3g})" if floor is not None else ""
        cost_part = f", cost {cost_text}, {buys_quality:+.0%} predicted" if cost_text else ""
        said = (f"{quality_text}{floor_text}{cost_part}, p95 {canary_p95:.0f} against {base_p95:.0f} ms ({tasks})")
        no_harm = "canary does no harm and buys quality margin for a floor at risk"
        if target is not None and canary_p95 > target >= base_p95:
            # Its p95 over a target the config in force meets is harm, though too few of its tasks are over it yet
            # for the test of them to say so: it does not go on the margin it buys.
            if expired:
                _fail(figures, "latency")
                return Verdict("rollback", f"canary buying quality has its p95 over the {target:g} ms target the "
                                           f"config in force meets when its time ran out: {said}; the config in "
                                           f"force stays", figures)
            return Verdict("wait", f"buying quality: its p95 over the {target:g} ms target the config in force "
                                   f"meets: {said}", figures)
        if not priced:
            return Verdict("promote", f"{no_harm}: {said}", figures)
        # Shown no dearer than predicted by BUY_MARGIN more: it goes. Skewed per-task costs make that slow to
        # show; at the end of its time the point estimate decides (a canary's thousands of tasks put it within
        # a few percent), so a quality move is neither held by a cost test it cannot pass nor let through dear.
        limit = allowed_rise + BUY_MARGIN
        within = tested.test(scale, each, shift=limit)
        figures["p.within_predicted"] = round(within.p, 6)
        rise = float(canary_cost.mean() / base_cost.mean() - 1.0)
        if within.significant and within.difference < 0:
            return Verdict("promote", f"{no_harm}, shown no dearer than predicted {limit - allowed_rise:+.0%}: {said}",
                           figures)
        if expired:
            if rise <= limit:
                return Verdict("promote", f"{no_harm}, its cost within {limit - allowed_rise:+.0%} of the prediction "
                                          f"when its time ran out: {said}", figures)
            _fail(figures, "cost")
            return Verdict("rollback", f"canary dearer than the {buys_quality:+.0%} predicted for the quality it "
                                       f"buys when its time ran out: {said}; the config in force stays", figures)
        return Verdict("wait", f"buying quality: its cost against the {buys_quality:+.0%} predicted not clear yet "
                               f"({tasks})", figures)
    if not priced and not misses:
        # Nothing to gain that can be measured (no price table, every objective met): it holds, so it goes.
        return Verdict("promote", f"canary no worse and cost not measured (no prices): p95 {canary_p95:.0f} against "
                                  f"{base_p95:.0f} ms ({tasks})", figures)
    if expired:
        gain = "cost" if not misses else ", ".join(misses)
        short = ""
        if priced and not misses and tested.difference() < 0:
            # Not a finding against the canary: the difference it shows was too small for its tasks to prove. Sized
            # on what the test reads (the adjusted difference and its variance), not the costs as measured.
            spread = tested.per_task_spread()
            share = canary.n / (canary.n + base.n)
            difference = tested.difference()
            change = difference / float(base_cost.mean())
            figures["cost_change_tested"] = round(change, 6)
            needed = tasks_needed(difference, spread, TAU_COST * float(base_cost.mean()), share, each)
            if needed is not None and needed > canary.n:
                figures["tasks_needed"] = float(needed)
                if may_run_on and needed <= RUN_ON * canary.n:
                    return Verdict("wait", f"its time ran out at {cost_text}, short of the about {needed:,} tasks "
                                           f"on the canary that would show it ({tasks}): it runs on, at most as "
                                           f"long again", figures)
                read = (f" (the {change:+.0%} its test reads, adjusted for what the "
                        f"configs fix)" if tested.adjusted else "")
                short = (f"; rolled back for want of tasks, not because it did worse: showing a difference this size"
                         f"{read} at this spread of per-task cost takes about {needed:,} tasks on the canary")
        return Verdict("rollback", f"no evidence of a gain in {gain} before the canary's time ran out"
                                   + (f": {cost_text}" if cost_text else "") + f" ({tasks}){short}; the config in "
                                   f"force stays", figures)
    return Verdict("wait", f"no clear difference yet ({tasks})", figures)


FAILED = "failed."  # a rollback's figures name what it was for: failed.<objective> = 1


def _fail(figures: dict[str, float], *objectives: str) -> None:
    figures.update({FAILED + name: 1.0 for name in objectives})


def failures(figures: Mapping[str, float]) -> frozenset[str]:
    """The objectives a verdict's figures (or a rollback's observed figures in the audit) say it failed."""
    return frozenset(k.removeprefix(FAILED) for k, v in figures.items() if k.startswith(FAILED) and v)


# ---- state in the store ---------------------------------------------------------------------------

def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def running(client, pipeline: str) -> Canary | None:
    """The pipeline's running canary, or None."""
    rows = client.query(RUNNING_SQL, parameters={"pipeline": pipeline}).result_rows
    if not rows:
        return None
    version, base, share, _, reason, started = rows[0]
    config = versions.at(client, pipeline, int(version))
    if config is None:
        return None
    return Canary(pipeline, int(version), int(base), float(share), reason,
                  datetime.fromtimestamp(started / 1_000_000, UTC), config)


def _append(client, pipeline: str, version: int, base_version: int, share: float, status: str, reason: str) -> None:
    client.insert("tracetune_canaries",
                  [[datetime.now(UTC), next_seq(), pipeline, version, base_version, share, status, reason]],
                  column_names=["changed_at", "seq", "pipeline", "version", "base_version", "share", "status",
                                "reason"])


def start(client, spec: PipelineSpec, base: PipelineConfig, steps: dict, share: float, reason: str) -> Canary:
    """Store `base` with `steps` applied as the next version, on trial for `share` of tasks. Hold
    `versions.write_lock` around reading `base` and this call."""
    if not 0 < share < 1:
        raise ValueError(f"a canary's share of tasks must be between 0 and 1, got {share}")
    with versions.write_lock:
        config = versions.save_next(client, spec.merge(base, steps), author="tuner", reason=f"canary: {reason}")
        _append(client, spec.pipeline, config.version, base.version, share, "running", reason)
    return Canary(spec.pipeline, config.version, base.version, share, reason, datetime.now(UTC), config)


def finish(client, canary: Canary, status: str, reason: str) -> None:
    """End `canary`: `promoted` (its version becomes the config in force), `rolled_back` or `cancelled`."""
    if status not in STATUSES[1:]:
        raise ValueError(f"a canary ends promoted, rolled_back or cancelled, not {status!r}")
    _append(client, canary.pipeline, canary.version, canary.base_version, canary.share, status, reason)


def arms(client, spec: PipelineSpec, canary: Canary, correct: dict[str, bool] | None = None) -> tuple[Arm, Arm]:
    """Per-task samples of the config in force and of the canary since the canary started, of the tasks whose
    spans are all in (started before `SETTLED_SQL`'s cutoff): a task still running is not counted as missing.

    `correct` maps trace ids of labelled tasks to whether the pipeline's answer was right."""
    since = _micros(canary.started_at)
    until = int(client.query(SETTLED_SQL, parameters={"pipeline": spec.pipeline, "since": since}).result_rows[0][0]
                or 0)
    rows = client.query(ROOTS_SQL, parameters={"pipeline": spec.pipeline, "since": since, "until": until,
                                               "base": canary.base_version, "canary": canary.version}).result_rows
    base_config = versions.at(client, spec.pipeline, canary.base_version)
    thresholds = covariate_thresholds(spec, base_config, canary.config)
    confidences: dict[str, dict[str, float]] = {}  # trace id -> step -> confidence
    if thresholds:
        for trace_id, step, confidence in client.query(CONFIDENCES_SQL, parameters={
                "pipeline": spec.pipeline, "since": since, "steps": sorted({step for step, _ in thresholds})}
                ).result_rows:
            confidences.setdefault(trace_id, {})[step] = float(confidence)
    window = max(1, int((datetime.now(UTC) - canary.started_at).total_seconds()) + 1)
    costs: dict[str, float] = {}
    try:
        frame = cost_per_request(client, since=window, pipeline=spec.pipeline, limit=1_000_000)
        costs = dict(zip(frame["trace_id"].to_list(), frame["cost"].to_list(), strict=True))
    except PricesError:
        pass  # no price table yet: cost is not compared
    # Both arms' tasks in one order (the config in force's first), for covariates computed over them together.
    rows = sorted(rows, key=lambda row: int(row[1]) != canary.base_version)
    routed = routed_steps(spec, base_config)
    keys = [routing.key(task_id, trace_id, span_id) for trace_id, _, _, _, span_id, task_id in rows]
    x = both_covariates(spec, base_config, canary.config,
                        {step: np.array([routing.draw(key, step) for key in keys]) for step in routed},
                        {step: np.array([confidences.get(row[0], {}).get(step, math.nan) for row in rows])
                         for step, _ in thresholds})
    samples: dict[int, dict] = {v: {"d": [], "c": [], "e": 0, "ok": 0, "n": 0, "x": []}
                                for v in (canary.base_version, canary.version)}
    for i, (trace_id, version, duration_ms, failed, _, _) in enumerate(rows):
        arm = samples[int(version)]
        arm["d"].append(float(duration_ms))
        arm["x"].append(i)
        cost = costs.get(trace_id)
        arm["c"].append(float("nan") if cost is None else float(cost))
        arm["e"] += bool(failed)
        if correct and trace_id in correct:
            arm["n"] += 1
            arm["ok"] += correct[trace_id]
    base, trial = (Arm.of(s["d"], s["c"], s["e"], s["ok"], s["n"], x[s["x"]] if x is not None else None)
                   for s in (samples[canary.base_version], samples[canary.version]))
    return base, trial

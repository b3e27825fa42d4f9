"""Canaries: a new config serves a share of tasks first, and is promoted or rolled back on evidence.

The loop stores a proposed config as the next version and starts a canary on it (`start`): the tuner
then serves the config in force plus `{"canary": {version, share, steps}}`, and executors run that
share of tasks (chosen by a hash of the task id) on the canary's values. Spans say which version ran
them (`tracetune.config_version`), so both arms are measured over the same minutes.

`judge` compares the arms (pure, on per-task samples) with one-sided tests at ALPHA split over the
four questions (Bonferroni): is the canary slower (Mann-Whitney U) and over the p95 target, more often
failing (two-proportion z) and over the error-rate objective, less often right (two-proportion z) and
under the quality floor, or dearer (Welch's t, by more than 2%) while the config in force meets its latency target?
Any yes rolls it back; otherwise, once both arms have enough tasks, it is promoted.

State lives in `tracetune_canaries` (append-only; newest row per version wins). A version whose
latest state is not `promoted` is never the config in force (`versions.latest` skips it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from tracetune.analyzer import SLO, PricesError, cost_per_request
from tracetune.store import next_seq
from tracetune.tuner import versions
from tracetune.tuner.config import PipelineConfig, PipelineSpec

__all__ = ["ALPHA", "Arm", "Canary", "Verdict", "running", "start", "finish", "judge", "arms", "STATUSES"]

ALPHA = 0.05
"""Family-wise chance of rolling back a canary that is no worse (split evenly over the four tests)."""

MIN_LABELLED = 30  # labelled tasks per arm before quality is compared
COST_TOLERANCE = 0.02  # a canary dearer by less than this share is not rolled back for it, however sure the test
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

# The root spans of both arms since the canary started: version, duration, outcome.
ROOTS_SQL = """
SELECT TraceId, toUInt32OrZero(SpanAttributes['tracetune.config_version']) AS version, Duration / 1e6,
       StatusCode = 'Error'
FROM otel_traces
WHERE Timestamp >= fromUnixTimestamp64Micro({since:Int64}) AND ParentSpanId = ''
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
  AND version IN ({base:UInt32}, {canary:UInt32})
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

    @property
    def n(self) -> int:
        return len(self.durations_ms)

    def p95(self) -> float | None:
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
           labelled: int = 0) -> Arm:
        durations = np.asarray(durations_ms, dtype=float)
        cost = np.asarray(costs, dtype=float) if len(costs) else np.full(len(durations), np.nan)
        return cls(durations, cost, errors, correct, labelled)


@dataclass(frozen=True)
class Verdict:
    """`wait`, `promote` or `rollback`, why (one sentence), and the figures behind it."""

    action: str
    reason: str
    figures: dict[str, float] = field(default_factory=dict)



def _scipy_stats():
    """scipy.stats, imported on first use: it takes seconds, and the tuner's API never judges a canary."""
    from scipy import stats

    return stats

def _less_proportion_p(bad_a: int, n_a: int, bad_b: int, n_b: int) -> float:
    """One-sided p-value that arm b's rate of `bad` is above arm a's (pooled two-proportion z-test)."""
    if n_a == 0 or n_b == 0:
        return 1.0
    pooled = (bad_a + bad_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 1.0
    return float(_scipy_stats().norm.sf((bad_b / n_b - bad_a / n_a) / spread))


def judge(base: Arm, canary: Arm, slo: SLO | None, *, min_requests: int = 200, expired: bool = False,
          alpha: float = ALPHA) -> Verdict:
    """Promote, roll back, or wait for more tasks: the canary against the config in force over the same time."""
    each = alpha / 4
    figures = {**{f"base.{k}": v for k, v in base.figures().items()},
               **{f"canary.{k}": v for k, v in canary.figures().items()}}
    if min(base.n, canary.n) < min_requests:
        if expired:
            return Verdict("rollback", f"too few tasks to judge ({canary.n} on the canary, {base.n} on the config "
                                       f"in force; {min_requests} each needed) before the canary's time ran out",
                           figures)
        return Verdict("wait", f"{canary.n} and {base.n} tasks of {min_requests} each", figures)
    target = slo.p95_ms if slo else None
    base_p95, canary_p95 = base.p95() or 0.0, canary.p95() or 0.0
    problems = []

    slower = float(_scipy_stats().mannwhitneyu(canary.durations_ms, base.durations_ms, alternative="greater").pvalue)
    faster = float(_scipy_stats().mannwhitneyu(canary.durations_ms, base.durations_ms, alternative="less").pvalue)
    figures["p.slower"], figures["p.faster"] = round(slower, 6), round(faster, 6)
    over_target = canary_p95 > target if target is not None else canary_p95 > 1.1 * base_p95
    if slower < each and over_target:
        limit = f"the {target:g} ms target" if target is not None else "the config in force's +10%"
        problems.append(f"slower (p95 {canary_p95:.0f} vs {base_p95:.0f} ms, p={slower:.2g}) and over {limit}")

    worse_errors = _less_proportion_p(base.errors, base.n, canary.errors, canary.n)
    figures["p.errors"] = round(worse_errors, 6)
    allowed = slo.error_rate if slo and slo.error_rate is not None else 0.0
    if worse_errors < each and canary.errors / canary.n > allowed:
        problems.append(f"fails more often ({canary.errors / canary.n:.2%} vs {base.errors / base.n:.2%}, "
                        f"p={worse_errors:.2g})")

    if min(base.labelled, canary.labelled) >= MIN_LABELLED:
        wrong = _less_proportion_p(base.labelled - base.correct, base.labelled,
                                   canary.labelled - canary.correct, canary.labelled)
        figures["p.quality"] = round(wrong, 6)
        floor = slo.quality_floor if slo and slo.quality_floor is not None else 1.0
        quality = canary.correct / canary.labelled
        if wrong < each and quality < floor:
            problems.append(f"less often right ({quality:.1%} vs {base.correct / base.labelled:.1%}, p={wrong:.2g}) "
                            f"and under the {floor:.0%} floor")

    base_cost, canary_cost = base.costs[~np.isnan(base.costs)], canary.costs[~np.isnan(canary.costs)]
    if len(base_cost) >= 2 and len(canary_cost) >= 2 and (base_cost.std() > 0 or canary_cost.std() > 0):
        dearer = float(_scipy_stats().ttest_ind(canary_cost, base_cost, equal_var=False, alternative="greater").pvalue)
        figures["p.dearer"] = round(dearer, 6)
        # Paying more is worth it only to bring a config that misses its latency target back under it.
        fixes_latency = target is not None and base_p95 > target and faster < each
        if dearer < each and canary_cost.mean() > (1 + COST_TOLERANCE) * base_cost.mean() and not fixes_latency:
            problems.append(f"dearer ({1000 * canary_cost.mean():.4f} vs {1000 * base_cost.mean():.4f} per 1k, "
                            f"p={dearer:.2g})")
    if problems:
        return Verdict("rollback", "canary " + "; ".join(problems), figures)
    return Verdict("promote", f"canary no worse on {canary.n} tasks against {base.n}: p95 {canary_p95:.0f} vs "
                              f"{base_p95:.0f} ms" + (f", cost {figures['canary.cost_per_1k']:.4f} vs "
                                                      f"{figures['base.cost_per_1k']:.4f} per 1k"
                                                      if "canary.cost_per_1k" in figures
                                                      and "base.cost_per_1k" in figures else ""), figures)


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
    """Per-task samples of the config in force and of the canary since the canary started.

    `correct` maps trace ids of labelled tasks to whether the pipeline's answer was right."""
    since = _micros(canary.started_at)
    rows = client.query(ROOTS_SQL, parameters={"pipeline": spec.pipeline, "since": since, "base": canary.base_version,
                                               "canary": canary.version}).result_rows
    window = max(1, int((datetime.now(UTC) - canary.started_at).total_seconds()) + 1)
    costs: dict[str, float] = {}
    try:
        frame = cost_per_request(client, since=window, pipeline=spec.pipeline, limit=1_000_000)
        costs = dict(zip(frame["trace_id"].to_list(), frame["cost"].to_list(), strict=True))
    except PricesError:
        pass  # no price table yet: cost is not compared
    samples: dict[int, dict] = {v: {"d": [], "c": [], "e": 0, "ok": 0, "n": 0}
                                for v in (canary.base_version, canary.version)}
    for trace_id, version, duration_ms, failed in rows:
        arm = samples[int(version)]
        arm["d"].append(float(duration_ms))
        cost = costs.get(trace_id)
        arm["c"].append(float("nan") if cost is None else float(cost))
        arm["e"] += bool(failed)
        if correct and trace_id in correct:
            arm["n"] += 1
            arm["ok"] += correct[trace_id]
    base, trial = (Arm.of(s["d"], s["c"], s["e"], s["ok"], s["n"]) for s in
                   (samples[canary.base_version], samples[canary.version]))
    return base, trial

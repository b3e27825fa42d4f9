"""Tuning policies for caching, routing, the cascade and concurrency, and the guardrail on every change:
what the analyzer measured in, proposed knob values and their predicted effect out (batching is
`tuner/batching.py`; both return a `tuner/proposal.py` Proposal).

Pure functions over numbers (no store, no clock); `tuner/loop.py` feeds them one observation window and
guards what they propose (`clamp_change`, cooldown, canary). The models, and why each is good enough:

- Caching: repeats within the window are what a cache could hit; TTL covers the window, never past the
  staleness limit, entries = distinct inputs per TTL * 1.5. Hit ratio ~ duplicate rate * TTL / window.
- Routing: a linear programme (cost and accuracy are linear in the weights) over each route's Wilson
  lower bound (one-sided 95%), so a lucky small sample cannot buy a cheap route traffic.
- Cascade: quality(t) = mean over labelled tasks of (local correct if confidence >= t else remote
  accuracy), read off the data; its Wilson lower bound must hold the floor at the cheapest t. Its latency:
  the pipeline's quantile at escalation share s solves s * F_escalated(x) + (1 - s) * F_local(x) = q on the
  window's end-to-end latencies of escalated and local tasks (escalated per remote route, mixed by the
  route weights). The escalated tasks keep the latency they had at today's share, so the relief fewer calls
  bring a rate-limited provider is left out: conservative when escalations go down.
- Concurrency: a provider answering 429 takes ~L calls at once, so at C a share ~1 - L/C fails; halving
  is the TCP-like answer, and +1 steps back only after 200 calls without a 429.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tracetune.tuner.config import Knob, KnobValue
from tracetune.tuner.proposal import Proposal, int_bounds

__all__ = ["CascadeSample", "RouteStats", "TaskLatencies", "caching_policy", "cascade_policy", "clamp_change",
           "concurrency_policy", "escalation_quantiles", "local_route_floor", "mixture_quantile", "routing_policy",
           "tiers_on_escalated", "wilson_lower"]

Z_95 = 1.645  # one-sided 95%: the conservative bounds on accuracy
Z_99 = 2.326  # one-sided 99%: what a cost cut must clear (hysteresis: holding takes less than moving)


def _linprog():
    from scipy.optimize import linprog

    return linprog


# ---- caching -------------------------------------------------------------------------------------

def caching_policy(requests: int, repeats: int, hits: int, current: Mapping[str, KnobValue], knobs: Mapping[str, Knob],
                   staleness_limit_seconds: float, distinct_keys: int, window_seconds: float,
                   min_repeat_share: float = 0.05, step: str = "", *, min_requests: int = 50,
                   headroom: float = 1.5) -> Proposal | None:
    """Cache on (TTL, size) when the duplicate rate is material, off when it is negligible and nothing hits.

    `repeats` = requests whose input was already seen in the window. Predicted: the hit ratio.
    """
    enabled_knob = knobs.get("cache_enabled")
    if enabled_knob is None or requests < max(1, min_requests) or window_seconds <= 0:
        return None
    ttl_knob, entries_knob = knobs.get("cache_ttl_seconds"), knobs.get("cache_max_entries")
    enabled = bool(current.get("cache_enabled", enabled_knob.default))
    duplicate = max(0.0, min(1.0, repeats / requests))
    hit_ratio = max(0.0, min(1.0, hits / requests))
    negligible = min_repeat_share / 5
    if staleness_limit_seconds <= 0 or (duplicate < negligible and hit_ratio < negligible):
        if not enabled:
            return None
        why = ("the staleness limit is 0 s: no answer may be served from a cache" if staleness_limit_seconds <= 0
               else f"{duplicate:.1%} of {requests} requests repeat an input and {hit_ratio:.1%} hit the cache "
                    f"(< {negligible:.0%})")
        return Proposal(step, {"cache_enabled": False}, f"{why}: cache off", {"hit_ratio": 0.0,
                                                                             "duplicate_rate": duplicate})
    if duplicate < min_repeat_share:
        return None
    values: dict[str, KnobValue] = {}
    if not enabled:
        values["cache_enabled"] = True
    ttl = float(current.get("cache_ttl_seconds", ttl_knob.default)) if ttl_knob else window_seconds
    if ttl_knob is not None:
        # Up to what the window shows repeats over; never shorter than now for that reason alone (repeats
        # further apart than the window cannot be seen in it): shorter only for the staleness limit.
        wanted = min(staleness_limit_seconds, ttl_knob.high if ttl_knob.high is not None else math.inf,
                     max(ttl, window_seconds))
        wanted = max(wanted, ttl_knob.low or 0.0)
        if ttl > staleness_limit_seconds or abs(wanted - ttl) > 0.1 * max(ttl, 1e-9):
            values["cache_ttl_seconds"] = ttl = float(wanted)
    entries_now = int(current.get("cache_max_entries", entries_knob.default)) if entries_knob else 0
    entries = entries_now
    # The distinct inputs one TTL sees: the window's, scaled to the TTL (new inputs keep arriving), with headroom.
    needed = max(1, math.ceil(headroom * max(distinct_keys, 1) * ttl / window_seconds))
    if entries_knob is not None:
        low, high = int_bounds(entries_knob)
        needed = max(low, min(high, needed))
        if entries_now < needed or entries_now > 4 * needed:
            values["cache_max_entries"] = entries = needed
    if not values:
        return None
    coverage = min(1.0, ttl / window_seconds) * (min(1.0, entries * headroom / needed) if entries_knob else 1.0)
    predicted_hits = duplicate * coverage
    reason = (f"{duplicate:.1%} of {requests} requests in {window_seconds:g} s repeat an input "
              f"(>= {min_repeat_share:.0%}), {hit_ratio:.1%} hit now: cache {'stays on' if enabled else 'on'}, "
              f"TTL {ttl:g} s (staleness limit "
              f"{staleness_limit_seconds:g} s), {entries} entries for {distinct_keys} distinct inputs; "
              f"predicted hit ratio {predicted_hits:.1%}")
    return Proposal(step, values, reason, {"hit_ratio": predicted_hits, "duplicate_rate": duplicate})


# ---- routing and cascade -------------------------------------------------------------------------

@dataclass(frozen=True)
class RouteStats:
    """One route of a step over the window: traffic, labelled accuracy, compute cost and latency."""

    route: str
    requests: int
    correct: int  # labelled requests answered correctly (ground truth or user feedback)
    labelled: int
    compute_cost_per_request: float  # USD
    p95_ms: float | None = None


def wilson_lower(successes: float, n: float, z: float = Z_95) -> float:
    """Wilson score lower bound of a proportion: conservative on small samples, exact enough on large."""
    if n <= 0:
        return 0.0
    p = min(1.0, max(0.0, successes / n))
    denominator = 1 + z * z / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / denominator)


TAIL_SHARE = 0.05  # the tasks a p95 target lets be slower than it
TAIL_MARGIN = 0.8  # of which the routes of one step may use this much


def slow_weight_cap(step_share: float) -> float:
    """The most weight routes slower than the p95 target may have on a step that `step_share` of tasks go
    through (a cascade: the escalations): their tasks must stay within the tail a p95 target allows."""
    return 1.0 if step_share <= 0 else min(1.0, TAIL_MARGIN * TAIL_SHARE / step_share)


def routing_policy(routes: Sequence[RouteStats], current: Mapping[str, float], knob: Knob, quality_floor: float | None,
                   p95_target_ms: float | None = None, min_labelled: int = 30, max_shift: float = 0.25,
                   step: str = "", *, min_move: float = 0.01, z: float = Z_95,
                   slow_cap: float | None = None) -> Proposal | None:
    """Weights minimising cost per request subject to the labelled routes' accuracy (lower bound) >= floor.

    Routes with fewer than `min_labelled` labels keep their weight; at most `max_shift` of the traffic moves
    per decision. Routes slower than the p95 target are not increased — or, with `slow_cap` (a step only
    some tasks reach, e.g. a cascade), may hold at most that much weight together, unless every route is
    slow (then latency is not routing's to fix). If no mix reaches the floor, weight moves toward accuracy
    (quality first).
    """
    names = list(knob.default) if isinstance(knob.default, dict) else list(current)
    stats = {r.route: r for r in routes}
    weights_now = np.array([max(0.0, float(current.get(n, 0.0))) for n in names])
    if weights_now.sum() <= 0:
        weights_now = np.array([float(knob.default.get(n, 0.0)) if isinstance(knob.default, dict) else 1.0
                                for n in names])
    if len(names) < 2 or weights_now.sum() <= 0:
        return None
    weights_now = weights_now / weights_now.sum()
    known = np.array([n in stats and stats[n].labelled >= min_labelled for n in names])
    if known.sum() < 1:
        return None
    cost = np.array([stats[n].compute_cost_per_request if n in stats else 0.0 for n in names])
    accuracy = np.array([stats[n].correct / stats[n].labelled if known[i] else 0.0 for i, n in enumerate(names)])
    lower = np.array([wilson_lower(stats[n].correct, stats[n].labelled, z) if known[i] else 0.0
                      for i, n in enumerate(names)])
    slow = np.array([p95_target_ms is not None and n in stats and stats[n].p95_ms is not None
                     and stats[n].p95_ms > p95_target_ms for n in names])
    capped = slow_cap is not None and bool(slow[known].any()) and not bool(slow[known].all())
    if slow_cap is not None and not capped:
        slow = np.zeros(len(names), dtype=bool)  # all slow or none: latency is not routing's to fix here
    # A route with too few labels gains no weight, but may lose it to labelled routes that hold the floor
    # by themselves (no need to know a route's accuracy to stop paying for it).
    bounds = [(0.0, w) if not known[i] else (0.0, w) if slow[i] and not capped else (0.0, 1.0)
              for i, w in enumerate(weights_now)]
    equal = (np.ones((1, len(names))), [1.0])
    # The slow routes' tasks must fit in the tail the p95 target allows (weight held on unlabelled ones counts).
    cap = ([slow.astype(float)], [max(float(slow_cap), float(weights_now[slow & ~known].sum()))]) if capped \
        else ([], [])
    rows, limits = list(cap[0]), list(cap[1])
    if quality_floor is not None:  # the labelled routes' mix must average >= floor (unlabelled ones are held)
        rows.append(np.where(known, quality_floor - lower, 0.0))
        limits.append(0.0)
    solved = _linprog()(cost, A_ub=np.array(rows) if rows else None, b_ub=limits or None, A_eq=equal[0],
                     b_eq=equal[1], bounds=bounds, method="highs")
    target = solved.x if solved.success else None
    quality_first = target is None
    held_mass = float(weights_now[known].sum())
    if quality_first and quality_floor is not None and held_mass > 0 \
            and float(accuracy[known] @ weights_now[known]) / held_mass >= quality_floor:
        return None  # the labels are too few to prove the floor, but the current mix meets it: hold
    if quality_first:
        # Toward accuracy only on a difference the labels can tell: some route's lower bound above the
        # current mix's accuracy (0.883 against 0.896 on a few hundred labels is no reason to move).
        now_point = float(accuracy[known] @ weights_now[known]) / held_mass if held_mass > 0 else 0.0
        if not (lower[known] > now_point).any():
            return None
        solved = _linprog()(-lower + 1e-9 * cost, A_ub=np.array(cap[0]) if capped else None,
                         b_ub=cap[1] or None, A_eq=equal[0], b_eq=equal[1], bounds=bounds, method="highs")
        if not solved.success:
            return None
        target = solved.x
    target = np.clip(target, 0, None)
    moved = 0.5 * float(np.abs(target - weights_now).sum())
    if moved < min_move:
        return None
    weights = weights_now + min(1.0, max_shift / moved) * (target - weights_now)
    weights = np.clip(weights, 0, None) / np.clip(weights, 0, None).sum()
    new = {n: float(w) for n, w in zip(names, weights, strict=True)}

    def mix(values: np.ndarray, w: np.ndarray) -> float:
        mass = float(w[known].sum())
        return float(values[known] @ w[known]) / mass if mass > 0 else math.nan

    before = 1000 * float(cost @ weights_now)
    after = 1000 * float(cost @ weights)
    changes = ", ".join(f"{n} {weights_now[i]:.2f}->{weights[i]:.2f} ({1000 * cost[i]:.3g} USD/1k"
                        + (f", accuracy >= {lower[i]:.3f} of {stats[n].labelled}" if known[i] else ", too few labels")
                        + (", over p95 target" if slow[i] else "") + ")"
                        for i, n in enumerate(names) if abs(weights[i] - weights_now[i]) >= 5e-4)
    floor_text = f"floor {quality_floor:.3f}" if quality_floor is not None else "no quality floor"
    if quality_first:
        why = f"no labelled mix reaches the {floor_text}: toward accuracy"
    else:
        why = f"cheapest mix holding the {floor_text}"
    reason = (f"{why}, moving {min(moved, max_shift):.2f} of traffic: {changes}; cost {before:.3g} -> {after:.3g} "
              f"USD per 1k, labelled quality >= {mix(lower, weights):.3f} (point {mix(accuracy, weights):.3f})")
    predicted = {"cost_per_1k": after, "cost_per_1k_before": before, "quality": mix(accuracy, weights),
                 "quality_before": mix(accuracy, weights_now), "quality_lower_bound": mix(lower, weights)}
    return Proposal(step, {"route_weights": new}, reason, {k: v for k, v in predicted.items() if math.isfinite(v)})


@dataclass(frozen=True)
class CascadeSample:
    """One task that went through the local model step: its confidence and, if labelled, who was right."""

    confidence: float
    local_correct: bool | None  # None when unlabelled
    remote_correct: bool | None = None  # known for tasks that were escalated and labelled
    route: str = ""  # the local step's route that answered ("" when not known)
    tier: str = ""  # the remote route it was escalated to, if known
    recent: bool = True  # in the observation's window (False: pooled from the longer label window)


def escalation_shares(samples: Sequence[CascadeSample], threshold: float, min_samples: int = 30) -> dict[str, float]:
    """Per route of a cascade's local step, the share of its answers a `threshold` escalates (routes with at
    least `min_samples` samples): what choosing that route costs downstream."""
    counts: dict[str, list[int]] = {}
    for s in samples:
        if s.route:
            seen = counts.setdefault(s.route, [0, 0])
            seen[0] += s.confidence < threshold
            seen[1] += 1
    return {route: low / n for route, (low, n) in counts.items() if n >= min_samples}


def tiers_on_escalated(stats: Sequence[RouteStats], samples: Sequence[CascadeSample],
                        threshold: float) -> list[RouteStats]:
    """A cascade's tiers judged on the answers they gave the tasks `threshold` escalates (the samples naming
    their tier), not on all their labelled answers: a lower threshold escalates only the hard questions, which a
    small tier answers far worse than the easy ones a high threshold adds. A tier with no such sample keeps no
    labels, so it gains no weight (`routing_policy`); with no sample naming a tier, the stats as they are. The
    same answers `cascade_tiers_policy` judges a tier on (`_remote_answers`), at one threshold."""
    named = [s for s in samples if s.tier and s.remote_correct is not None and s.confidence < threshold]
    if not named:
        return list(stats)
    counted = {r.route: _remote_answers(named, r.route) for r in stats}
    return [replace(r, labelled=int(counted[r.route][0][-1]), correct=int(counted[r.route][1][-1])) for r in stats]


def cascade_route_floor(samples: Sequence[CascadeSample], threshold: float, quality_floor: float | None,
                        ) -> float | None:
    """The accuracy a cascade's escalated answers need for the *pipeline* to hold `quality_floor` at `threshold`.

    (floor x labelled tasks - right answers kept locally) / labelled escalations, within [0, 1]: the answers
    kept locally already carry part of the floor. The floor itself without labelled escalations."""
    if quality_floor is None:
        return None
    labelled = [s for s in samples if s.local_correct is not None]
    escalated = sum(1 for s in labelled if s.confidence < threshold)
    if not escalated:
        return quality_floor
    kept = sum(1 for s in labelled if s.confidence >= threshold and s.local_correct)
    return min(1.0, max(0.0, (quality_floor * len(labelled) - kept) / escalated))


def local_route_floor(mix_lower: float, quality: float | None, labelled: int, quality_floor: float | None,
                      kept_share: float, z: float = Z_95) -> float | None:
    """The accuracy (lower bound) the model step a cascade reads may hold its routes to, from the *pipeline's*
    quality and floor: the step's answers are only the kept share of the pipeline's.

    Pipeline quality beyond doubt above the floor: the step may lose (lower bound - floor) / kept share;
    beyond doubt under it: it must gain (floor - quality) / kept share; within the noise of the floor, or
    without labels: hold the accuracy it has (`mix_lower`, the current mix's lower bound)."""
    if quality_floor is None:
        return None
    if quality is None or labelled <= 0 or kept_share <= 0:
        return mix_lower
    low = wilson_lower(quality * labelled, labelled, z)
    high = 1 - wilson_lower((1 - quality) * labelled, labelled, z)
    if low >= quality_floor:
        return max(0.0, mix_lower - (low - quality_floor) / kept_share)
    if high < quality_floor:
        return min(1.0, mix_lower + (quality_floor - quality) / kept_share)
    return mix_lower


@dataclass(frozen=True)
class TaskLatencies:
    """One window's end-to-end task latencies (ms) with and without a cascade's escalation: what the pipeline's
    latency at another escalation share is read off. Without: the tasks kept local, and the escalated ones less
    the time the cascade step took (the rest of the pipeline runs either way), so a cascade escalating nearly
    everything still shows what a local answer takes."""

    local_ms: Sequence[float]
    escalated_ms: Mapping[str, Sequence[float]]  # remote route -> latencies of the tasks escalated to it


def mixture_quantile(parts: Sequence[tuple[float, Sequence[float]]], q: float) -> float:
    """The q-quantile of a mixture of empirical distributions (weight, samples): the smallest sample x with
    sum_i w_i F_i(x) >= q, weights normalised. NaN when a part with weight has no samples."""
    rows = np.array([[max(0.0, float(w)) for w, _ in parts]])
    return float(_mixture_quantiles([v for _, v in parts], rows, [q])[q][0])


def _mixture_quantiles(samples: Sequence[Sequence[float]], rows: np.ndarray, qs: Sequence[float],
                       ) -> dict[float, np.ndarray]:
    """Quantiles of several mixtures of the same parts, one mixture per row of weights (a column per part):
    each solves sum_i w_i F_i(x) = q on the parts' empirical CDFs. NaN where a weighted part has no samples."""
    ordered = [np.sort(np.asarray(v, dtype=float)) for v in samples]
    out = {q: np.full(len(rows), math.nan) for q in qs}
    if not any(len(v) for v in ordered):
        return out
    values = np.unique(np.concatenate(ordered))
    cdfs = np.array([np.searchsorted(v, values, side="right") / len(v) if len(v) else np.zeros(len(values))
                     for v in ordered])
    for r, row in enumerate(np.asarray(rows, dtype=float)):
        if row.sum() <= 0 or any(w > 0 and not len(v) for w, v in zip(row, ordered, strict=True)):
            continue
        mixed = (row / row.sum()) @ cdfs
        for q in qs:
            out[q][r] = values[min(len(values) - 1, int(np.searchsorted(mixed, q - 1e-12, side="left")))]
    return out


def escalation_quantiles(latency: TaskLatencies, shares: Sequence[float], route_weights: Mapping[str, float] | None,
                         qs: Sequence[float] = (0.95,), min_samples: int = 30) -> dict[float, np.ndarray]:
    """The pipeline's latency quantiles (ms) at each escalation share: the mixture of the local tasks' latencies
    (weight 1 - s) and the escalated tasks', per remote route by `route_weights` (None: as observed) (weight
    s). NaN where a part that weighs has fewer than `min_samples` tasks (no evidence to predict from).

    Conservative for fewer escalations: escalated tasks keep the latency queueing gave them at today's share."""
    routes = {r: v for r, v in latency.escalated_ms.items() if len(v)}
    if route_weights:
        mass = sum(max(0.0, float(w)) for w in route_weights.values())
        tiers = {r: max(0.0, float(w)) / mass for r, w in route_weights.items()} if mass > 0 else {}
    else:
        total = sum(len(v) for v in routes.values())
        tiers = {r: len(v) / total for r, v in routes.items()} if total else {}
    names = [r for r, w in tiers.items() if w > 0]
    parts = [latency.local_ms] + [routes.get(r, ()) for r in names]
    rows = np.clip(np.array([[1 - s] + [s * tiers[r] for r in names] for s in shares], dtype=float), 0.0, None)
    found = _mixture_quantiles(parts, rows, qs)
    counts = [len(p) for p in parts]
    for i, row in enumerate(rows):
        if any(w > 1e-12 and n < min_samples for w, n in zip(row, counts, strict=True)):
            for q in qs:
                found[q][i] = math.nan
    return found


def _cascade_lower(kept_correct: float, escalated: int, n: int, remote_point: float, remote_n: int,
                   z: float, measured_correct: float = 0.0, measured: int = 0) -> float:
    """Lower bound of a cascade's quality on `n` labelled tasks when `escalated` of them go to the remote tiers
    and the rest keep their local answer (`kept_correct` right). Of the escalated, `measured` have the remote
    answer labelled (`measured_correct` right: those tasks' own answers); the others are right at
    `remote_point`, measured on `remote_n` labelled escalations (0: given exactly). Each part's Wilson margin at
    its own count, at its share of the tasks, added in quadrature. With nothing escalated, the Wilson bound of
    the local answers; with everything measured, that of the remote ones."""
    kept, guessed = n - escalated, escalated - measured
    point = (kept_correct + measured_correct + remote_point * guessed) / n
    local = kept / n * (kept_correct / kept - wilson_lower(kept_correct, kept, z)) if kept else 0.0
    known = measured / n * (measured_correct / measured - wilson_lower(measured_correct, measured, z)) \
        if measured else 0.0
    remote = guessed / n * (remote_point - wilson_lower(remote_point * remote_n, remote_n, z)) if remote_n else 0.0
    return max(0.0, point - math.sqrt(local * local + known * known + remote * remote))


def _remote_answers(order: Sequence[CascadeSample], tier: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Over labelled samples in rising confidence, for each i: how many of the first i carry a labelled remote
    answer (from `tier`, or any tier) and how many of those were right. The first i are what a threshold at the
    (i+1)th confidence escalates: its tasks judged on the answers they were given."""
    mine = [s.remote_correct is not None and (tier is None or s.tier == tier) for s in order]
    right = [m and bool(s.remote_correct) for m, s in zip(mine, order, strict=True)]
    return np.concatenate([[0], np.cumsum(mine)]), np.concatenate([[0], np.cumsum(right)])


def quantile_name(q: float) -> str:
    """The figure name of a latency quantile: 0.95 -> "p95_ms"."""
    return f"p{100 * q:g}_ms"


def cascade_policy(samples: Sequence[CascadeSample], current_threshold: float, knob: Knob, quality_floor: float | None,
                   remote_cost_per_call: float, remote_accuracy: float | None = None, min_labelled: int = 50,
                   max_step: float = 0.1, step: str = "", *, grid: float = 0.01, min_remote_labelled: int = 10,
                   z: float = Z_95, escalation_cap: float | None = None, z_cut: float = Z_99,
                   latency: TaskLatencies | None = None, latency_targets: Mapping[float, float] | None = None,
                   route_weights: Mapping[str, float] | None = None, latency_margin: float = TAIL_MARGIN,
                   quality_missed: bool = False) -> Proposal | None:
    """The cheapest escalation threshold whose predicted quality (lower bound) holds the floor.

    Without `remote_accuracy` it is the Wilson lower bound of the labelled escalations. None with too few
    labels or no change; moves at most `max_step`; with no threshold meeting the floor, up (quality first) once
    the threshold in force misses it beyond the labels' noise (its upper bound at `z` is under the floor), or
    on its point estimate when `quality_missed` (the pipeline's quality is under the floor beyond doubt).
    Hysteresis: while the current threshold holds the floor (at `z`), a cheaper one must hold it at the
    stricter `z_cut`, and none moves up; so noise in the labels does not walk the threshold up and down.
    `escalation_cap`: the most tasks that may escalate when escalated tasks are slower than the p95 target
    allows (their share must fit in the tail); thresholds above it count as infeasible unless none holds
    the floor under it (quality first).
    `latency` and `latency_targets` (quantile -> ms, e.g. {0.95: 2000}; given while one is missed; in place of
    `escalation_cap` when the window has the latencies to predict from): thresholds
    whose predicted pipeline quantiles (`escalation_quantiles`, judged at 1 - `latency_margin` * (1 - q), p96
    for a p95 target, the margin the tail leaves routes) miss a target count as infeasible, unless none within
    them holds the floor (quality first); among those meeting both, the cheapest whose 99% bound (`z_cut`) holds
    the floor, as any cheaper move must (so the canary restoring latency carries the saving too), else the most
    accurate (the restoring move goes as far as the latency needs, no further), as far as it is.
    """
    labelled = [s for s in samples if s.local_correct is not None]
    if len(labelled) < min_labelled:
        return None
    if remote_accuracy is None:
        remote = [s.remote_correct for s in samples if s.remote_correct is not None]
        if len(remote) < min_remote_labelled:
            return None
        remote_point, remote_n = sum(remote) / len(remote), len(remote)
    else:
        remote_point, remote_n = float(remote_accuracy), 0  # given, not measured: no margin
    low = knob.low if knob.low is not None else 0.0
    high = knob.high if knob.high is not None else 1.0
    thresholds = np.round(np.arange(low, high + grid / 2, grid), 6)
    every = np.sort(np.array([s.confidence for s in samples], dtype=float))
    escalated = np.searchsorted(every, thresholds, side="left") / len(every)
    order = sorted(labelled, key=lambda s: s.confidence)
    confidence = np.array([s.confidence for s in order], dtype=float)
    kept_correct = np.concatenate([[0], np.cumsum([bool(s.local_correct) for s in order][::-1])])[::-1]
    below = np.searchsorted(confidence, thresholds, side="left")  # labelled tasks escalated at each t
    n = len(order)
    # The least sure tasks escalated first: those escalated now carry their remote answer, and a threshold
    # escalating only them is judged on those answers, not on the tiers' mean. The questions a lower threshold
    # still escalates are the hard ones, which the tiers answer worse than the ones a high threshold adds.
    measured, measured_right = _remote_answers(order) if remote_accuracy is None else \
        (np.zeros(n + 1, dtype=int), np.zeros(n + 1, dtype=int))

    def point_at(i: int) -> float:
        return float((kept_correct[i] + measured_right[i] + remote_point * (i - measured[i])) / n)

    def lower_at(i: int, at_z: float) -> float:
        return _cascade_lower(kept_correct[i], i, n, remote_point, remote_n, at_z, measured_right[i], measured[i])

    lab_now = int(np.searchsorted(confidence, current_threshold, side="left"))  # labelled tasks escalated now
    # The threshold in force meets the floor on the labels' point estimate (its lower bound may not).
    holds_on_point = quality_floor is not None and point_at(lab_now) >= quality_floor
    # ... or misses it within the labels' noise: its upper bound (at `z`, the lower bound's margin mirrored) holds
    # the floor. A first minute's few hundred labels a point under the floor are no evidence it is missed: going up
    # on them pays for a canary, and for escalations, that the floor does not ask for. Up only beyond doubt.
    # When the pipeline's quality is under the floor beyond doubt (`quality_missed`), the point estimate is enough.
    missed = quality_floor is not None and (2 * point_at(lab_now) - lower_at(lab_now, z) < quality_floor
                                            or (quality_missed and not holds_on_point))
    lower = np.array([lower_at(i, z) for i in below])
    feasible = lower >= quality_floor if quality_floor is not None else np.ones(len(thresholds), dtype=bool)
    points = np.array([point_at(i) for i in below])
    fast = escalated <= escalation_cap + 1e-9 if escalation_cap is not None else np.ones(len(thresholds), dtype=bool)
    quick, judged = None, {}
    if latency is not None and latency_targets:
        # Judged at a stricter quantile than the target's (p96 for p95): the margin routes keep in the tail too.
        judged = {q: 1 - latency_margin * (1 - q) for q in latency_targets}
        at_strict = escalation_quantiles(latency, escalated, route_weights, tuple(judged.values()))
        if all(np.isfinite(at_strict[judged[q]]).any() for q in latency_targets):
            with np.errstate(invalid="ignore"):
                quick = np.logical_and.reduce([at_strict[judged[q]] <= t for q, t in latency_targets.items()])
            fast = quick  # the cap is the special case of the mixture where every escalated task is too slow
    unproven = False
    if quick is not None and not feasible.any() and quality_floor is not None:
        # The labels prove the floor at no threshold (the current one is held while its point estimate meets it):
        # restoring latency, a threshold is held to the same standard, its point estimate at the floor or above.
        if holds_on_point:
            feasible, unproven = points >= quality_floor, True
    limited = escalation_cap is not None or quick is not None
    capped = bool((feasible & fast).any()) and limited
    # Latency over a target and no threshold predicted inside it holds the floor: quality first, the cheapest
    # threshold that holds it (the lowest latency among them).
    nearest = quick is not None and not capped and bool(feasible.any())
    # Under the cap alone (no latency target missed, so no latency model), the pipeline's p95 is inside its target:
    # a threshold in force holding the floor is held to the same standard as any cheaper move (the 99% bound), so
    # the cap does not walk the threshold down to the 95% bound's edge.
    distance = np.abs(thresholds - current_threshold)
    at = int(np.argmin(distance))
    held_by_cap = capped and quick is None and bool(feasible[at])
    if capped:
        feasible = feasible & fast
    reach = distance <= max_step + 1e-9
    share_here = np.searchsorted(every, current_threshold, side="left") / len(every)
    if nearest:
        pick = np.flatnonzero(feasible & reach & (escalated < share_here))
        if not len(pick):
            return None
        best = min(pick, key=lambda i: (escalated[i], distance[i]))
        new = float(thresholds[best])
        why = ("no threshold predicted inside the latency targets holds the floor: the cheapest holding it"
               + (" at its point estimate (no threshold's lower bound does on these labels)" if unproven else "")
               + ", the lowest latency among them")
    elif feasible[at] or held_by_cap:  # (when capped, `feasible` already includes the cap)
        # The current threshold holds the floor: only a cheaper one that holds it beyond the stricter bound.
        strict = np.array([lower_at(i, z_cut) for i in below]) >= (
            quality_floor if quality_floor is not None else -1.0)
        cheaper = (escalated < share_here) & strict & reach & (fast | (not capped))
        if not cheaper.any():
            return None
        pick = np.flatnonzero(cheaper)
        best = min(pick, key=lambda i: (escalated[i], distance[i]))
        new = float(thresholds[best])
        why = "cheapest threshold holding the floor (99% bound)" + (
            f" with at most {escalation_cap:.0%} of tasks escalated (slower than the p95 target allows)"
            if capped and quick is None else "") + (
            " predicted inside the latency targets" if capped and quick is not None else "")
    elif (feasible & reach).any():
        pick = np.flatnonzero(feasible & reach)
        if capped and quick is not None:
            # Restoring latency: the cheapest threshold predicted inside the targets whose 99% bound holds the floor,
            # the standard any cheaper move meets, so the canary restoring latency carries the saving too (one
            # canary, not two); with none proven that far, the most accurate inside them, cheapest among equals.
            inside = (" inside " + " and ".join(
                f"the {t:g} ms {quantile_name(q).removesuffix('_ms')} target" for q, t in latency_targets.items())
                + f" (judged at {', '.join(quantile_name(j).removesuffix('_ms') for j in judged.values())})")
            proven = [i for i in pick if not unproven and quality_floor is not None
                      and lower_at(below[i], z_cut) >= quality_floor]
            if proven:
                best = min(proven, key=lambda i: (escalated[i], distance[i]))
                why = "the cheapest threshold predicted" + inside + " holding the floor (99% bound)"
            else:
                best = max(pick, key=lambda i: (round(points[i], 9), -escalated[i], -distance[i]))
                why = ("the most accurate threshold predicted" + inside + " "
                       + ("whose point estimate holds the floor (no threshold's lower bound does on these labels)"
                          if unproven else "holding the floor"))
        else:
            best = min(pick, key=lambda i: (escalated[i], distance[i]))
            why = "cheapest threshold holding the floor" + (
                f" with at most {escalation_cap:.0%} of tasks escalated (slower than the p95 target allows)"
                if capped and quick is None else "")
            if escalated[best] > share_here and not capped and not missed:
                return None  # up only on evidence the floor is missed: a bound that dips with the labels' noise
                # would walk the threshold up, as moving down takes the stricter bound
        new = float(thresholds[best])
        if escalated[best] == np.searchsorted(every, current_threshold, side="left") / len(every):
            return None  # the same tasks escalate: nothing to gain
    else:
        if feasible.any():
            pick = np.flatnonzero(feasible)
            goal = float(thresholds[min(pick, key=lambda i: (distance[i], escalated[i]))])
            why = "toward the nearest threshold holding the floor"
            if goal > current_threshold and not capped and not missed:
                return None  # (as above: up only once the floor is missed beyond the labels' noise)
        else:
            if not missed:
                return None  # the labels are too few to prove the floor, nor that the threshold in force misses it
            meets = np.flatnonzero(points >= quality_floor) if quality_floor is not None else np.array([], int)
            if len(meets):
                # As far as the floor needs on the labels' point estimates, no further: escalating everything
                # pays for accuracy the floor does not ask for.
                goal = float(thresholds[min(meets, key=lambda i: (escalated[i], distance[i]))])
                why = ("no threshold's lower bound holds the floor: toward the cheapest whose point estimate does, "
                       "quality first")
            else:
                goal = float(thresholds[int(np.argmax(points))])
                why = "no threshold holds the floor: toward the most accurate, quality first"
        new = current_threshold + max(-max_step, min(max_step, goal - current_threshold))
        new = float(min(high, max(low, round(new, 6))))
    if abs(new - current_threshold) < grid / 2:
        return None
    here = int(np.searchsorted(every, new, side="left"))
    lab = int(np.searchsorted(confidence, new, side="left"))
    share_now = float(np.searchsorted(every, current_threshold, side="left") / len(every))
    share = here / len(every)
    quality = point_at(lab)
    quality_lower = lower_at(lab, z)
    floor_text = f">= floor {quality_floor:.3f}" if quality_floor is not None else "(no floor)"
    cost_now, cost = 1000 * share_now * remote_cost_per_call, 1000 * share * remote_cost_per_call
    reason = (f"{why}: threshold {current_threshold:.2f} -> {new:.2f}, escalations {share_now:.0%} -> {share:.0%} "
              f"of {len(every)} tasks at {remote_cost_per_call:.4g} USD/call ({cost_now:.3g} -> {cost:.3g} USD per "
              f"1k), predicted quality {quality:.3f} (lower bound {quality_lower:.3f}) {floor_text} on {n} labelled "
              f"tasks, remote accuracy {remote_point:.3f}")
    predicted = {"escalation_share": share, "escalation_share_before": share_now, "cost_per_1k": cost,
                 "cost_per_1k_before": cost_now, "quality": quality,
                 "quality_before": point_at(lab_now),
                 "quality_lower_bound": quality_lower,
                 # 0: the threshold in force no longer holds the floor at its lower bound (a move up is quality first)
                 "floor_held_before": float(quality_floor is None or lower_at(lab_now, z) >= quality_floor)}
    if quick is not None:
        # The pipeline's quantiles at the new share and, as the model reproduces them, at today's.
        mixed = escalation_quantiles(latency, [share, share_now], route_weights, tuple(latency_targets))
        for q in latency_targets:
            if np.isfinite(mixed[q]).all():
                predicted[quantile_name(q)], predicted[quantile_name(q) + "_before"] = map(float, mixed[q])
        reason += "; predicted " + ", ".join(
            f"{quantile_name(q).removesuffix('_ms')} {predicted[quantile_name(q) + '_before']:.0f} -> "
            f"{predicted[quantile_name(q)]:.0f} ms" for q in latency_targets if quantile_name(q) in predicted) + (
            " (escalated tasks as slow as now: fewer calls queueing less is not counted)")
    return Proposal(step, {"cascade_threshold": new}, reason, predicted)


def _mixes(names: Sequence[str], now: np.ndarray, grow: np.ndarray, max_shift: float, grid: float) -> np.ndarray:
    """Tier mixes on a `grid` of weights within `max_shift` of `now` (half the L1 distance), where only the
    tiers in `grow` may gain weight; `now` itself first."""
    steps = round(1 / grid)
    found = [now]
    def spread(left: int, parts: int) -> list[list[int]]:
        if parts == 1:
            return [[left]]
        return [[k, *rest] for k in range(left + 1) for rest in spread(left - k, parts - 1)]
    for counts in spread(steps, len(names)):
        mix = np.array(counts, dtype=float) / steps
        if 0.5 * float(np.abs(mix - now).sum()) <= max_shift + 1e-9 and np.all(grow | (mix <= now + 1e-9)):
            found.append(mix)
    return np.array(found)


def _threshold_grid(knob: Knob, current: float, max_step: float, grid: float) -> tuple[np.ndarray, int]:
    """The thresholds a joint search tries: the knob's range on a `grid`, within `max_step` of `current`, with
    `current` itself; and where `current` is in them."""
    low = knob.low if knob.low is not None else 0.0
    high = knob.high if knob.high is not None else 1.0
    thresholds = np.round(np.arange(low, high + grid / 2, grid), 6)
    thresholds = np.unique(np.append(thresholds[np.abs(thresholds - current) <= max_step + 1e-9], current))
    return thresholds, int(np.flatnonzero(np.isclose(thresholds, current))[0])


def _kept_below(labelled: Sequence[CascadeSample], thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold, of `labelled` (sorted by confidence): the right answers it keeps (confidence at or above
    it) and the answers it escalates (below it)."""
    confidence = np.array([s.confidence for s in labelled], dtype=float)
    right = np.array([bool(s.local_correct) for s in labelled], dtype=float)
    kept = np.concatenate([np.cumsum(right[::-1])[::-1], [0.0]])  # right answers at or above each position
    below = np.searchsorted(confidence, thresholds, side="left")
    return kept[below], below


def cascade_tiers_policy(samples: Sequence[CascadeSample], tiers: Sequence[RouteStats], current_threshold: float,
                         current_weights: Mapping[str, float], threshold_knob: Knob, weights_knob: Knob,
                         quality_floor: float | None, step: str = "", *, max_step: float = 0.1,
                         max_shift: float = 0.25, min_labelled: int = 50, min_tier_labelled: int = 30,
                         z: float = Z_95, z_cut: float = Z_99, latency: TaskLatencies | None = None,
                         latency_targets: Mapping[float, float] | None = None, latency_margin: float = TAIL_MARGIN,
                         grid: float = 0.01, mix_grid: float = 0.05, min_gain: float = 0.05) -> Proposal | None:
    """A cascade's threshold and remote tiers chosen together: the cheapest pair whose predicted quality holds
    the floor, when it changes the tier mix and costs at least `min_gain` less than the cheapest threshold at
    the mix in force; None otherwise (the threshold and tier policies then move each on its own).

    The two trade against each other: a more accurate tier mix (dearer per escalation) lets a lower threshold
    hold the floor (fewer escalations), which can cost less in all than the cheapest mix at a higher threshold;
    each policy alone, holding the other knob where it is, never finds that. Quality at a pair is the labelled
    answers kept locally plus the escalated ones at the mix's accuracy: each tier's Wilson lower bound on the
    answers it gave the tasks that threshold still escalates, where the samples name their tier (else on all
    its labels; a tier with fewer than `min_tier_labelled` counts as never right and gains no weight), the pair
    held at `z_cut` unless it is the pair in force (held at `z`: holding takes less than moving). With
    `latency` and `latency_targets`, a pair whose predicted pipeline quantiles (judged at the stricter quantile
    the tail leaves, p96 for p95) miss a target is out. The pair in force must hold the floor: a threshold
    that no longer does is quality first, for the threshold policy."""
    if quality_floor is None or not isinstance(weights_knob.default, dict):
        return None
    names = list(weights_knob.default)
    stats = {t.route: t for t in tiers}
    if len(names) < 2 or len(names) > 4:
        return None
    now = np.array([max(0.0, float(current_weights.get(n, 0.0))) for n in names])
    if now.sum() <= 0:
        return None
    now = now / now.sum()
    known = np.array([n in stats and stats[n].labelled >= min_tier_labelled for n in names])
    if known.sum() < 2:
        return None
    labelled = sorted((s for s in samples if s.local_correct is not None), key=lambda s: s.confidence)
    n = len(labelled)
    if n < min_labelled:
        return None
    lower = np.array([wilson_lower(stats[m].correct, stats[m].labelled, z) if known[i] else 0.0
                      for i, m in enumerate(names)])
    strict = np.array([wilson_lower(stats[m].correct, stats[m].labelled, z_cut) if known[i] else 0.0
                       for i, m in enumerate(names)])
    point = np.array([stats[m].correct / stats[m].labelled if m in stats and stats[m].labelled else 0.0
                      for m in names])
    per_call = np.array([stats[m].compute_cost_per_request if m in stats else 0.0 for m in names])
    mixes = _mixes(names, now, known, max_shift, mix_grid)

    thresholds, here = _threshold_grid(threshold_knob, current_threshold, max_step, grid)
    every = np.sort(np.array([s.confidence for s in samples], dtype=float))
    escalated = np.searchsorted(every, thresholds, side="left") / len(every)
    kept, below = _kept_below(labelled, thresholds)

    def bound(successes: np.ndarray, z_: float) -> np.ndarray:
        return np.array([wilson_lower(float(k), n, z_) for k in successes])

    lower, strict, point = (np.tile(a, (len(thresholds), 1)) for a in (lower, strict, point))
    if any(s.tier for s in labelled):
        # Each tier judged on the answers it gave the tasks a threshold still escalates, not on its mean: the
        # least sure tasks are the hard ones for the tiers too. Few such answers make a wide bound, not the mean.
        for k, name in enumerate(names):
            if not known[k]:
                continue
            sent, got = (counts[below] for counts in _remote_answers(labelled, name))
            lower[:, k] = [wilson_lower(float(r), float(m), z) for r, m in zip(got, sent, strict=True)]
            strict[:, k] = [wilson_lower(float(r), float(m), z_cut) for r, m in zip(got, sent, strict=True)]
            point[:, k] = np.where(sent > 0, got / np.maximum(sent, 1), point[0, k])

    judged = {q: 1 - latency_margin * (1 - q) for q in (latency_targets or {})}
    rows = []  # (cost per task, -quality bound, mix index, threshold index)
    for m, mix in enumerate(mixes):
        held = bound(kept + (lower @ mix) * below, z)
        moving = bound(kept + (strict @ mix) * below, z_cut)
        ok = moving >= quality_floor
        if m == 0:
            ok[here] = held[here] >= quality_floor
            if not ok[here]:
                return None  # the pair in force no longer holds the floor: quality first, not a joint move
        if latency is not None and judged:
            quantiles = escalation_quantiles(latency, escalated, dict(zip(names, mix, strict=True)),
                                             tuple(judged.values()))
            with np.errstate(invalid="ignore"):
                ok &= np.logical_and.reduce([quantiles[judged[q]] <= t for q, t in latency_targets.items()])
            if m == 0:
                ok[here] = True  # the pair in force is where any other is measured from
        if m > 0:  # a new mix only with fewer escalations: a dearer per call mix buys a lower threshold
            ok &= escalated < escalated[here]
        cost = escalated * float(per_call @ mix)
        rows += [(float(cost[i]), -float(held[i]), m, i) for i in np.flatnonzero(ok)]
    at_mix_now = [r for r in rows if r[2] == 0]
    best = min(rows)
    if best[2] == 0 or not at_mix_now or best[0] > (1 - min_gain) * min(at_mix_now)[0]:
        return None
    cost_best, _, m, i = best
    mix, new = mixes[m], float(thresholds[i])
    cost_now = float(escalated[here] * (per_call @ now))
    values: dict[str, KnobValue] = {"route_weights": {name: round(float(w), 6) for name, w in zip(names, mix,
                                                                                                   strict=True)}}
    if abs(new - current_threshold) >= grid / 2:
        values["cascade_threshold"] = new
    quality = float((kept[i] + float(point[i] @ mix) * below[i]) / n)
    quality_lower = float(bound(np.array([kept[i] + float(lower[i] @ mix) * below[i]]), z)[0])
    predicted = {"escalation_share": float(escalated[i]), "escalation_share_before": float(escalated[here]),
                 "cost_per_1k": 1000 * cost_best, "cost_per_1k_before": 1000 * cost_now, "quality": quality,
                 "quality_before": float((kept[here] + float(point[here] @ now) * below[here]) / n),
                 "quality_lower_bound": quality_lower, "floor_held_before": 1.0}
    tiers_text = ", ".join(f"{name} {now[k]:.2f}->{mix[k]:.2f}" for k, name in enumerate(names)
                           if abs(mix[k] - now[k]) >= 5e-4)
    reason = (f"threshold and tiers chosen together: threshold {current_threshold:.2f} -> {new:.2f}, {tiers_text} "
              f"(escalated answers right >= {float(lower[i] @ mix):.3f}, {1000 * float(per_call @ mix):.3g} USD per 1k "
              f"calls), escalations {escalated[here]:.0%} -> {escalated[i]:.0%} of {len(every)} tasks: "
              f"{1000 * cost_now:.3g} -> {1000 * cost_best:.3g} USD per 1k, against "
              f"{1000 * min(at_mix_now)[0]:.3g} for the cheapest threshold at the tier mix in force; predicted "
              f"quality {quality:.3f} (lower bound {quality_lower:.3f}) >= floor {quality_floor:.3f} on {n} "
              f"labelled tasks")
    if latency is not None and judged:
        after = escalation_quantiles(latency, [float(escalated[i])], dict(zip(names, mix, strict=True)),
                                     tuple(latency_targets))
        before = escalation_quantiles(latency, [float(escalated[here])], dict(zip(names, now, strict=True)),
                                      tuple(latency_targets))
        for q in latency_targets:
            if math.isfinite(after[q][0]) and math.isfinite(before[q][0]):
                predicted[quantile_name(q)], predicted[quantile_name(q) + "_before"] = after[q][0], before[q][0]
    return Proposal(step, values, reason, predicted)


def local_tiers_policy(samples: Sequence[CascadeSample], local_stats: Sequence[RouteStats],
                       tiers: Sequence[RouteStats], current_local: Mapping[str, float], current_threshold: float,
                       current_tiers: Mapping[str, float], local_knob: Knob, threshold_knob: Knob, tiers_knob: Knob,
                       quality_floor: float | None, local_step: str, step: str, *, max_step: float = 0.1,
                       max_shift: float = 0.25, min_route_labelled: int = 50, min_tier_labelled: int = 30,
                       z: float = Z_95, z_cut: float = Z_99, grid: float = 0.01, mix_grid: float = 0.05,
                       min_gain: float = 0.05, slow: Collection[str] = (), latency: TaskLatencies | None = None,
                       latency_targets: Mapping[float, float] | None = None,
                       latency_margin: float = TAIL_MARGIN) -> tuple[Proposal, Proposal] | None:
    """A cascade's local routes, threshold and remote tiers chosen together: (the local step's proposal, the
    cascade's), when the cheapest triple whose predicted quality holds the floor changes the local mix and costs
    at least `min_gain` less than the cheapest at the local mix in force; None otherwise.

    What a local route is worth to the pipeline is not its own accuracy but what the pipeline answers through it:
    its answers the threshold keeps (right or not, per route, at each threshold) and the escalated ones at the
    tiers' accuracy. A surer, dearer route (a large reranker, cheap beside a hosted LLM) keeps more right answers
    at a low threshold, which lets a cheaper tier mix hold the floor: the routing, threshold and tier policies,
    each holding the others where they are, never find that. Quality at a triple: per local route, its labelled
    answers kept plus its escalated ones at the tier mix's accuracy (each tier's Wilson bound on the answers it
    gave the tasks that threshold escalates, pooled over the local routes), the routes' Wilson margins at their
    weights added in quadrature; held at `z_cut`, the triple in force at `z`. Cost per task: each route's own
    cost plus the share of its answers the threshold escalates times the tier mix's cost per call. Local routes in
    `slow` (over the step's latency target) gain no weight; with `latency` and `latency_targets`, a triple whose
    predicted pipeline quantiles miss a target is out, as in `cascade_tiers_policy`. Every local route needs
    `min_route_labelled` labelled samples, two tiers `min_tier_labelled` labels, and the triple in force must hold
    the floor (else it is quality first, for the other policies)."""
    if quality_floor is None or not isinstance(local_knob.default, dict) or not isinstance(tiers_knob.default, dict):
        return None
    routes, names = list(local_knob.default), list(tiers_knob.default)
    if not 2 <= len(routes) <= 4 or not 2 <= len(names) <= 4:
        return None
    local_cost = {r.route: r.compute_cost_per_request for r in local_stats}
    tier_stats = {t.route: t for t in tiers}
    now_l = np.array([max(0.0, float(current_local.get(r, 0.0))) for r in routes])
    now_t = np.array([max(0.0, float(current_tiers.get(n, 0.0))) for n in names])
    if now_l.sum() <= 0 or now_t.sum() <= 0 or any(r not in local_cost for r in routes):
        return None
    now_l, now_t = now_l / now_l.sum(), now_t / now_t.sum()
    by_route = {r: sorted((s for s in samples if s.route == r and s.local_correct is not None),
                          key=lambda s: s.confidence) for r in routes}
    if any(len(by_route[r]) < min_route_labelled for r in routes):
        return None
    known_t = np.array([n in tier_stats and tier_stats[n].labelled >= min_tier_labelled for n in names])
    if known_t.sum() < 2:
        return None
    thresholds, here = _threshold_grid(threshold_knob, current_threshold, max_step, grid)
    # Per local route and threshold: labelled answers, right ones kept, labelled escalations, escalation share.
    n_l = np.array([len(by_route[r]) for r in routes], dtype=float)
    kept_l, below_l, share_l = [], [], []
    for r in routes:
        kept, below = _kept_below(by_route[r], thresholds)
        every = np.sort(np.array([s.confidence for s in samples if s.route == r], dtype=float))
        kept_l.append(kept)
        below_l.append(below.astype(float))
        share_l.append(np.searchsorted(every, thresholds, side="left") / len(every))
    kept_l, below_l, share_l = np.array(kept_l), np.array(below_l), np.array(share_l)  # (routes, thresholds)
    # Each tier's accuracy on the answers it gave the tasks each threshold escalates, pooled over local routes.
    pooled = sorted((s for s in samples if s.local_correct is not None), key=lambda s: s.confidence)
    cut = np.searchsorted(np.array([s.confidence for s in pooled], dtype=float), thresholds, side="left")
    tier_lower, tier_strict, tier_point = (np.zeros((len(thresholds), len(names))) for _ in range(3))
    for k, name in enumerate(names):
        if not known_t[k]:
            continue
        sent, got = (counts[cut] for counts in _remote_answers(pooled, name))
        if not any(s.tier for s in pooled):  # no sample names its tier: its labels over all its answers
            sent = np.full(len(thresholds), tier_stats[name].labelled)
            got = np.full(len(thresholds), tier_stats[name].correct)
        tier_lower[:, k] = [wilson_lower(float(g), float(m), z) for g, m in zip(got, sent, strict=True)]
        tier_strict[:, k] = [wilson_lower(float(g), float(m), z_cut) for g, m in zip(got, sent, strict=True)]
        tier_point[:, k] = np.where(sent > 0, got / np.maximum(sent, 1), 0.0)
    per_call = np.array([tier_stats[n].compute_cost_per_request if n in tier_stats else 0.0 for n in names])
    own = np.array([local_cost[r] for r in routes])
    local_mixes = _mixes(routes, now_l, np.array([r not in slow for r in routes]), max_shift, mix_grid)
    tier_mixes = _mixes(names, now_t, known_t, max_shift, mix_grid)
    judged = {q: 1 - latency_margin * (1 - q) for q in (latency_targets or {})}

    def quality(mix_l: np.ndarray, accuracy: np.ndarray | float, z_: float) -> tuple[np.ndarray, np.ndarray]:
        """Point and lower bound per threshold, with the escalated answers right at `accuracy` (per threshold,
        or one for all)."""
        per_route = (kept_l + np.broadcast_to(accuracy, thresholds.shape)[None, :] * below_l) / n_l[:, None]
        margins = np.array([[q - wilson_lower(q * n, n, z_) for q in row] for row, n in zip(per_route, n_l,
                                                                                           strict=True)])
        point = mix_l @ per_route
        return point, point - np.sqrt((mix_l[:, None] ** 2 * margins ** 2).sum(axis=0))

    rows = []  # (cost per task, local mix index, tier mix index, threshold index)
    for a, mix_l in enumerate(local_mixes):
        escalated = mix_l @ share_l
        for b, mix_t in enumerate(tier_mixes):
            _, moving = quality(mix_l, tier_strict @ mix_t, z_cut)
            ok = moving >= quality_floor
            if a == 0 and b == 0:
                _, held = quality(mix_l, tier_lower @ mix_t, z)
                if held[here] < quality_floor:
                    return None  # the triple in force no longer holds the floor: quality first, elsewhere
                ok[here] = True
            if latency is not None and judged:
                found = escalation_quantiles(latency, escalated, dict(zip(names, mix_t, strict=True)),
                                             tuple(judged.values()))
                with np.errstate(invalid="ignore"):
                    ok &= np.logical_and.reduce([found[judged[q]] <= t for q, t in latency_targets.items()])
                if a == 0 and b == 0:
                    ok[here] = True
            cost = float(mix_l @ own) + escalated * float(per_call @ mix_t)
            rows += [(float(cost[i]), a, b, int(i)) for i in np.flatnonzero(ok)]
    at_local_now = [r for r in rows if r[1] == 0]
    best = min(rows)
    if best[1] == 0 or not at_local_now or best[0] > (1 - min_gain) * min(at_local_now)[0]:
        return None
    cost_best, a, b, i = best
    mix_l, mix_t, new = local_mixes[a], tier_mixes[b], float(thresholds[i])
    escalated_now, escalated_new = float(now_l @ share_l[:, here]), float(mix_l @ share_l[:, i])
    point_now, _ = quality(now_l, tier_point[here] @ now_t, z)
    point_mid, _ = quality(mix_l, tier_point[here] @ now_t, z)  # the local move alone
    point_new, _ = quality(mix_l, tier_point[i] @ mix_t, z)
    _, lower_new = quality(mix_l, tier_lower[i] @ mix_t, z)
    escalations_now = escalated_now * float(per_call @ now_t)
    escalations_mid = float(mix_l @ share_l[:, here]) * float(per_call @ now_t)  # the local move alone
    escalations_new = escalated_new * float(per_call @ mix_t)
    values: dict[str, KnobValue] = {"route_weights": {n: round(float(w), 6) for n, w in zip(names, mix_t,
                                                                                             strict=True)}}
    if abs(new - current_threshold) >= grid / 2:
        values["cascade_threshold"] = new
    local_values = {"route_weights": {r: round(float(w), 6) for r, w in zip(routes, mix_l, strict=True)}}

    def moved(keys: Sequence[str], before: np.ndarray, after: np.ndarray) -> str:
        return ", ".join(f"{key} {before[k]:.2f}->{after[k]:.2f}" for k, key in enumerate(keys)
                         if abs(after[k] - before[k]) >= 5e-4)
    kept_right = ", ".join(f"{r} keeps {kept_l[k, i] / max(n_l[k] - below_l[k, i], 1):.1%} right of the "
                           f"{1 - share_l[k, i]:.0%} it keeps" for k, r in enumerate(routes))
    threshold_text = f"threshold {current_threshold:.2f} -> {new:.2f}, " if "cascade_threshold" in values else ""
    cost_now = 1000 * (float(now_l @ own) + escalations_now)
    reason = (f"{local_step}'s routes, threshold and tiers chosen together: {local_step} "
              f"{moved(routes, now_l, mix_l)}, {threshold_text}{moved(names, now_t, mix_t)} ({kept_right} at "
              f"{new:.2f}): {cost_now:.3g} -> {1000 * cost_best:.3g} USD per 1k for {local_step} and {step}, against "
              f"{1000 * min(at_local_now)[0]:.3g} for the cheapest at the {local_step} mix in force; predicted "
              f"quality {point_new[i]:.3f} (lower bound {lower_new[i]:.3f}) >= floor {quality_floor:.3f} on "
              f"{int(n_l.sum())} labelled tasks")
    cascade_predicted = {"escalation_share": escalated_new, "escalation_share_before": escalated_now,
                         "cost_per_1k": 1000 * escalations_new, "cost_per_1k_before": 1000 * escalations_mid,
                         "quality": float(point_new[i]), "quality_before": float(point_mid[here]),
                         "quality_lower_bound": float(lower_new[i]), "floor_held_before": 1.0}
    # The pipeline's change of cost and quality split between the two: the local mix's at the threshold and tiers
    # in force (its own cost and the escalations its answers cause), the cascade's the rest; so a move is judged,
    # and a canary rolled back for one objective blames a move, on what each does.
    local_predicted = {"cost_per_1k": 1000 * (float(mix_l @ own) + escalations_mid),
                       "cost_per_1k_before": 1000 * (float(now_l @ own) + escalations_now),
                       "quality": float(point_mid[here]), "quality_before": float(point_now[here])}
    return (Proposal(local_step, local_values, reason, local_predicted),
            Proposal(step, values, f"chosen with {local_step}'s routes (above)", cascade_predicted))


# ---- concurrency and guardrails ------------------------------------------------------------------

def concurrency_policy(current: int, knob: Knob, calls: int, rate_limited: int, timeouts: int = 0,
                       step: str = "", *, max_share: float = 0.01, min_calls: int = 20,
                       calm_calls: int = 200, latency_missed: bool = False,
                       absorbed: bool = False) -> Proposal | None:
    """Halve concurrency to a provider answering 429 (> `max_share` of calls); +1 back toward the default only
    after `calm_calls` calls without a 429 (or timeouts above `max_share`). While the pipeline's p95 is over
    its target (`latency_missed`) it is never lowered (calls waiting for a slot add latency; fewer calls, by
    the cascade and routes, are what restore it) and a lowered limit goes back toward the default. With
    `absorbed` (429s were retried to answers, or the failures stay within the error objective) and latency
    inside its targets, the 429s cost nothing an objective needs: concurrency is not lowered for them."""
    if calls < min_calls:
        return None
    low, high = int_bounds(knob)
    share = rate_limited / calls
    default = int(knob.default) if not isinstance(knob.default, dict) else high
    if latency_missed:
        if current >= min(default, high):
            return None
        new = min(default, high)
        reason = (f"p95 over its target: max_concurrency {current} -> {new} (back to the default; calls waiting "
                  f"for a slot add latency; {rate_limited} of {calls} answered 429)")
        return Proposal(step, {"max_concurrency": new}, reason, {"rate_limited_share": share})
    if share > max_share and not absorbed:
        new = max(low, min(current - 1, math.floor(current * 0.5)))
        if new >= current:
            return None
        limit = current * (1 - share)  # calls the provider took at once, roughly
        predicted = max(0.0, 1 - limit / new)
        reason = (f"{rate_limited} of {calls} calls ({share:.1%}) answered 429 (> {max_share:.0%}): max_concurrency "
                  f"{current} -> {new} (x0.5), the provider took about {limit:.1f} at once")
        return Proposal(step, {"max_concurrency": new}, reason, {"rate_limited_share": predicted})
    if rate_limited == 0 and timeouts <= max_share * calls and calls >= calm_calls and current < min(default, high):
        new = current + 1
        reason = (f"no 429 in {calls} calls ({timeouts} timeouts): max_concurrency {current} -> {new} (+1, back "
                  f"toward the default {default})")
        return Proposal(step, {"max_concurrency": new}, reason, {"rate_limited_share": 0.0})
    return None


def clamp_change(knob: Knob, current: KnobValue, proposed: KnobValue, max_relative: float = 0.5) -> KnobValue:
    """`proposed` kept within the knob's bounds and within +-max_relative of `current` (at least 1 for ints;
    floats at 0 move 1% of the declared range); bools pass; each weight moves at most max_relative, then
    renormalised."""
    if knob.kind == "bool":
        return bool(proposed)
    if knob.kind == "weights":
        now = dict(current) if isinstance(current, dict) else {}
        new = dict(proposed) if isinstance(proposed, dict) else {}
        names = list(knob.default) if isinstance(knob.default, dict) else list(dict.fromkeys([*now, *new]))
        a = _normalised([float(now.get(n, 0.0)) for n in names])
        b = _normalised([float(new.get(n, 0.0)) for n in names])
        moved = [max(0.0, x + max(-max_relative, min(max_relative, y - x))) for x, y in zip(a, b, strict=True)]
        return dict(zip(names, _normalised(moved), strict=True))
    value, now = float(proposed), float(current)
    if knob.kind == "int":
        delta = max(1.0, math.floor(max_relative * abs(now)))
    else:
        span = knob.high - knob.low if knob.low is not None and knob.high is not None else 0.0
        # Relative to the current value; from 0, a step of 1% of the declared range (or of the proposal).
        delta = max_relative * abs(now) if now else (0.01 * span or max_relative * abs(value))
    value = min(now + delta, max(now - delta, value))
    if knob.kind == "int":
        value = round(value)
        low = math.ceil(knob.low) if knob.low is not None else -math.inf
        high = math.floor(knob.high) if knob.high is not None else math.inf
        return int(max(low, min(high, value)))
    low = knob.low if knob.low is not None else -math.inf
    high = knob.high if knob.high is not None else math.inf
    return float(max(low, min(high, value)))


def _normalised(values: Sequence[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values] if total > 0 else [1 / len(values)] * len(values) if values else []

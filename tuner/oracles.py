"""How a tuner is judged in simulation: the oracles it is compared with and the verdict it must pass.

- `search`: the best static config over the whole declared knob space (batching, caches, routes,
  thresholds, concurrency), from the space's corners, by random search then local search around the best,
  hundreds of simulated runs (screened on shorter runs of the same load, the best few run in full): far
  more evaluations than a tuner gets. Chosen on one workload seed and checked on a second (`validated`: the
  cheapest feasible on both); `bench/tuner.py` scores the choice on other seeds (out of sample).
- `per_phase`: the hindsight oracle: for each load phase of the scored workload, the cheapest of the
  candidate configs that meets the objectives in that phase, as if the config switched at each phase's
  start for free (the upper bound for any adaptive controller).
- `verdict`: SLO inside the target in >= 99% of 1-minute windows after warm-up, quality's one-sided 95%
  lower bound (Wilson) at or above the floor, and the cost ratios against the static oracle (last half)
  and the default (whole run).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tracetune.analyzer import SLO
from tracetune.tuner.calibration import Calibration
from tracetune.tuner.config import KnobValue, PipelineSpec
from tracetune.tuner.simarms import perturb, sample, space
from tracetune.tuner.simulate import Arm, Workload, simulate

__all__ = ["Targets", "corners", "feasible", "hindsight", "per_phase", "quality_bound", "search", "shortfall",
           "validated", "verdict"]

Config = dict[str, dict[str, KnobValue]]
Z_95 = 1.6448536269514722  # one-sided 95% (the normal 0.95 quantile)


@dataclass(frozen=True)
class Targets:
    """What the verdict asks: SLO windows, the quality bound, and the two cost ratios."""

    min_windows: float = 0.99
    max_vs_oracle: float = 1.05  # tuner's cost over the last half / the out-of-sample static oracle's
    max_vs_default: float = 0.5  # tuner's cost over the whole run / the default's


def quality_bound(right: float, n: int, z: float = Z_95) -> float:
    """The Wilson score lower bound of a success share of `right` out of `n`."""
    if n <= 0:
        return math.nan
    p = right / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _quality_ok(row: Mapping[str, Any], slo: SLO | None) -> bool:
    floor = slo.quality_floor if slo else None
    if floor is None:
        return True
    n = int(row.get("labelled_after") or 0)
    return n > 0 and quality_bound(row["quality_after"] * n, n) >= floor


def shortfall(row: Mapping[str, Any], slo: SLO | None, targets: Targets = Targets()) -> float:
    """How far a run is from feasible, 0 when it is: the share of SLO windows it lacks (of those required) plus
    the quality bound's shortfall under the floor (of the floor's distance to 1), so a run inside every window
    far under the floor is not "closer" than one at the floor missing a few windows."""
    windows = row.get("slo_windows")
    missing = 1.0 if windows is None or math.isnan(windows) else max(0.0, targets.min_windows - windows)
    gap = missing / targets.min_windows
    floor = slo.quality_floor if slo else None
    if floor is not None and floor < 1:
        n = int(row.get("labelled_after") or 0)
        bound = quality_bound(row["quality_after"] * n, n) if n else 0.0
        gap += max(0.0, floor - bound) / (1 - floor)
    return gap


def feasible(row: Mapping[str, Any], slo: SLO | None, targets: Targets = Targets()) -> bool:
    """Whether a run met the objectives: SLO windows after warm-up and the quality bound."""
    windows = row.get("slo_windows")
    return windows is not None and not math.isnan(windows) and windows >= targets.min_windows and _quality_ok(row, slo)


def corners(spec: PipelineSpec) -> list[Config]:
    """The sensible corners of the knob space a search starts from: every routed step on one route alone (all
    combinations), with every switch (cache on or off) both ways; numbers as declared."""
    configs: list[Config] = [{}]
    for dim in space(spec):
        knob = dim.knob
        if knob.kind == "weights":
            options: list[KnobValue] = [{r: float(r == only) for r in knob.default} for only in knob.default]
        elif knob.kind == "bool":
            options = [False, True]
        else:
            continue
        configs = [{**c, dim.step: {**c.get(dim.step, {}), dim.name: v}} for c in configs for v in options]
    return configs


def _key(config: Mapping[str, Mapping[str, KnobValue]]) -> str:
    """One string per config, whatever the order of its steps and knobs (configs found twice run once)."""
    return repr(sorted((s, sorted(v.items())) for s, v in config.items()))


def search(spec: PipelineSpec, calibration: Calibration, workload: Workload, *, slo: SLO | None,
           evaluations: int = 300, explore: float = 0.25, seed: int = 0, start: Sequence[Mapping] = (),
           screen: Workload | None = None, finalists: int = 20, phases: int = 3,
           progress: Callable[[int, int], None] | None = None, log: list[dict] | None = None,
           **options) -> tuple[dict[str, Any], list[dict]]:
    """The cheapest feasible static config found in `evaluations` simulated runs over the whole knob space:
    the declared defaults, `start` and the space's `corners`, then random draws (`explore` of the budget),
    then local search around the cheapest feasible configs so far (while none is, around the closest: least
    `shortfall`). With `screen` (a shorter run of the same load's shape), those runs are on it, and the
    `finalists` cheapest feasible (else the closest) plus the `phases` cheapest in each phase of `screen` run
    again on `workload`; the answer is the cheapest feasible there. With none feasible, the closest. The rows
    returned are `workload`'s; `log`, when given, receives every row run, screened ones included (`screened`
    says which)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    total = evaluations + (finalists + phases * len(screen.phases or ()) if screen is not None else 0)

    def run(config: Mapping[str, Mapping[str, KnobValue]], on: Workload, into: list[dict]) -> None:
        try:
            row = simulate(spec, calibration, on, Arm("static oracle", "static", config), slo=slo, **options)
        except ValueError:  # a draw the declaration refuses
            return
        row["grid_config"] = {s: dict(v) for s, v in config.items()}
        row["feasible"] = feasible(row, slo)
        into.append(row)
        if log is not None:
            log.append({**row, "screened": on is not workload})
        if progress:
            progress(len(rows) + len(full), total)

    full: list[dict] = []
    first = screen if screen is not None else workload
    for config in [{}, *start, *corners(spec)][:evaluations]:
        run(config, first, rows)
    while len(rows) < int(evaluations * explore):
        run(sample(spec, rng), first, rows)
    while len(rows) < evaluations:
        ok = sorted((r for r in rows if r["feasible"]), key=lambda r: r["cost_per_1k"])[:5]
        parents = ok or sorted(rows, key=lambda r: shortfall(r, slo))[:5]
        run(perturb(spec, rng.choice(parents)["grid_config"], rng, scale=rng.choice((0.1, 0.3, 0.6))), first, rows)
    if screen is not None:
        ok = sorted((r for r in rows if r["feasible"]), key=lambda r: r["cost_per_1k"])
        picks = ok[:finalists] or sorted(rows, key=lambda r: shortfall(r, slo))[:finalists]
        for start_s, end_s in screen.phases or ():
            scored = [(_phase(r, start_s, end_s, slo, 300.0 * screen.duration / workload.duration, Targets()), r)
                      for r in rows]
            picks += [r for (_, good, n), r in sorted(scored, key=lambda x: x[0][0]) if good and n][:phases]
        seen: set[str] = set()
        for row in [{"grid_config": {}}, *picks]:
            key = _key(row["grid_config"])
            if key not in seen:
                seen.add(key)
                run(row["grid_config"], workload, full)
        rows = full
    ok = [r for r in rows if r["feasible"]]
    best = dict(min(ok, key=lambda r: r["cost_per_1k"]) if ok else min(rows, key=lambda r: shortfall(r, slo)))
    return best, rows


def validated(spec: PipelineSpec, calibration: Calibration, rows: Sequence[Mapping[str, Any]], workload: Workload, *,
              slo: SLO | None, limit: int | None = None, **options) -> tuple[dict[str, Any], int]:
    """The cheapest of the search's `rows` feasible on its seed that is feasible on `workload` too (a second seed
    of the same load, neither searched nor scored on), and how many were run there. Of hundreds of configs near
    the floor, the cheapest that cleared it on one seed is the likeliest to have cleared it by luck (the winner's
    curse), and then misses it on the seeds it is scored on: a reference no static config could be relied on to
    meet. The row returned is the search seed's, with `validated` True; with none of the `limit` (default: all)
    cheapest distinct configs feasible on both, the cheapest on the search seed, `validated` False."""
    ok, seen = [], set()
    for row in sorted((r for r in rows if r.get("feasible")), key=lambda r: r["cost_per_1k"]):
        key = _key(row["grid_config"])
        if key not in seen:
            seen.add(key)
            ok.append(row)
    run = 0
    for row in ok[:limit]:
        run += 1
        check = simulate(spec, calibration, workload, Arm("static oracle", "static", row["grid_config"]), slo=slo,
                         **options)
        if feasible(check, slo):
            return {**row, "validated": True}, run
    best = ok[0] if ok else min(rows, key=lambda r: shortfall(r, slo))
    return {**best, "validated": False}, run


def _phase(row: Mapping[str, Any], start: float, end: float, slo: SLO | None, skip_seconds: float,
           targets: Targets) -> tuple[float, bool, int]:
    """Cost per 1k, whether the objectives held, and requests, within one phase of a run (its minutes)."""
    windows = [w for w in row["windows"] if start <= w["minute"] * 60 < end]
    n = sum(w["requests"] for w in windows)
    if not n:
        return math.nan, False, 0
    cost = sum(w["cost_per_1k"] * w["requests"] for w in windows) / n
    judged = [w for w in windows if w["minute"] * 60 >= max(skip_seconds, start)]
    inside = [(slo is None or slo.p95_ms is None or w["p95_ms"] <= slo.p95_ms)
              and (slo is None or slo.p99_ms is None or w["p99_ms"] <= slo.p99_ms) for w in judged]
    right = sum(w["right"] for w in windows)
    quality = slo is None or slo.quality_floor is None or quality_bound(right, n) >= slo.quality_floor
    ok = (not judged or sum(inside) / len(judged) >= targets.min_windows) and quality
    return cost, ok, n


def per_phase(rows: Sequence[Mapping[str, Any]], phases: Sequence[tuple[float, float]], slo: SLO | None,
              skip_seconds: float = 300.0, targets: Targets = Targets()) -> dict[str, Any]:
    """The hindsight per-phase oracle over candidate runs on one workload: each phase's cheapest run that
    meets the objectives in that phase, combined (cost weighted by requests)."""
    total_cost, total_n, picks, ok_all = 0.0, 0, [], True
    for start, end in phases:
        scored = [(_phase(r, start, end, slo, skip_seconds, targets), r) for r in rows]
        ok = [(c, n, r) for (c, good, n), r in scored if good and n]
        if not ok:
            ok_all = False
            ok = [(c, n, r) for (c, _, n), r in scored if n]
        cost, n, row = min(ok, key=lambda x: x[0])
        total_cost += cost * n
        total_n += n
        picks.append({"phase": [start, end], "cost_per_1k": cost, "config": row.get("grid_config")})
    return {"arm": "per-phase oracle", "cost_per_1k": total_cost / total_n if total_n else math.nan,
            "feasible": ok_all, "phases": picks, "requests": total_n}


def hindsight(rows: Sequence[Mapping[str, Any]], slo: SLO | None, targets: Targets = Targets()) -> dict[str, Any]:
    """The hindsight static oracle over candidate runs on one workload: the cheapest over the last half of those
    that met every objective on that workload (`feasible`: SLO windows, the quality bound), chosen after the fact
    on the seed it is scored on. Cheaper than the out-of-sample oracle or as cheap wherever that one holds; where
    it misses an objective on the seed, this is the cheapest static config among the candidates that does not.
    With none feasible, `feasible` False and no cost."""
    ok = [r for r in rows if feasible(r, slo, targets)]
    if not ok:
        return {"arm": "static oracle (hindsight)", "cost_per_1k": math.nan, "cost_per_1k_half": math.nan,
                "feasible": False, "candidates": len(rows)}
    best = min(ok, key=lambda r: r["cost_per_1k_half"])
    return {**best, "arm": "static oracle (hindsight)", "feasible": True, "candidates": len(rows)}


def verdict(tuner: Mapping[str, Any], default: Mapping[str, Any], oracle: Mapping[str, Any], slo: SLO | None,
            targets: Targets = Targets()) -> dict[str, Any]:
    """Whether `tuner`'s run passes: every check with its figure, and `passed` (all of them)."""
    n = int(tuner.get("labelled_after") or 0)
    bound = quality_bound(tuner["quality_after"] * n, n) if n else math.nan
    floor = slo.quality_floor if slo else None
    vs_oracle = tuner["cost_per_1k_half"] / oracle["cost_per_1k_half"] if oracle.get("cost_per_1k_half") else math.nan
    vs_default = tuner["cost_per_1k"] / default["cost_per_1k"] if default.get("cost_per_1k") else math.nan
    checks = {
        "slo_windows": (tuner["slo_windows"], tuner["slo_windows"] >= targets.min_windows),
        "quality_bound": (bound, floor is None or bound >= floor),
        "vs_static_oracle_last_half": (vs_oracle, vs_oracle <= targets.max_vs_oracle),
        "vs_default": (vs_default, vs_default <= targets.max_vs_default),
    }
    return {"checks": {k: {"value": v, "ok": bool(ok)} for k, (v, ok) in checks.items()},
            "passed": all(ok for _, ok in checks.values())}

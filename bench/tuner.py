"""Tuner proof: one workload under the default config, AIMD on batch size, the tuner, and the oracle.

The workload is the demo's: ticket_triage (classify on fp32 / int8, escalation to two LLM tiers, CRM
follow-ups), Poisson arrivals whose rate doubles half-way (LoadPlan pattern "step"), 20% repeated
tickets, the LLM stand-in's latency and 429s. The oracle is the cheapest static config of a grid that
keeps >= 99% of 1-minute windows after minute 5 inside the SLO and quality at the floor.

    .venv/bin/python bench/tuner.py                            # simulation, 60 virtual minutes, ~10 min
    .venv/bin/python bench/tuner.py --minutes 240 --seed 2     # simulated hours
    .venv/bin/python bench/tuner.py --calibrate-from http://default:PASSWORD@127.0.0.1:8123/default
    .venv/bin/python bench/tuner.py --mode real                # real processes (bench/tuner_real.py)
    .venv/bin/python bench/tuner.py --pipelines rag_answering --real-load --frontier f.json   # the trade-off
    .venv/bin/python bench/tuner.py --slo p95_ms=2500,quality_floor=0.85 ...   # other objectives than declared

`--mode sim` (default) runs tracetune.tuner.simulate: a discrete-event simulation in virtual time whose
tuner arm runs the real loop.decide on Observations built from the simulated spans. It prints a table,
ratios and the cost per step before (default) and after (tuner), and writes a chart and the rows as JSON
under --out (default .tracetune/bench/tuner, ignored by git).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# bench/ (on the path because this script lives there) must not shadow anything: the project root goes first.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from tracetune.analyzer import SLO  # noqa: E402
from tracetune.tuner import calibration as physics  # noqa: E402
from tracetune.tuner import simulate  # noqa: E402
from tracetune.tuner.batching import ServiceModel  # noqa: E402
from tracetune.tuner.config import PipelineSpec  # noqa: E402

CANARY_MIN_REQUESTS_FLOOR = 30  # as bench/tuner_real.py: the fewest tasks per arm a canary is judged on
RATE = 20.0  # requests/s before the step; 40 after (the demo's default load, doubled half-way)
DUPLICATES = 0.2
LABELS = {"default": "default (static)", "aimd": "AIMD batch size", "tuner": "tracetune tuner",
          "oracle": "oracle (grid)"}


class UsageError(Exception):
    """Bad input on the command line: one line, exit code 2."""


def demo_spec() -> PipelineSpec:
    """The demo pipeline's declaration, built without loading models or reaching any service."""
    from tracetune.demo import triage

    class Classifier:  # only its labels are read while the pipeline is declared
        labels = ["billing", "login"]

        def predict(self, texts):
            return [("billing", 1.0) for _ in texts]

        def token_lengths(self, texts):
            return [1 for _ in texts]

    class Tier:
        def classifier(self, labels):
            return lambda text: labels[0]

    pipeline = triage.build({variant: Classifier() for variant in triage.VARIANTS},
                            llm={tier: Tier() for tier in triage.LLM_TIERS}, crm_url="http://127.0.0.1:9")
    return pipeline.spec()


def demo_workload(minutes: float, seed: int, rate: float = RATE, duplicates: float = DUPLICATES) -> simulate.Workload:
    """The demo's load generator's arrivals (step pattern: the rate doubles half-way) for `minutes`."""
    from tracetune.demo import load

    plan = load.LoadPlan(rate=rate, duration=minutes * 60, pattern="step", duplicate_ratio=duplicates, seed=seed)
    plan.validate()
    return simulate.Workload(tuple(load.arrivals(plan, random.Random(seed))), minutes * 60, duplicates, seed=seed,
                             phases=((0.0, minutes * 30), (minutes * 30, minutes * 60)))


# ---- the retrieval-augmented pipeline: its declaration and an assumed calibration -----------------

# rag_answering's load: what bench/tuner_real.py drives it with (bench.tuner_real.PIPELINES["rag"]), 2 requests/s
# at the daily mean in 300-second days (0.4x to 1.6x) with two 3x bursts a day: bursts to about 6/s, which its
# declared large tier (5 requests/s) can serve at the quality floor. `--rag-rate` sets another mean (8: the
# overload study, where comparisons alone need the large tier at about 10/s in a burst and no config holds the floor).


def rag_spec() -> PipelineSpec:
    """rag_answering's declaration (demo/rag.py), built without its models, index or LLM clients: the
    knobs each step declares are exactly the shipped pipeline's."""
    from tracetune.demo import rag

    same = lambda items: items
    return rag.build(None, None, {route: same for route in rag.RERANKERS},
                     llm={tier: same for tier in rag.LLM_TIERS}).spec()


def _beta_table(a: float, b: float) -> tuple[float, ...]:
    from scipy.stats import beta

    return tuple(round(float(x), 4) for x in beta.ppf([0.001, *[i / 20 for i in range(1, 20)], 0.999], a, b))


def rag_calibration() -> physics.Calibration:
    """ASSUMED physics for rag_answering, not measured: the embed step is the demo's MiniLM fp32 (measured);
    the rerankers' batch times follow what they run (int8 over 4 titles, ~3 ms; fp32 over 6 titles plus a
    rare-word score, ~12 ms per question); their accuracy and confidence and the tiers' accuracy on escalated
    questions are assumptions (docs/rag.md: comparisons, a quarter of the questions, need the large tier);
    prompts of ~290 tokens (docs/rag.md), answers of ~30."""
    fp32 = physics.DEMO.routes["fp32"]
    return physics.Calibration(
        routes={
            "rerank-small": physics.ModelRoute(ServiceModel(1.0, 3.0, 0.3), 0.72, _beta_table(6, 2),
                                                _beta_table(3, 3), 0.4),
            "rerank-large": physics.ModelRoute(ServiceModel(2.0, 12.0, 0.3), 0.86, _beta_table(9, 1.5),
                                                _beta_table(3, 2.5), 0.4),
        },
        tiers={"llm-small": physics.RemoteTier("standin-small", 300.0, 0.5, 0.80, 20.0, 290, 30),
               "llm-large": physics.RemoteTier("standin-large", 700.0, 0.5, 0.97, 5.0, 290, 30)},
        lengths=physics.DEMO.lengths,
        models={"embed": {"fp32": fp32}},
        plain_ms={"retrieve": 0.3},
        effect_share=0.0,
        source="ASSUMED from rag_answering's declaration (embed: the demo's measured MiniLM fp32; rerankers, "
               "tiers' accuracy on escalated questions: assumptions, not measurements; bench/tuner.py)")


def rag_workload(minutes: float, seed: int, rate: float, duplicates: float = 0.2,
                 period_seconds: float | None = None) -> simulate.Workload:
    """The load generator's `daily_bursts` arrivals with the run as one day (0.4x to 1.6x the rate, two 3x bursts
    of 1/30 of the day, on the rise and past the peak), or days of `period_seconds`; six phases of equal length
    for the per-phase oracle."""
    from tracetune.demo import load

    duration = minutes * 60
    plan = load.LoadPlan(rate=rate, duration=duration, pattern="daily_bursts", duplicate_ratio=duplicates, seed=seed,
                         period_seconds=period_seconds or duration)
    plan.validate()
    phases = tuple((duration * i / 6, duration * (i + 1) / 6) for i in range(6))
    return simulate.Workload(tuple(load.arrivals(plan, random.Random(seed))), duration, duplicates, seed=seed,
                             phases=phases)


def open_source(source: str):
    """A client on the spans at `source`: a bench arm's home kept with --keep (its store started on a free port;
    the process is returned to be stopped) or a ClickHouse URL (process None). UsageError with one line."""
    import clickhouse_connect

    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)  # the failure is reported in one line below
    if Path(source).is_dir():
        try:
            from bench.harness import open_store
        except ImportError:
            from harness import open_store
        try:
            _, proc, client = open_store(source)
        except Exception as exc:  # noqa: BLE001 - a home without a store, or a store that will not start
            raise UsageError(f"--calibrate-from {source}: cannot open its store ({str(exc).splitlines()[0][:200]})"
                             ) from None
        return client, proc
    if "://" not in source:
        raise UsageError(f"--calibrate-from {source}: neither a folder (a bench arm's home) nor a ClickHouse URL")
    try:
        return clickhouse_connect.get_client(dsn=source), None
    except Exception as exc:  # noqa: BLE001 - any connection failure is one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--calibrate-from {source.split('@')[-1]}: cannot connect ({first[:200]})") from None


def calibration_from(source: str, spec: PipelineSpec, window_seconds: int,
                     base: physics.Calibration = physics.DEMO) -> physics.Calibration:
    """A calibration of `spec` fitted from the spans at `source` (`open_source`), with `base` for what spans do
    not show; UsageError with one line if it cannot."""
    client, proc = open_source(source)
    try:
        return physics.fit(client, spec, window_seconds, base=base)
    except ValueError as exc:
        raise UsageError(f"--calibrate-from: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any query failure is one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--calibrate-from {source.split('@')[-1]}: cannot read spans ({first[:200]})") from None
    finally:
        if proc is not None:
            from bench.harness import stop_process

            stop_process(proc)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:,.{digits}f}"


def table(rows: Sequence[Mapping[str, Any]], slo: SLO | None, title: str) -> Table:
    """One row per arm: cost per 1k, p95, p99, SLO windows after minute 5, quality, config changes."""
    out = Table(title=title)
    for name, justify in (("arm", "left"), ("cost / 1k (USD)", "right"), ("last quarter", "right"), ("p95 ms", "right"),
                          ("p99 ms", "right"), ("SLO windows", "right"), ("quality", "right"), ("changes", "right")):
        out.add_column(name, justify=justify)
    floor = slo.quality_floor if slo else None
    for row in rows:
        quality = row.get("quality")
        ok = floor is None or (quality is not None and quality >= floor)
        windows = row.get("slo_windows")
        out.add_row(LABELS.get(row["arm"], row["arm"]), _fmt(row.get("cost_per_1k"), 5),
                    _fmt(row.get("cost_per_1k_late"), 5), _fmt(row.get("p95_ms"), 0),
                    _fmt(row.get("p99_ms"), 0),
                    "—" if windows is None or not math.isfinite(windows) else f"{windows:.1%}",
                    ("" if ok else "[red]") + _fmt(quality, 4), str(row.get("changes", "—")))
    return out


def ratios(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The tuner's cost against the default and the oracle, beside the aims (<= 0.60 and <= 1.10)."""
    by = {r["arm"]: r for r in rows}
    out = Table(title="tuner cost ratios")
    for name in ("ratio", "value", "aim", "met"):
        out.add_column(name, justify="left" if name == "ratio" else "right")
    for figure, when in (("cost_per_1k", "whole run"), ("cost_per_1k_late", "last quarter")):
        tuner = by.get("tuner", {}).get(figure)
        for other, aim in (("default", 0.60), ("oracle", 1.10)):
            base = by.get(other, {}).get(figure)
            if tuner is None or not base or not math.isfinite(tuner) or not math.isfinite(base):
                continue
            value = tuner / base
            out.add_row(f"tuner / {other} ({when})", f"{value:.2f}", f"<= {aim:.2f}",
                        "yes" if value <= aim else "[red]no")
    return out


def breakdown(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Cost per 1k requests by step, before (default) and after (tuner), and the oracle's."""
    by = {r["arm"]: r for r in rows}
    arms = [a for a in ("default", "tuner", "oracle") if a in by]
    out = Table(title="cost per 1k requests by step (USD)")
    out.add_column("step")
    for arm in arms:
        out.add_column(LABELS[arm], justify="right")
    steps = sorted({s for a in arms for s in by[a].get("cost_by_step", {})})
    for step in steps:
        out.add_row(step, *(_fmt(by[a]["cost_by_step"].get(step), 6) for a in arms))
    return out


def chart(rows: Sequence[Mapping[str, Any]], slo: SLO | None, path: Path) -> Path | None:
    """Cost per 1k and p95 per minute for each arm, with the SLO line; None when rows have no per-minute data."""
    if not any(isinstance(r.get("windows"), list) and r["windows"] for r in rows):
        return None  # real rows count their windows; only simulated ones have them minute by minute
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost_ax, p95_ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for row in rows:
        raw = row.get("windows")
        windows = [w for w in raw if isinstance(w, Mapping) and "minute" in w] if isinstance(raw, list) else []
        minutes = [w["minute"] for w in windows]
        label = LABELS.get(row["arm"], row["arm"])
        cost_ax.plot(minutes, [_number(w.get("cost_per_1k")) for w in windows], label=label)
        p95_ax.plot(minutes, [_number(w.get("p95_ms")) for w in windows], label=label)
    if slo is not None and slo.p95_ms is not None:
        p95_ax.axhline(slo.p95_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p95 {slo.p95_ms:g} ms")
    cost_ax.set_ylabel("cost per 1k requests (USD)")
    p95_ax.set_ylabel("p95 per minute (ms)")
    p95_ax.set_xlabel("minute")
    cost_ax.legend(loc="upper right", fontsize=8)
    p95_ax.legend(loc="upper right", fontsize=8)
    cost_ax.set_title("ticket_triage: the same workload under four controllers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(console: Console, rows: Sequence[Mapping[str, Any]], slo: SLO | None, out: Path, mode: str,
           note: str) -> None:
    """Print the tables and write the chart and the rows (JSON) under `out`."""
    console.print(table(rows, slo, f"{mode}: {note}"))
    console.print(ratios(rows))
    console.print(breakdown(rows))
    by = {r["arm"]: r for r in rows}
    for arm in ("tuner", "oracle"):
        if arm in by and by[arm].get("config"):
            console.print(f"[bold]{LABELS[arm]}[/] final config: {json.dumps(_rounded(by[arm]['config']))}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tuner-{mode}.json").write_text(json.dumps(_rounded(list(rows)), indent=1, default=str))
    figure = chart(rows, slo, out / f"tuner-{mode}.png")
    console.print(f"rows: {out / f'tuner-{mode}.json'}" + (f", chart: {figure}" if figure else ""))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


# ---- modes ---------------------------------------------------------------------------------------

SIM_ARMS = ("default", "gateway", "aimd", "optuna", "tuner", "static oracle", "static oracle (one seed)",
            "static oracle (hindsight)", "per-phase oracle")
HINDSIGHT_CANDIDATES = 8  # the cheapest distinct configs feasible on the search seed, run on every scored seed
VALIDATION_OFFSET = 1000  # the static oracle is checked on seed --search-seed + this (neither searched nor scored on)
SIM_LABELS = {"default": "default (declared)", "gateway": "gateway: cheapest route holding the floor",
              "aimd": "AIMD, every numeric knob", "optuna": "Optuna TPE online (canaries)",
              "tuner": "tracetune tuner", "static oracle": "static oracle (out of sample, validated)",
              "static oracle (one seed)": "static oracle, cheapest on the search seed alone",
              "static oracle (hindsight)": "static oracle, hindsight (the cheapest candidate holding every "
                                           "objective on the seed scored)",
              "per-phase oracle": "per-phase oracle (hindsight)"}


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def sim_pipeline(console: Console, name: str, spec: PipelineSpec, calibration: physics.Calibration,
                 workload: Any, seeds: Sequence[int], search_seed: int, evaluations: int,
                 prices: Any = None, partial: Path | None = None, screen: Any = None,
                 settings: Any = None) -> list[dict[str, Any]]:
    """Every arm of one pipeline on each seed: the static oracle searched on `search_seed` (screened on
    `screen(seed)`, a shorter run of the same load, when given), scored on each. `settings`: the loop's
    (LoopSettings) for the arms with a controller, e.g. canary limits sized for the run (`canary_settings`)."""
    from tracetune.tuner.loop import LoopSettings

    settings = settings or LoopSettings()
    from tracetune.analyzer import load_prices
    from tracetune.tuner import oracles, simarms

    slo = SLO(spec.pipeline, **spec.slo)
    prices = prices or load_prices()
    gateway = simarms.gateway_config(spec, calibration, slo, prices)
    with _bar(console) as bar:
        task = bar.add_task(f"{name}: static oracle search on seed {search_seed}", total=evaluations)
        best, tried = oracles.search(spec, calibration, workload(search_seed), slo=slo, evaluations=evaluations,
                                     seed=search_seed, start=[gateway], prices=prices,
                                     screen=screen(search_seed) if screen else None,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    one_seed = best
    validation = search_seed + VALIDATION_OFFSET
    best, checked = oracles.validated(spec, calibration, tried, workload(validation), slo=slo, prices=prices)
    console.print(f"{name}: static oracle ({'feasible' if best['feasible'] else '[red]none feasible, closest[/]'}"
                  f" on seed {search_seed}, {evaluations} runs"
                  + (f" screened on {screen(search_seed).duration / 60:g} virtual minutes, the best {len(tried)} "
                     f"run in full" if screen else "") + f", {sum(r['feasible'] for r in tried)} feasible in full; "
                  f"cost/1k {best['cost_per_1k']:.5f}): {json.dumps(_rounded(best['grid_config']))}")
    console.print(f"{name}: " + (f"the cheapest config feasible on seed {search_seed} and on validation seed "
                                 f"{validation} ({checked} of the cheapest distinct configs on seed {search_seed} "
                                 f"run there)"
                                 + ("" if best['grid_config'] == one_seed['grid_config'] else
                                    f"; the cheapest on seed {search_seed} alone ({one_seed['cost_per_1k']:.5f}) is "
                                    f"scored beside it as 'static oracle (one seed)'")
                                 if best["validated"] else
                                 f"[red]none of the {checked} cheapest feasible on seed {search_seed} is on validation "
                                 f"seed {validation}: the cheapest on seed {search_seed} alone[/]"))
    if partial is not None:  # the config to pin in a real run: bench/tuner_real.py --oracle @FILE
        (partial.parent / f"oracle-{name}.json").write_text(json.dumps(
            {"steps": best["grid_config"], "cost_per_1k": best["cost_per_1k"], "feasible": best["feasible"],
             "search_seed": search_seed, "calibration": calibration.source}, indent=1, default=str))
    if evaluations < 100 or best["grid_config"] == {}:
        console.print(f"[red]{name}: the static oracle had {evaluations} evaluations"
                      + (" and is the declared default itself" if best["grid_config"] == {} else "")
                      + ": a weak comparator, the ratios against it are no evidence (use --evaluations 300)[/]")
    phases = workload(search_seed).phases or ((0.0, workload(search_seed).duration),)
    candidates = {json.dumps(best["grid_config"], sort_keys=True): best["grid_config"]}
    alone = json.dumps(one_seed["grid_config"], sort_keys=True)
    candidates.setdefault(alone, one_seed["grid_config"])
    for start, end in phases:  # per phase, the cheapest configs that held the objectives in it on the search seed
        scored = [(oracles._phase(r, start, end, slo, 300.0, oracles.Targets()), r) for r in tried]
        for _, r in sorted(((c, r) for (c, ok, n), r in scored if ok and n), key=lambda x: x[0])[:4]:
            candidates[json.dumps(r["grid_config"], sort_keys=True)] = r["grid_config"]
    seen = 0  # and the cheapest feasible on the search seed: the hindsight oracle's candidates on each seed
    for r in sorted((r for r in tried if r["feasible"]), key=lambda r: r["cost_per_1k"]):
        key = json.dumps(r["grid_config"], sort_keys=True)
        if key not in candidates and seen < HINDSIGHT_CANDIDATES:
            candidates[key] = r["grid_config"]
            seen += 1
    rows: list[dict[str, Any]] = []
    arms = [simulate.Arm("default"), simulate.Arm("gateway", "static", gateway), simulate.Arm("aimd", "aimd"),
            None, simulate.Arm("tuner", "tuner")]
    with _bar(console) as bar:
        task = bar.add_task(f"{name}: arms x {len(seeds)} seeds", total=len(seeds) * (len(arms) + len(candidates)))
        for seed in seeds:
            w = workload(seed)
            mine = []
            for arm in arms:
                arm = arm or simulate.Arm("optuna", "optuna", seed=seed)
                mine.append(simulate.simulate(spec, calibration, w, arm, slo=slo, seed=seed, prices=prices,
                                              settings=settings))
                bar.advance(task)
                _note(console, name, seed, mine[-1])
            runs = []
            for config in candidates.values():
                row = simulate.simulate(spec, calibration, w, simulate.Arm("static oracle", "static", config),
                                        slo=slo, seed=seed, prices=prices)
                row["grid_config"] = config
                runs.append(row)
                bar.advance(task)
            static = dict(runs[0])
            mine.append(static)
            if alone != next(iter(candidates)):
                mine.append({**runs[list(candidates).index(alone)], "arm": "static oracle (one seed)"})
            hindsight = oracles.hindsight(runs, slo)
            mine.append(hindsight)
            mine.append(oracles.per_phase(runs, w.phases or ((0.0, w.duration),), slo))
            by = {r["arm"]: r for r in mine}
            for row in mine:
                row["seed"], row["pipeline"] = seed, name
                if "slo_windows" in row:
                    row["verdict"] = oracles.verdict(row, by["default"], static, slo)
                    # Beside the verdict, not in it: the last half against the cheapest static config that held
                    # every objective on this seed (the out-of-sample oracle may not have).
                    row["vs_hindsight_static_last_half"] = (row["cost_per_1k_half"] / hindsight["cost_per_1k_half"]
                                                            if hindsight["feasible"] else None)
            rows += mine
            if partial is not None:  # a long run leaves what it has so far
                partial.write_text(json.dumps(_rounded(rows), indent=1, default=str))
    return rows


def _note(console: Console, name: str, seed: int, row: Mapping[str, Any]) -> None:
    """One line per finished arm, so a long run shows where it is even without a terminal."""
    if not console.is_terminal:
        print(f"{name} seed {seed} {row['arm']}: cost/1k {row['cost_per_1k']:.5f}, last half "
              f"{row['cost_per_1k_half']:.5f}, SLO windows {row['slo_windows']:.1%}, "
              f"quality {row['quality_after']:.4f}", flush=True)


def sim_table(rows: Sequence[Mapping[str, Any]], slo: SLO, title: str) -> Table:
    """One row per seed and arm, with the verdict's figures; the tuner's verdict decides the exit code."""
    out = Table(title=title)
    for column in ("seed", "arm", "cost/1k", "last half", "x static oracle", "x hindsight static", "x default",
                   "x per-phase", "p95 ms",
                   "SLO windows", "quality (95% lb)", "changes", "canaries +/-", "verdict"):
        out.add_column(column, justify="left" if column in ("arm", "verdict") else "right")
    by = {(r["seed"], r["arm"]): r for r in rows}
    for row in rows:
        v = row.get("verdict")
        checks = v["checks"] if v else {}
        phase = by.get((row["seed"], "per-phase oracle"), {}).get("cost_per_1k")
        failed = [k for k, c in checks.items() if not c["ok"]]
        bound = checks.get("quality_bound", {}).get("value")
        canaries = row.get("canaries") or {}
        out.add_row(str(row["seed"]), SIM_LABELS.get(row["arm"], row["arm"]), _fmt(row.get("cost_per_1k"), 5),
                    _fmt(row.get("cost_per_1k_half"), 5),
                    _fmt(checks.get("vs_static_oracle_last_half", {}).get("value"), 2),
                    _fmt(row.get("vs_hindsight_static_last_half"), 2),
                    _fmt(checks.get("vs_default", {}).get("value"), 2),
                    _fmt(row["cost_per_1k"] / phase if phase else None, 2), _fmt(row.get("p95_ms"), 0),
                    "—" if row.get("slo_windows") is None else f"{row['slo_windows']:.1%}",
                    ("[red]" if bound is not None and slo.quality_floor and bound < slo.quality_floor else "")
                    + _fmt(bound, 4), str(row.get("changes", "—")),
                    f"{canaries.get('promoted', 0)}/{canaries.get('rolled_back', 0)}" if canaries else "—",
                    ("[green]pass" if v["passed"] else "[red]fail: " + ", ".join(failed)) if v else "—")
    return out


def sim_chart(rows: Sequence[Mapping[str, Any]], slo: SLO, path: Path, title: str) -> Path:
    """Per pipeline and seed: cost per 1k over the last half, every arm as a bar, the tuner's and oracle's marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    arms = [a for a in SIM_ARMS if any(r["arm"] == a for r in rows)]
    fig, (cost_ax, p95_ax) = plt.subplots(2, 1, figsize=(11, 8))
    width = 0.8 / len(seeds)
    for i, seed in enumerate(seeds):
        by = {r["arm"]: r for r in rows if r["seed"] == seed}
        values = [_number(by.get(a, {}).get("cost_per_1k_half", by.get(a, {}).get("cost_per_1k"))) for a in arms]
        cost_ax.bar([j + i * width for j in range(len(arms))], values, width, label=f"seed {seed}")
    cost_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(arms))])
    cost_ax.set_xticklabels([SIM_LABELS[a].split(" (")[0].split(":")[0] for a in arms], fontsize=8)
    cost_ax.set_ylabel("cost per 1k, last half (USD)")
    cost_ax.set_yscale("log")
    cost_ax.legend(fontsize=8)
    cost_ax.set_title(title)
    first = [r for r in rows if r["seed"] == seeds[0] and isinstance(r.get("windows"), list)]
    for row in first:
        p95_ax.plot([w["minute"] for w in row["windows"]], [w["p95_ms"] for w in row["windows"]],
                    label=SIM_LABELS.get(row["arm"], row["arm"]), linewidth=1)
    if slo.p95_ms is not None:
        p95_ax.axhline(slo.p95_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p95 {slo.p95_ms:g} ms")
    p95_ax.set_yscale("log")
    p95_ax.set_xlabel(f"minute (seed {seeds[0]})")
    p95_ax.set_ylabel("p95 per minute (ms)")
    p95_ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sim_pipelines(rag_rate: float | None = None) -> dict[str, tuple[PipelineSpec, physics.Calibration, Any, Any]]:
    """The pipelines the simulation knows: name -> (spec, calibration, (seed, minutes) -> workload, prices);
    rag_answering on the load bench/tuner_real.py drives it with (2/s in 300-second days), or at a mean of
    `rag_rate` requests/s in the same days."""
    from bench.tuner_real import PIPELINES

    rag = PIPELINES["rag"]
    return {"ticket_triage": (demo_spec(), physics.DEMO, lambda seed, minutes=60.0: demo_workload(minutes, seed),
                              None),
            "rag_answering": (rag_spec(), rag_calibration(), lambda seed, minutes=60.0: rag_workload(
                minutes, seed, rate=rag_rate or rag.rate, period_seconds=rag.period_seconds), None)}


def canary_settings(name: str, minutes: float) -> tuple[Any, str]:
    """The loop's settings with canary limits sized by `canary.limits_for` for a run of `minutes` on the load
    bench/tuner_real.py drives pipeline `name` with (its mean rate and per-task cost spread), as that bench
    sets them for its tuner arm; and the line that says so. The loop's own defaults (20% of tasks, 200 each,
    30 minutes) assume hours of traffic: in an hour's run a canary would take half of it."""
    from bench.tuner_real import PIPELINES
    from tracetune.tuner.canary import limits_for
    from tracetune.tuner.loop import LoopSettings

    load = next((w for w in PIPELINES.values() if w.name == name), None)
    if load is None:
        return LoopSettings(), "canaries: the loop's defaults"
    rate = load.rate * load.mean_factor
    limits = limits_for(minutes * 60, rate, load.cost_spread, floor_tasks=CANARY_MIN_REQUESTS_FLOOR)
    settings = dataclasses.replace(LoopSettings(), canary_share=limits["share"],
                                   canary_max_seconds=limits["max_seconds"], canary_min_requests=limits["min_requests"])
    return settings, (f"canaries (canary.limits_for, {minutes:g} min at {rate:g} req/s, cost spread "
                      f"{load.cost_spread:g}): {limits['share']:.0%} of tasks, at most {limits['max_seconds']:g} s, "
                      f"{limits['min_requests']} tasks per arm")


def run_sim(console: Console, spec: PipelineSpec, calibration: physics.Calibration, minutes: float, seed: int,
            ) -> list[dict[str, Any]]:
    workload = demo_workload(minutes, seed)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task("arms: default, AIMD, tuner" if stage == "arms"
                                            else "oracle: grid search", total=total)
            bar.update(tasks[stage], completed=done)

        return simulate.run(spec, calibration, workload, progress=progress, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="sim", help="sim (discrete-event simulation) or real (real processes)")
    parser.add_argument("--minutes", type=float, default=60.0, help="minutes of load per arm (virtual in sim mode)")
    parser.add_argument("--seed", type=int, default=1, help="--mode real: the workload's seed")
    parser.add_argument("--seeds", default="1,2,3", help="--mode sim: workload seeds every arm is scored on")
    parser.add_argument("--search-seed", type=int, default=101,
                        help="--mode sim: the seed the static oracle is searched on (then scored on --seeds)")
    parser.add_argument("--evaluations", type=int, default=300, help="--mode sim: simulated runs of the oracle search")
    parser.add_argument("--pipelines", default="all", help="--mode sim: comma-separated pipeline names, or all")
    parser.add_argument("--calibrate-from", metavar="URL|HOME", default=None,
                        help="ClickHouse URL, or a bench arm's home kept with `bench/tuner_real.py --keep`, whose "
                             "spans of each simulated pipeline the simulation is fitted to")
    parser.add_argument("--real-load", action="store_true",
                        help="--mode sim: the canary limits bench/tuner_real.py sets for a run this long on each "
                             "pipeline's load (canary.limits_for) in place of the loop's defaults")
    parser.add_argument("--rag-rate", type=float, default=None,
                        help="--mode sim: rag_answering's mean requests/s (default: bench/tuner_real.py's, 2/s in "
                             "300-second days, what its large tier's 5/s limit can serve at the floor; 8: overload)")
    parser.add_argument("--calibration-window", type=int, default=3600, help="seconds of spans to fit from")
    parser.add_argument("--slo", metavar="KEY=VALUE,...", default=None,
                        help="--mode sim: objectives in place of the declared ones (p95_ms, p99_ms, error_rate, "
                             "cost_per_1k, quality_floor), e.g. p95_ms=2500,quality_floor=0.85: what if the owner "
                             "declared them")
    parser.add_argument("--frontier", metavar="FILE", type=Path, default=None,
                        help="--mode sim: run only the static oracle search (on --search-seed) and write every "
                             "config it ran, screened and in full, with its figures (cost, p95, SLO windows, "
                             "quality bound, per-minute p95/p99) as JSON to FILE; no arms")
    parser.add_argument("--out", type=Path, default=ROOT / ".tracetune" / "bench" / "tuner",
                        help="where the chart and JSON go (default .tracetune/bench/tuner)")
    args = parser.parse_args(argv)
    console = Console()
    if console.width < 200:  # the per-arm table has thirteen columns
        console = Console(width=200)
    try:
        if args.mode not in ("sim", "real"):
            raise UsageError(f"--mode must be sim or real, got {args.mode!r}")
        if not math.isfinite(args.minutes) or args.minutes < 10:
            raise UsageError(f"--minutes must be at least 10 (the first five are not judged), got {args.minutes:g}")
        if args.calibration_window <= 0:
            raise UsageError(f"--calibration-window must be above 0 s, got {args.calibration_window}")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file; give a folder")
        if args.mode == "sim":
            return sim_main(console, args)
        spec = demo_spec()
        slo = SLO(spec.pipeline, **spec.slo)
        calibration = physics.DEMO
        if args.calibrate_from:
            calibration = calibration_from(args.calibrate_from, spec, args.calibration_window)
        try:
            from bench.tuner_real import run_real
        except ImportError as exc:
            raise UsageError(f"--mode real needs bench/tuner_real.py ({exc})") from None
        oracle = simulate.oracle(spec, calibration, demo_workload(args.minutes, args.seed), slo=slo,
                                 seed=args.seed)[0]
        console.print(f"oracle config from the simulation: {json.dumps(_rounded(oracle['grid_config']))}")
        with Progress(console=console, transient=True) as bar:
            rows = run_real({"default": None, "aimd": None, "tuner": None, "oracle": oracle["grid_config"]},
                            minutes=args.minutes, seed=args.seed, progress=bar, rate=RATE)
        note = f"{args.minutes:g} minutes of real load, seed {args.seed}"
        report(console, rows, slo, args.out, args.mode, note)
    except UsageError as exc:
        print(f"bench/tuner.py: {exc}", file=sys.stderr)
        return 2
    return 0


def slo_override(text: str | None) -> dict[str, float]:
    """--slo KEY=VALUE,...: the objectives to use in place of the declared ones; UsageError with one line."""
    if not text:
        return {}
    keys = ("p95_ms", "p99_ms", "error_rate", "cost_per_1k", "quality_floor")
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise UsageError(f"--slo: expected KEY=VALUE with KEY one of {', '.join(keys)}, got {part.strip()!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise UsageError(f"--slo: {key} must be a number, got {value.strip()!r}") from None
        if not math.isfinite(out[key]) or out[key] <= 0:
            raise UsageError(f"--slo: {key} must be above 0, got {value.strip()!r}")
    return out


def frontier(console: Console, name: str, spec: PipelineSpec, calibration: physics.Calibration, workload: Any,
             search_seed: int, evaluations: int, prices: Any = None, screen: Any = None) -> dict[str, Any]:
    """The static oracle search of `sim_pipeline`, alone: every config it ran (screened on `screen(seed)` and the
    finalists in full on `workload(seed)`) with the figures a trade-off is read from. The per-minute p95 and
    p99 let SLO windows be recounted against other targets."""
    from tracetune.analyzer import load_prices
    from tracetune.tuner import oracles, simarms

    slo = SLO(spec.pipeline, **spec.slo)
    prices = prices or load_prices()
    gateway = simarms.gateway_config(spec, calibration, slo, prices)
    log: list[dict[str, Any]] = []
    with _bar(console) as bar:
        task = bar.add_task(f"{name}: static oracle search on seed {search_seed}", total=evaluations)
        best, _ = oracles.search(spec, calibration, workload(search_seed), slo=slo, evaluations=evaluations,
                                 seed=search_seed, start=[gateway], prices=prices, log=log,
                                 screen=screen(search_seed) if screen else None,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    runs = []
    for row in log:
        n = int(row.get("labelled_after") or 0)
        runs.append({
            "screened": row["screened"], "config": row["grid_config"], "feasible": row["feasible"],
            "cost_per_1k": row["cost_per_1k"], "cost_per_1k_half": row["cost_per_1k_half"], "p95_ms": row["p95_ms"],
            "p99_ms": row["p99_ms"], "slo_windows": row["slo_windows"], "quality_after": row["quality_after"],
            "quality_lb": oracles.quality_bound(row["quality_after"] * n, n) if n else math.nan,
            "labelled_after": n, "escalated": row["escalated"], "cost_by_step": row["cost_by_step"],
            "windows": [{k: w[k] for k in ("minute", "requests", "p95_ms", "p99_ms")} for w in row["windows"]]})
    return {"slo": spec.slo, "calibration": calibration.source, "search_seed": search_seed,
            "evaluations": evaluations, "minutes": workload(search_seed).duration / 60,
            "screen_minutes": screen(search_seed).duration / 60 if screen else None,
            "best": {"config": best["grid_config"], "feasible": best["feasible"], "cost_per_1k": best["cost_per_1k"]},
            "runs": runs}


def frontier_chart(found: Mapping[str, Any], slo: SLO, path: Path, name: str) -> Path:
    """Every config the search ran: cost per 1k against the quality bound, coloured by the share of SLO windows
    (screened runs small, full runs large), with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    points = None
    for screened, size in ((True, 10), (False, 40)):
        runs = [r for r in found["runs"] if r["screened"] == screened and r["cost_per_1k"] > 0]
        if runs:
            points = ax.scatter([r["cost_per_1k"] for r in runs], [_number(r["quality_lb"]) for r in runs], s=size,
                                c=[_number(r["slo_windows"]) for r in runs], cmap="RdYlGn", vmin=0, vmax=1,
                                edgecolors="black" if not screened else "none", linewidths=0.4,
                                label=f"{'screened' if screened else 'full'} runs ({len(runs)})")
    if points is not None:
        fig.colorbar(points, ax=ax, label=f"share of SLO windows (p95 {slo.p95_ms:g} ms, p99 {slo.p99_ms:g} ms)")
    if slo.quality_floor is not None:
        ax.axhline(slo.quality_floor, color="black", linestyle="--", linewidth=1, label=f"floor {slo.quality_floor:g}")
    ax.set_xscale("log")
    ax.set_xlabel("cost per 1k requests (USD)")
    ax.set_ylabel("quality, one-sided 95% lower bound")
    ax.set_title(f"{name}: every config the static oracle search ran (seed {found['search_seed']})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sim_main(console: Console, args: argparse.Namespace) -> int:
    """Every pipeline, every seed, every arm; exit 1 when the tuner's verdict fails on any of them."""
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated whole numbers, got {args.seeds!r}") from None
    if not seeds or args.search_seed in seeds or args.search_seed + VALIDATION_OFFSET in seeds:
        raise UsageError(f"--seeds needs seeds other than --search-seed {args.search_seed} and its validation seed "
                         f"{args.search_seed + VALIDATION_OFFSET} (the oracle is scored out of sample)")
    if args.evaluations < 10:
        raise UsageError(f"--evaluations must be at least 10, got {args.evaluations}")
    args.out.mkdir(parents=True, exist_ok=True)
    known = sim_pipelines(args.rag_rate)
    names = list(known) if args.pipelines == "all" else [n.strip() for n in args.pipelines.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--pipelines: no simulated pipeline {unknown[0]!r}; known: {', '.join(known)}")
    override = slo_override(args.slo)
    if args.frontier is not None and (args.frontier.is_dir() or not args.frontier.parent.is_dir()):
        raise UsageError(f"--frontier {args.frontier}: give a file in an existing folder")
    failed = []
    everything = []
    frontiers: dict[str, Any] = {}
    for name in names:
        spec, calibration, workload, prices = known[name]
        if override:
            spec = dataclasses.replace(spec, slo={**spec.slo, **override})
        if args.calibrate_from:
            calibration = calibration_from(args.calibrate_from, spec, args.calibration_window, base=calibration)
        slo = SLO(spec.pipeline, **spec.slo)
        console.print(f"[bold]{name}[/]: calibration {calibration.source}; SLO {json.dumps(spec.slo)}")
        settings, canaries = canary_settings(name, args.minutes) if args.real_load else (None, (
            "canaries: the loop's defaults (--real-load sizes them for the run)"))
        console.print(f"{name}: {canaries}")
        # The search screens on a third of the run (the same load's shape, compressed), then runs its best in full.
        screen = (lambda seed, w=workload: w(seed, args.minutes / 3)) if args.minutes / 3 >= 10 else None
        if args.frontier is not None:
            frontiers[name] = frontier(console, name, spec, calibration, lambda seed, w=workload: w(seed, args.minutes),
                                       args.search_seed, args.evaluations, prices, screen)
            args.frontier.write_text(json.dumps(_rounded(frontiers), indent=1, default=str))
            figure = frontier_chart(frontiers[name], slo, args.frontier.with_name(f"{args.frontier.stem}-{name}.png"),
                                    name)
            console.print(f"{name}: {len(frontiers[name]['runs'])} runs written to {args.frontier}, chart: {figure}")
            continue
        rows = sim_pipeline(console, name, spec, calibration, lambda seed, w=workload: w(seed, args.minutes), seeds,
                            args.search_seed, args.evaluations, prices, args.out / f"partial-{name}.json", screen,
                            settings)
        console.print(sim_table(rows, slo, f"{name}: {args.minutes:g} virtual minutes per arm, seeds "
                                           f"{', '.join(map(str, seeds))}; oracle searched on seed {args.search_seed}"))
        figure = sim_chart(rows, slo, args.out / f"tuner-sim-{name}.png", f"{name}: cost per 1k by arm")
        console.print(f"chart: {figure}")
        failed += [f"{name} seed {r['seed']}" for r in rows if r["arm"] == "tuner" and not r["verdict"]["passed"]]
        everything += rows
    if args.frontier is not None:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuner-sim.json").write_text(json.dumps(_rounded(everything), indent=1, default=str))
    console.print(f"rows: {args.out / 'tuner-sim.json'}")
    if failed:
        console.print(f"[red]tuner verdict failed: {', '.join(failed)}")
        return 1
    console.print("[green]tuner verdict passed on every pipeline and seed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

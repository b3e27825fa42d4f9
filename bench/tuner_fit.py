"""Fit the simulation to a real run and check it: the config that ran, simulated on the same load, beside what
the real processes measured.

    .venv/bin/python bench/tuner_real.py --pipeline rag --minutes 5 --arm default --keep   # prints its home
    .venv/bin/python bench/tuner_fit.py HOME --pipeline rag        # HOME: the folder that run printed

SOURCE is a bench arm's home kept with --keep (its store is opened read-only on a free port, then stopped) or
a ClickHouse URL. The calibration is fitted from every span of the pipeline in the store
(`tuner.calibration.fit`, with the pipeline's own calibration as the base for what spans do not show); the
config in force at the end of the run (`tracetune_config_versions`) is simulated on the load the bench drove
(the same LoadPlan: pattern, rate, period, duplicates, seed, the run's length) with the fitted calibration and
with the base one. The table prints cost per 1k, p95, quality and the escalation share of each; the fitted
calibration is written as JSON under --out (`bench/tuner.py --calibrate-from` takes the same SOURCE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import tuner as bench_tuner  # noqa: E402
from bench.harness import stop_process  # noqa: E402
from tracetune import analyzer  # noqa: E402
from tracetune.tuner import calibration as physics  # noqa: E402
from tracetune.tuner import simulate, versions  # noqa: E402

# The bench's pipelines (bench/tuner_real.py PIPELINES) by the names bench/tuner.py simulates them under.
NAMES = {"triage": "ticket_triage", "rag": "rag_answering"}

# Root spans of the run: how many, since when, p95 (exact, as bench/tuner_real.py measures it).
ROOTS_SQL = """
SELECT count(), toUnixTimestamp64Milli(min(Timestamp)) / 1000, toUnixTimestamp64Milli(max(Timestamp)) / 1000,
       quantileExactInclusive(0.95)(Duration) / 1e6
FROM otel_traces
WHERE ParentSpanId = '' AND SpanAttributes['tracetune.step'] = ''
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
"""


class UsageError(Exception):
    """Bad input on the command line: one line, exit code 2."""


def real_figures(client, spec, cascade: str | None) -> dict[str, Any]:
    """What the real processes measured over every root span in the store: the bench's own figures."""
    from bench.tuner_real import QUALITY_SQL

    requests, first, last, p95 = client.query(ROOTS_SQL, parameters={"pipeline": spec.pipeline}).result_rows[0]
    if not requests:
        raise UsageError(f"no request of {spec.pipeline} in the store")
    import time

    since = int(time.time() - float(first) + 120)
    steps = analyzer.cost_per_1k(client, since, by=("step",), pipeline=spec.pipeline)
    labelled, correct = client.query(QUALITY_SQL, parameters={"pipeline": spec.pipeline}).result_rows[0]
    escalated = 0
    if cascade:
        escalated = client.query(
            "SELECT count() FROM otel_traces WHERE SpanAttributes['tracetune.pipeline'] = {pipeline:String} "
            "AND SpanAttributes['tracetune.step'] = {step:String}",
            parameters={"pipeline": spec.pipeline, "step": cascade}).result_rows[0][0]
    return {"requests": int(requests), "seconds": float(last) - float(first),
            "cost_per_1k": 1000 * float(steps["cost"].sum() or 0.0) / int(requests), "p95_ms": float(p95),
            "quality": correct / labelled if labelled else math.nan, "escalated": escalated / int(requests),
            "window": since}


def sim_figures(spec, cal: physics.Calibration, workload: simulate.Workload, config, seed: int) -> dict[str, Any]:
    row = simulate.simulate(spec, cal, workload, simulate.Arm("real config", "static", config), seed=seed,
                            skip_seconds=0.0)
    return {"requests": row["requests"], "cost_per_1k": row["cost_per_1k"], "p95_ms": row["p95_ms"],
            "quality": row["quality"], "escalated": row["escalated"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a bench arm's home kept with --keep, or a ClickHouse URL")
    parser.add_argument("--pipeline", choices=list(NAMES), default="rag")
    parser.add_argument("--seed", type=int, default=1, help="the load's seed the run used (default 1)")
    parser.add_argument("--rate", type=float, default=None, help="the run's base rate (default: the bench's)")
    parser.add_argument("--window", type=int, default=7 * 86400, help="seconds of spans to fit from (default 7 days)")
    parser.add_argument("--check", action="append", default=[], metavar="HOME",
                        help="another kept arm's home (same pipeline and load): its config simulated with the "
                             "calibration fitted from SOURCE, beside what it measured (out of sample)")
    parser.add_argument("--out", type=Path, default=ROOT / ".tracetune" / "bench" / "tuner")
    args = parser.parse_args(argv)
    console = Console(width=max(120, Console().width))
    try:
        return run(console, args)
    except (UsageError, bench_tuner.UsageError) as exc:
        print(f"bench/tuner_fit.py: {exc}", file=sys.stderr)
        return 2


def run(console: Console, args: argparse.Namespace) -> int:
    from bench.tuner_real import DUPLICATE_RATIO, PIPELINES
    from tracetune.demo import load

    name = NAMES[args.pipeline]
    spec, base, _, prices = bench_tuner.sim_pipelines()[name]
    workload_def = PIPELINES[args.pipeline]
    def read(source: str, fit: bool):
        client, proc = bench_tuner.open_source(source)
        try:
            try:
                fitted = physics.fit(client, spec, args.window, base=base) if fit else None
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            config = versions.latest(client, spec.pipeline)
            return fitted, real_figures(client, spec, physics.roles(spec)[0]), {
                s: dict(v) for s, v in (config.steps if config is not None else {}).items()}
        finally:
            if proc is not None:
                stop_process(proc)

    rate = args.rate or workload_def.rate

    def workload_of(real: dict[str, Any]) -> simulate.Workload:
        """The load the bench drove for as long as the run lasted (whole minutes)."""
        duration = round(real["seconds"] / 60) * 60 or 60.0
        plan = load.LoadPlan(rate=rate, duration=duration, pattern=workload_def.pattern,
                             duplicate_ratio=DUPLICATE_RATIO, seed=args.seed,
                             period_seconds=workload_def.period_seconds)
        plan.validate()
        return simulate.Workload(tuple(load.arrivals(plan, random.Random(args.seed))), duration, DUPLICATE_RATIO,
                                 seed=args.seed)

    fitted, real, steps = read(args.source, True)
    workload = workload_of(real)
    duration = workload.duration
    before = f"simulated, {'assumed' if name == 'rag_answering' else 'measured'} (before)"
    rows = {"real processes": real,
            "simulated, fitted": sim_figures(spec, fitted, workload, steps, args.seed),
            before: sim_figures(spec, base, workload, steps, args.seed)}
    for n, home in enumerate(args.check, 1):
        _, other, other_steps = read(home, False)
        rows[f"check {n}: real processes"] = other
        rows[f"check {n}: simulated, fitted"] = sim_figures(spec, fitted, workload_of(other), other_steps, args.seed)
        rows[f"check {n}: {before}"] = sim_figures(spec, base, workload_of(other), other_steps, args.seed)
        console.print(f"check {n}: {home}: {json.dumps(other_steps)}")
    table = Table(title=f"{name}: the config in force ({json.dumps(steps)[:120]}) on {duration / 60:g} min of "
                        f"{workload_def.pattern} load at {rate:g}/s, seed {args.seed}")
    for column in ("", "requests", "cost / 1k (USD)", "p95 ms", "quality", "escalated"):
        table.add_column(column, justify="right" if column else "left")
    for label, r in rows.items():
        table.add_row(label, f"{r['requests']}", f"{r['cost_per_1k']:.4f}", f"{r['p95_ms']:.0f}",
                      f"{r['quality']:.3f}", f"{r['escalated']:.1%}" if math.isfinite(r["escalated"]) else "—")
    console.print(table)
    console.print(f"fitted: {fitted.source}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"calibration-{name}.json"
    path.write_text(json.dumps({"calibration": dataclasses.asdict(fitted), "rows": rows}, indent=1, default=str))
    console.print(f"calibration and rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tuner proof: one workload under the default config, AIMD on batch size, the tuner, and the oracle.

The workload is the demo's: ticket_triage (classify on fp32 / int8, escalation to two LLM tiers, CRM
follow-ups), Poisson arrivals whose rate doubles half-way (LoadPlan pattern "step"), 20% repeated
tickets, the LLM stand-in's latency and 429s. The oracle is the cheapest static config of a grid that
keeps >= 99% of 1-minute windows after minute 5 inside the SLO and quality at the floor.

    .venv/bin/python bench/tuner.py                            # simulation, 60 virtual minutes, ~10 min
    .venv/bin/python bench/tuner.py --minutes 240 --seed 2     # simulated hours
    .venv/bin/python bench/tuner.py --calibrate-from http://default:PASSWORD@127.0.0.1:8123/default
    .venv/bin/python bench/tuner.py --mode real                # real processes (bench/tuner_real.py)

`--mode sim` (default) runs tracetune.tuner.simulate: a discrete-event simulation in virtual time whose
tuner arm runs the real loop.decide on Observations built from the simulated spans. It prints a table,
ratios and the cost per step before (default) and after (tuner), and writes a chart and the rows as JSON
under --out (default .tracetune/bench/tuner, ignored by git).
"""

from __future__ import annotations

import argparse
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
from tracetune.tuner import simulate  # noqa: E402
from tracetune.tuner.config import PipelineSpec  # noqa: E402

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
    return simulate.Workload(tuple(load.arrivals(plan, random.Random(seed))), minutes * 60, duplicates, seed=seed)


def calibration_from(url: str, spec: PipelineSpec, window_seconds: int) -> simulate.Calibration:
    """A calibration fitted from the spans in the ClickHouse at `url`; UsageError with one line if it cannot."""
    import clickhouse_connect

    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)  # the failure is reported in one line below
    try:
        client = clickhouse_connect.get_client(dsn=url)
        return simulate.fit(client, spec, window_seconds)
    except ValueError as exc:
        raise UsageError(f"--calibrate-from: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any connection or query failure is one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--calibrate-from {url.split('@')[-1]}: cannot read spans ({first[:200]})") from None


# ---- output: the same for simulated and real rows ----------------------------------------------

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

def run_sim(console: Console, spec: PipelineSpec, calibration: simulate.Calibration, minutes: float, seed: int,
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
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calibrate-from", metavar="URL", default=None,
                        help="ClickHouse URL with the demo's spans (e.g. after `make demo`) to fit the simulation to")
    parser.add_argument("--calibration-window", type=int, default=3600, help="seconds of spans to fit from")
    parser.add_argument("--out", type=Path, default=ROOT / ".tracetune" / "bench" / "tuner",
                        help="where the chart and JSON go (default .tracetune/bench/tuner)")
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.mode not in ("sim", "real"):
            raise UsageError(f"--mode must be sim or real, got {args.mode!r}")
        if not math.isfinite(args.minutes) or args.minutes < 10:
            raise UsageError(f"--minutes must be at least 10 (the first five are not judged), got {args.minutes:g}")
        if args.calibration_window <= 0:
            raise UsageError(f"--calibration-window must be above 0 s, got {args.calibration_window}")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file; give a folder")
        spec = demo_spec()
        slo = SLO(spec.pipeline, **spec.slo)
        calibration = simulate.DEMO
        if args.calibrate_from:
            calibration = calibration_from(args.calibrate_from, spec, args.calibration_window)
        console.print(f"calibration: {calibration.source}")
        if args.mode == "sim":
            rows = run_sim(console, spec, calibration, args.minutes, args.seed)
            note = (f"{args.minutes:g} virtual minutes, {RATE:g} -> {2 * RATE:g} req/s at minute {args.minutes / 2:g}, "
                    f"{DUPLICATES:.0%} repeats, seed {args.seed}")
        else:
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


if __name__ == "__main__":
    sys.exit(main())

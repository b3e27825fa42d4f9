"""Oscillation: how often the tuner reverses a knob on a steady load, with and without its reversal guard.

Runs the demo (ticket_triage) in tracetune.tuner.simulate for 60 virtual minutes at a constant rate
(Poisson arrivals, `pattern="steady"`), its tuner arm calling the real `loop.decide`, and counts reversals:
a knob moved the opposite way to its previous move within an hour (route weights: the new move's weight
changes point against the last one's). Two arms: `decide` with the record of the last move per knob
(`loop.Moves`, as the loop rebuilds it from the audit) and `decide` without it (no hysteresis).

    .venv/bin/python bench/reversals.py                   # 60 virtual minutes, 15 tasks/s, seeds 1-3
    .venv/bin/python bench/reversals.py --minutes 120 --rate 25 --seeds 1
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.tuner import demo_spec  # noqa: E402
from tracetune.tuner import calibration, loop, simulate  # noqa: E402
from tracetune.tuner.config import PipelineSpec  # noqa: E402

HOUR = 3600.0
DEFAULTS = loop.LoopSettings()


def steady(minutes: float, rate: float, seed: int, duplicates: float = 0.2) -> simulate.Workload:
    from tracetune.demo import load

    plan = load.LoadPlan(rate=rate, duration=minutes * 60, pattern="steady", duplicate_ratio=duplicates, seed=seed)
    plan.validate()
    return simulate.Workload(tuple(load.arrivals(plan, random.Random(seed))), minutes * 60, duplicates, seed=seed)


def reversals(spec: PipelineSpec, decisions: list[dict[str, Any]], within: float = HOUR) -> list[str]:
    """Each knob move that goes back the way the knob's previous move (within `within` s) came."""
    config = spec.defaults()
    last: dict[tuple[str, str], loop.Move] = {}
    found = []
    for decision in decisions:
        if decision.get("kind", "tune") not in ("tune", "canary_promote"):  # only moves that took effect
            continue
        at = float(decision["at_seconds"])
        for step, values in decision["changes"].items():
            for knob, value in values.items():
                before = config.knob(step, knob)
                move = last.get((step, knob))
                if move is not None and at - move.at < within and move.reversed_by(before, value):
                    found.append(f"{at / 60:.0f} min {step}.{knob}: {_short(move.before)} -> {_short(move.after)} "
                                 f"at {move.at / 60:.0f} min, then -> {_short(value)}")
                last[(step, knob)] = loop.Move(step, knob, before, value, at, {})
        config = spec.merge(config, decision["changes"])
    return found


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "/".join(f"{float(v):.2f}" for v in value.values())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_arm(spec: PipelineSpec, workload: simulate.Workload, seed: int, guarded: bool) -> dict[str, Any]:
    """One tuner arm (the simulated loop, canaries included); `guarded`: `decide` gets the last move per knob."""
    arm = simulate.Arm("tuner", "tuner", options={"moves": guarded})
    row = simulate.simulate(spec, calibration.DEMO, workload, arm, seed=seed)
    return {"changes": row["changes"], "reversals": reversals(spec, row["decisions"]),
            "cost_per_1k": row["cost_per_1k"], "slo_windows": row["slo_windows"], "quality": row["quality"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=15.0, help="tasks per second, constant")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    args = parser.parse_args(argv)
    console = Console(width=max(120, Console().width))
    if not (args.minutes >= 10 and args.rate > 0 and args.seeds >= 1):
        console.print("Error: --minutes must be >= 10, --rate > 0 and --seeds >= 1", style="red", highlight=False)
        return 2
    spec = demo_spec()
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("tuner arms", total=2 * args.seeds)
        for seed in range(1, args.seeds + 1):
            workload = steady(args.minutes, args.rate, seed)
            for guarded in (True, False):
                rows.append({"seed": seed, "guarded": guarded, **run_arm(spec, workload, seed, guarded)})
                bar.advance(task)
    table = Table(title=f"Reversals on a steady load: demo, {args.rate:g} tasks/s, {args.minutes:g} virtual minutes")
    for column in ("seed", "decide", "config changes", "reversals within 1 h", "cost per 1k", "SLO windows",
                   "quality"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["seed"]), "with last moves" if r["guarded"] else "without", str(r["changes"]),
                      str(len(r["reversals"])), f"{r['cost_per_1k']:.5f}", f"{r['slo_windows']:.1%}",
                      f"{r['quality']:.3f}")
    console.print(table)
    for r in rows:
        for line in r["reversals"]:
            console.print(f"seed {r['seed']} {'with' if r['guarded'] else 'without'} last moves: {line}",
                          highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Analyzer at scale: per-step percentiles over 24 h from the rollup vs raw spans, at 1M and 10M spans.

Generates spans inside the embedded store (INSERT ... SELECT over numbers(), so the materialized
view fills the rollup exactly as live ingest does), then times the same questions both ways and
prints the percentile error of the rollup against exact.

    .venv/bin/python bench/analyzer.py            # 1M then 10M spans
    .venv/bin/python bench/analyzer.py --sizes 1e6  # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness import generate_spans, start_store  # bench/harness.py: this script's folder
from rich.console import Console
from rich.table import Table

from tracetune import analyzer

PRICES = analyzer.load_prices()

# name -> (question(client, source), columns compared between rollup and raw)
QUESTIONS = {
    "per-step p50/p95/p99, 24 h": (lambda c, src: analyzer.step_stats(c, "24h", source=src), ("p95_ms", "p99_ms")),
    "step x route x tenant, 24 h": (lambda c, src: analyzer.latency(c, "24h", ("step", "route", "tenant"),
                                                                   source=src), ("p95_ms", "p99_ms")),
    "cost per 1k, pipeline x step, 24 h": (lambda c, src: analyzer.cost_per_1k(
        c, "24h", by=("pipeline", "step"), prices=PRICES, source=src), ("cost_per_1k",)),
}


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated span counts, cumulative")
    parser.add_argument("--chunk", type=float, default=1e6)
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    console = Console(width=150)

    settings, proc, client = start_store("tracetune-bench-")
    try:
        table = Table(title="analyzer: rollup vs raw spans (median of 5 runs)")
        floor_ms, _ = timed(lambda: client.query("SELECT 1"))
        for col in ("spans", "question", "groups", "rollup ms", "raw ms", "raw / rollup", "compared",
                    "error median / max"):
            table.add_column(col, justify="right" if col not in ("question",) else "left")
        inserted = 0
        for size in sizes:
            inserted = generate_spans(client, size, inserted, args.chunk, console, f"generating spans up to {size:,}")
            minute_rows, hour_rows = (client.query(f"SELECT count() FROM {t}").result_rows[0][0]
                                      for t in ("tracetune_spans_1m", "tracetune_spans_1h"))
            console.print(f"{inserted:,} spans; rollups hold {minute_rows:,} minute rows, {hour_rows:,} hour rows")
            for name, (question, compared) in QUESTIONS.items():
                rollup_ms, fast = timed(lambda q=question: q(client, "rollup"))
                raw_ms, exact = timed(lambda q=question: q(client, "raw"), repeat=2)
                keys = [c for c in fast.columns if c in analyzer.DIMENSIONS]
                joined = fast.join(exact, on=keys, suffix="_exact")
                for column in compared:
                    error = (joined[column] - joined[f"{column}_exact"]).abs() / joined[f"{column}_exact"]
                    table.add_row(f"{inserted:,}", name, f"{joined.height:,}", f"{rollup_ms:.1f}", f"{raw_ms:.1f}",
                                  f"{raw_ms / rollup_ms:.1f}x", column,
                                  f"{100 * error.median():.2f}% / {100 * error.max():.2f}%")
        console.print(table)
        console.print(f"round trip of SELECT 1 through the embedded store: {floor_ms:.1f} ms (the floor of every row)")
        console.print("errors are against exact linear-interpolated percentiles; DDSketch guarantees 0.5% against "
                      "the sample at the quantile's rank, so small groups show interpolation gaps on top")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()

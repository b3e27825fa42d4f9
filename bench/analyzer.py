"""Analyzer at scale: per-step percentiles over 24 h from the rollup vs raw spans, at 1M and 10M spans.

Generates spans inside the embedded store (INSERT ... SELECT over numbers(), so the materialized
view fills the rollup exactly as live ingest does), then times the same questions both ways and
prints the percentile error of the rollup against exact.

    .venv/bin/python bench/analyzer.py            # 1M then 10M spans
    .venv/bin/python bench/analyzer.py --sizes 1e6  # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import isolated_settings  # bench/harness.py: this script's folder
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tracetune import analyzer, store

# Spans in traces of five: a root (the request) and four steps, 4 pipelines x 2 routes x 6 tenants,
# lognormal durations per step, an LLM step with GenAI token counts, timestamps over the last 24 h,
# 2% errors.
GENERATE_SQL = """
INSERT INTO otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
                         SpanAttributes, Duration, StatusCode)
SELECT
    now64(9) - toIntervalNanosecond(cityHash64(trace, 1) % 86400000000000) + toIntervalNanosecond(position * 1000)
        AS Timestamp,
    lower(hex(cityHash64(trace, {seed:UInt64}))) || lower(hex(cityHash64(trace, 2))) AS TraceId,
    lower(hex(cityHash64(number, {seed:UInt64}, 7))) AS SpanId,
    if(position = 0, '', lower(hex(cityHash64(trace * 5, {seed:UInt64}, 7)))) AS ParentSpanId,
    if(position = 0, pipeline, step) AS SpanName,
    if(position = 0, 'Server', 'Internal') AS SpanKind,
    'bench-executor' AS ServiceName,
    if(position = 0,
       map('tracetune.pipeline', pipeline, 'tracetune.tenant', tenant),
       mapConcat(map('tracetune.pipeline', pipeline, 'tracetune.step', step, 'tracetune.tenant', tenant,
                     'tracetune.route', if(step = 'generate', 'llm', route),
                     'tracetune.cache', if(rand(5) % 10 < 3, 'hit', 'miss')),
                 if(step = 'generate',
                    map('gen_ai.request.model', 'standin-small',
                        'gen_ai.usage.input_tokens', toString(200 + rand(7) % 300),
                        'gen_ai.usage.output_tokens', toString(5 + rand(8) % 40)),
                    map()))) AS SpanAttributes,
    toUInt64(exp(log(step_ms * 1e6) + 0.7 * randNormal(0, 1, number))) AS Duration,
    if(rand(3) % 100 < 2, 'Error', 'Unset') AS StatusCode
FROM (
    SELECT number, intDiv(number, 5) AS trace, number % 5 AS position,
        ['triage', 'search', 'summarize', 'extract'][trace % 4 + 1] AS pipeline,
        ['', 'normalize', 'embed', 'classify', 'generate'][position + 1] AS step,
        [420.0, 0.05, 4.0, 1.5, 350.0][position + 1] AS step_ms,
        ['fp32', 'int8'][cityHash64(trace, 3) % 2 + 1] AS route,
        ['acme', 'globex', 'initech', 'umbrella', 'hooli', 'stark'][cityHash64(trace, 4) % 6 + 1] AS tenant
    FROM numbers({start:UInt64}, {count:UInt64})
)
"""

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

    home = Path(tempfile.mkdtemp(prefix="tracetune-bench-"))
    settings = isolated_settings(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    proc = subprocess.Popen([sys.executable, "-m", "tracetune", "store"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = store.connect(settings, wait=60)
        client.timeout = 3600
        table = Table(title="analyzer: rollup vs raw spans (median of 5 runs)")
        floor_ms, _ = timed(lambda: client.query("SELECT 1"))
        for col in ("spans", "question", "groups", "rollup ms", "raw ms", "raw / rollup", "compared",
                    "error median / max"):
            table.add_column(col, justify="right" if col not in ("question",) else "left")
        inserted = 0
        for size in sizes:
            with Progress(console=console, transient=True) as bar:
                task = bar.add_task(f"generating spans up to {size:,}", total=size - inserted)
                while inserted < size:
                    count = int(min(args.chunk, size - inserted))
                    client.command(GENERATE_SQL, parameters={"start": inserted, "count": count, "seed": 42})
                    inserted += count
                    bar.advance(task, count)
            for rollup in ("tracetune_spans_1m", "tracetune_spans_1h"):  # what background merges do over time
                client.command(f"OPTIMIZE TABLE {rollup} FINAL")
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

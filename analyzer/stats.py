"""Per-step latency, errors, throughput, cache and batching, computed in ClickHouse SQL.

Two sources with the same columns: `rollup` (default) reads the per-minute `tracetune_spans_1m`
rollup, or for windows of HOURLY_FROM_SECONDS and more the hourly `tracetune_spans_1h`, whose cost
does not grow with raw span count (percentiles from DDSketch states, at most 0.5% relative error;
the window is rounded out to whole minutes or hours); `raw` reads `otel_traces` and gives exact
percentiles over exactly the window.

A task is its root span; step rows count step spans. Grouped by step, every pipeline also gets an
END_TO_END row from its root spans (the latency a caller sees, which latency SLOs judge); grouped
by dimensions a task has (pipeline, tenant, service) the rows count tasks, not the spans of every step.

throughput_rps is per second of data: requests over the time from the first span in the window (of
any group; the rollup knows its minute) to now, so a 1-minute run read through `--since 1h` shows
its own rate, not a sixtieth of it.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Literal

import polars as pl

Source = Literal["rollup", "raw"]

# Dimensions a caller may group by; the SQL fragments come only from this table.
DIMENSIONS = {"pipeline": "pipeline", "step": "step", "route": "route", "tenant": "tenant", "service": "service",
              "model": "model"}
LATENCY_COLUMNS = ["requests", "errors", "error_rate", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                   "mean_ms", "cache_hit_rate", "mean_batch_size", "mean_queue_ms"]
STEP_STATS_COLUMNS = ["pipeline", "step", "requests", "errors", "error_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms"]
END_TO_END = "(end to end)"  # the step name of a pipeline's root-span row: whole tasks, as callers see them
# Dimensions only step spans have: grouping by one of them counts step spans, else tasks.
STEP_DIMENSIONS = ("step", "route", "model")

HOURLY_FROM_SECONDS = 6 * 3600
_ROLLUPS = {"minute": ("tracetune_spans_1m", "minute", "toStartOfMinute"),
            "hour": ("tracetune_spans_1h", "hour", "toStartOfHour")}
_SQL_DIR = resources.files("tracetune.analyzer").joinpath("sql")
_SQL = {name: _SQL_DIR.joinpath(f"latency_{name}.sql").read_text() for name in ("rollup", "raw")}
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """'90s', '5m', '1h', '7d' -> seconds. Raises ValueError with the accepted forms."""
    match = _WINDOW.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"window {text!r} is not understood; use a number and a unit, like 30s, 5m, 2h or 7d")
    return int(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _seconds(since: str | int) -> int:
    return since if isinstance(since, int) else parse_window(since)


def _frame(result, columns: list[str], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    if not result.result_rows:
        return pl.DataFrame(schema={c: schema.get(c, pl.Float64) for c in columns})
    frame = pl.DataFrame([dict(zip(result.column_names, row, strict=True)) for row in result.result_rows],
                         infer_schema_length=None)
    return frame.select(columns).cast({c: t for c, t in schema.items() if c in columns})


def latency(client, since: str | int = "5m", by: tuple[str, ...] = ("pipeline", "step"), pipeline: str = "",
            steps: Literal["steps", "roots", "all"] | None = None, source: Source = "rollup") -> pl.DataFrame:
    """Count, throughput, error rate, p50/p95/p99/max, cache hit rate, batch size and queue time per group.

    `by` is any of pipeline, step, route, tenant, service, model; `steps` picks step spans, task root
    spans (their step is END_TO_END) or both. By default: both when grouping by step, step spans
    when grouping by route or model without step, else tasks (`--by tenant` counts tasks).
    """
    unknown = [d for d in by if d not in DIMENSIONS]
    if unknown or not by:
        raise ValueError(f"cannot group by {repr(unknown[0]) if unknown else 'nothing'}; choose from "
                         f"{', '.join(DIMENSIONS)}")
    if source not in _SQL:
        raise ValueError(f"source must be 'rollup' or 'raw', not {source!r}")
    if steps is None:
        steps = "all" if "step" in by else "steps" if any(d in by for d in STEP_DIMENSIONS) else "roots"
    if steps not in ("steps", "roots", "all"):
        raise ValueError(f"steps must be 'steps', 'roots' or 'all', not {steps!r}")
    step_filter = {"steps": "kind = 'step'", "roots": "kind = 'root'", "all": "kind != 'batch'"}[steps]
    seconds = _seconds(since)
    table, time_column, floor = _ROLLUPS["hour" if seconds >= HOURLY_FROM_SECONDS else "minute"]
    sql = (_SQL[source].replace("{group_by}", ", ".join(DIMENSIONS[d] for d in by))
           .replace("{step_filter}", step_filter).replace("{rollup_table}", table)
           .replace("{time_column}", time_column).replace("{time_floor}", floor))
    result = client.query(sql, parameters={"window_seconds": seconds, "pipeline": pipeline})
    schema = {d: pl.Utf8 for d in by} | {"requests": pl.Int64, "errors": pl.Int64}
    frame = _frame(result, list(by) + LATENCY_COLUMNS, schema)
    if "step" in by and steps != "steps":  # root spans have no step: name their row
        frame = frame.with_columns(pl.when(pl.col("step") == "").then(pl.lit(END_TO_END))
                                   .otherwise(pl.col("step")).alias("step"))
    return frame


def step_stats(client, since: str | int = "5m", pipeline: str = "", source: Source = "rollup",
               end_to_end: bool = True) -> pl.DataFrame:
    """One row per (pipeline, step) seen in the trailing window, percentiles in ms.

    With end_to_end (default) each pipeline's first row is END_TO_END: its tasks (root spans).
    """
    steps = "all" if end_to_end else "steps"
    return latency(client, since, ("pipeline", "step"), pipeline, steps, source).select(STEP_STATS_COLUMNS)


_SERIES_SQL = {
    "raw": _SQL_DIR.joinpath("step_latency_series.sql").read_text(),
    "rollup": _SQL_DIR.joinpath("step_latency_series_rollup.sql").read_text(),
}


def latency_series(client, since: str | int = "15m", pipeline: str = "", bucket_seconds: int = 10) -> pl.DataFrame:
    """p50/p95 per step per time bucket: columns bucket, pipeline, step, requests, p50_ms, p95_ms.

    Buckets of a minute or more read the rollup (rounded to whole minutes); finer ones read raw spans.
    """
    bucket_seconds = max(1, int(bucket_seconds))
    source = "rollup" if bucket_seconds >= 60 else "raw"
    if source == "rollup":
        bucket_seconds = -(-bucket_seconds // 60) * 60
    result = client.query(_SERIES_SQL[source], parameters={
        "window_seconds": _seconds(since), "pipeline": pipeline, "bucket_seconds": bucket_seconds})
    columns = ["bucket", "pipeline", "step", "requests", "p50_ms", "p95_ms"]
    schema = {"bucket": pl.Datetime("us", "UTC"), "pipeline": pl.Utf8, "step": pl.Utf8, "requests": pl.Int64}
    if not result.result_rows:
        return pl.DataFrame(schema={c: schema.get(c, pl.Float64) for c in columns})
    return pl.DataFrame([dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]).select(
        columns)


BATCHING_SQL = _SQL_DIR.joinpath("batching.sql").read_text()
BATCHING_COLUMNS = ["pipeline", "step", "route", "batched_spans", "batch_size_p50", "batch_size_p95", "batch_size_max",
                    "queue_ms_p50", "queue_ms_p95", "queue_ms_p99", "queue_ms_max", "queue_depth_p50",
                    "queue_depth_p95", "queue_depth_max", "size_histogram"]


def batching(client, since: str | int = "15m", pipeline: str = "") -> pl.DataFrame:
    """Batch size, queue time and queue depth distributions per pipeline step and route (raw spans that ran
    batched; queue depth: requests in the batch queue when one joined, itself included).

    size_histogram is a list of {batch_size, spans}: how many requests ran in batches of each size.
    """
    result = client.query(BATCHING_SQL, parameters={"window_seconds": _seconds(since), "pipeline": pipeline})
    rows = []
    for row in result.named_results():
        sizes, counts = row.pop("size_histogram")
        row.pop("bq"), row.pop("qq"), row.pop("dq")
        rows.append({**row, "size_histogram": [{"batch_size": int(s), "spans": int(c)}
                                               for s, c in zip(sizes, counts, strict=True)]})
    if not rows:
        return pl.DataFrame(schema={c: (pl.Utf8 if c in ("pipeline", "step", "route") else pl.Float64)
                                    for c in BATCHING_COLUMNS if c != "size_histogram"})
    return pl.DataFrame(rows).select(BATCHING_COLUMNS)


COLD_STARTS_SQL = _SQL_DIR.joinpath("cold_starts.sql").read_text()
COLD_START_COLUMNS = ["pipeline", "step", "route", "cold_starts", "executors", "cold_ms_p50", "cold_ms_max",
                      "warm_ms_p50", "last_cold_start"]


def cold_starts(client, since: str | int = "1h", pipeline: str = "") -> pl.DataFrame:
    """Per pipeline step and route with a cold start in the window (raw spans): cold starts (the first request of
    a model variant after an executor started), on how many executors, their latency in ms and the route's
    median latency otherwise."""
    result = client.query(COLD_STARTS_SQL, parameters={"window_seconds": _seconds(since), "pipeline": pipeline})
    schema = {"pipeline": pl.Utf8, "step": pl.Utf8, "route": pl.Utf8, "cold_starts": pl.Int64, "executors": pl.Int64,
              "last_cold_start": pl.Datetime("us", "UTC")}
    frame = _frame(result, COLD_START_COLUMNS, {k: v for k, v in schema.items() if k != "last_cold_start"})
    if frame.height and frame["last_cold_start"].dtype != pl.Datetime("us", "UTC"):
        frame = frame.with_columns(pl.col("last_cold_start").dt.replace_time_zone("UTC").dt.cast_time_unit("us"))
    return frame

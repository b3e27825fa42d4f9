"""Per-step latency and errors, computed in ClickHouse SQL."""

from __future__ import annotations

import re
from importlib import resources

import polars as pl

STEP_STATS_SQL = resources.files("analyzer.sql").joinpath("step_stats.sql").read_text()
STEP_STATS_COLUMNS = ["pipeline", "step", "requests", "errors", "error_rate", "p50_ms", "p95_ms",
                      "p99_ms", "max_ms"]

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """'90s', '5m', '1h', '7d' -> seconds. Raises ValueError with the accepted forms."""
    match = _WINDOW.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"window {text!r} is not understood; use a number and a unit, like 30s, 5m, 2h or 7d")
    return int(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def step_stats(client, since: str | int = "5m", pipeline: str = "") -> pl.DataFrame:
    """One row per (pipeline, step) seen in the trailing window, slowest percentiles in ms."""
    seconds = since if isinstance(since, int) else parse_window(since)
    result = client.query(STEP_STATS_SQL, parameters={"window_seconds": seconds, "pipeline": pipeline})
    frame = pl.DataFrame(
        [dict(zip(result.column_names, row)) for row in result.result_rows],
        schema_overrides={"requests": pl.Int64, "errors": pl.Int64},
    ) if result.result_rows else pl.DataFrame(schema={c: pl.Float64 for c in STEP_STATS_COLUMNS})
    if frame.is_empty():
        return frame.with_columns(pl.col("pipeline").cast(pl.Utf8), pl.col("step").cast(pl.Utf8),
                                  pl.col("requests").cast(pl.Int64), pl.col("errors").cast(pl.Int64))
    return frame.select(STEP_STATS_COLUMNS)


LATENCY_SERIES_SQL = resources.files("analyzer.sql").joinpath("step_latency_series.sql").read_text()


def latency_series(client, since: str | int = "15m", pipeline: str = "", bucket_seconds: int = 10) -> pl.DataFrame:
    """p50/p95 per step per time bucket: columns bucket, pipeline, step, requests, p50_ms, p95_ms."""
    seconds = since if isinstance(since, int) else parse_window(since)
    result = client.query(LATENCY_SERIES_SQL, parameters={
        "window_seconds": seconds, "pipeline": pipeline, "bucket_seconds": max(1, int(bucket_seconds))})
    columns = ["bucket", "pipeline", "step", "requests", "p50_ms", "p95_ms"]
    if not result.result_rows:
        return pl.DataFrame(schema={"bucket": pl.Datetime("us", "UTC"), "pipeline": pl.Utf8, "step": pl.Utf8,
                                    "requests": pl.Int64, "p50_ms": pl.Float64, "p95_ms": pl.Float64})
    return pl.DataFrame([dict(zip(result.column_names, row)) for row in result.result_rows]).select(columns)

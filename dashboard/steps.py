"""Steps: p50/p95/p99 over time per step and route, self time and critical-path share, batch size, queue time,
cache hit rate, the errors with their messages and trace ids, and cold starts and batch-queue depth."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import streamlit as st

from tracetune import analyzer
from tracetune.analyzer import parse_window
from tracetune.dashboard import charts, frames, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.frames import format_ms
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable

# What the second chart can show over time: label -> (column, axis title, scale to the shown unit)
OPERATIONS = {"batch size": ("mean_batch_size", "mean batch size", 1.0),
              "queue time": ("mean_queue_ms", "mean queue time (ms)", 1.0),
              "cache hit rate": ("cache_hit_rate", "cache hit rate (%)", 100.0)}
PERCENTILES = ("p50", "p95", "p99")
MAX_LINES = 8  # lines drawn at once on a chart over time; more are a choice away
# The error list and the critical path read raw spans: they cover at most this much of the range, so the
# page costs the same for a week as for an hour. The critical path reassembles sampled traces (every span of
# each), so it looks at the last quarter hour; the error list reads only failed spans, over the last hour.
RAW_WINDOW = "1h"
CRITICAL_WINDOW = "15m"
TASK = "(task)"


def raw_since(since: str, most: str = RAW_WINDOW) -> str:
    """The range a raw-span part covers: the chosen one, or `most` if it is longer."""
    return since if parse_window(since) <= parse_window(most) else most


def step_table(summary: pl.DataFrame, breakdown: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """One row per pipeline, step and route over the window: counts, error %, p50/p95/p99, cache, batching,
    and the step's mean self time and critical-path share ("critical %", from sampled traces; per step)."""
    paths = breakdown.select("pipeline", "step", pl.col("mean_self_ms").alias("self ms"),
                             (pl.col("critical_share") * 100).alias("critical %"))
    table = summary.join(paths, on=["pipeline", "step"], how="left").select(
        "pipeline", "step", "route", "requests",
        (100 * pl.col("errors") / pl.col("requests")).alias("error %"),
        pl.col("p50_ms").alias("p50 ms"), pl.col("p95_ms").alias("p95 ms"), pl.col("p99_ms").alias("p99 ms"),
        "self ms", "critical %",
        pl.col("mean_batch_size").fill_nan(None).alias("batch size"),
        pl.col("mean_queue_ms").fill_nan(None).alias("queue ms"),
        (100 * pl.col("cache_hit_rate")).fill_nan(None).alias("cache hit %"),
    ).sort("pipeline", pl.col("step") != analyzer.END_TO_END, "step", "route")
    return table if show_pipeline else table.drop("pipeline")


def highest_series(data: pl.DataFrame, column: str) -> list[str]:
    """Series labels, the highest peak of `column` first (the slowest, the fullest batches ...)."""
    peaks = data.group_by("series").agg(pl.col(column).max().alias("peak"))
    return peaks.sort(["peak", "series"], descending=[True, False])["series"].to_list()


def _series_chart(series: pl.DataFrame, column: str, title: str, scale: float, window, bucket: int,
                  show_pipeline: bool, key: str) -> None:
    columns = ["pipeline", "step", "route"] if show_pipeline else ["step", "route"]
    data = frames.label(series.filter(pl.col(column).is_not_nan()), columns)
    names = highest_series(data, column)
    if len(names) > MAX_LINES:  # more lines than a reader can tell apart: the highest first, the rest on request
        chosen = st.multiselect(f"Lines ({len(names)} step / route series; the {MAX_LINES} highest shown)", names,
                                default=names[:MAX_LINES], key=key)
        data = data.filter(pl.col("series").is_in(chosen))
    data = frames.with_gaps(data.select("bucket", "series", (pl.col(column) * scale).alias("value")), ["series"],
                            bucket)
    ui.chart(charts.time_lines(data, "value", title, window, color_title="step / route"))


def _error_call(f) -> dict:
    return {"since": raw_since(f.since), "pipeline": f.pipeline_name, "limit": 50}


def _errors(ctx: Context) -> None:
    f = ctx.filters
    st.subheader("Errors")
    since = raw_since(f.since)
    found = cached(ctx.settings, analyzer.error_spans, **_error_call(f))
    if found.is_empty():
        st.success(f"No failed step or task in the last {since}{f.scope()}.")
        return
    table = found.select("pipeline", pl.col("step").replace("", TASK), "kind", "message", "count",
                         pl.col("last_seen").dt.strftime("%m-%d %H:%M:%S").alias("last (UTC)"),
                         pl.col("example_trace_id").alias("trace id"))
    ui.table(table if not f.pipeline_name else table.drop("pipeline"), {"count": ui.COUNT})
    st.caption(f"The last {since}, all tenants. {TASK}: failed tasks (a task's root span repeats the error that "
               "ended it). kind: client (the task's input was refused) or server. The trace id is the newest "
               "example: look it up in Grafana, or see every failure with `tracetune errors`.")


def render(ctx: Context) -> None:
    f = ctx.filters
    show_pipeline = not f.pipeline_name
    bucket = ui.bucket_seconds(f)
    window = ui.window(f, datetime.now(UTC))
    whole = {"since": f.since, "pipeline": f.pipeline_name, "tenant": f.tenant_name, "bucket_seconds": 0}
    timed = {**whole, "bucket_seconds": bucket}
    paths = {"since": raw_since(f.since, CRITICAL_WINDOW), "pipeline": f.pipeline_name}
    prefetch(ctx.settings, [(analyzer.step_series, whole), (analyzer.step_series, timed),
                            (analyzer.step_breakdown, paths), (analyzer.error_spans, _error_call(f)),
                            (analyzer.cold_starts, _signals_call(f)), (analyzer.batching, _signals_call(f))])
    try:
        summary = cached(ctx.settings, analyzer.step_series, **whole)
        series = cached(ctx.settings, analyzer.step_series, **timed)
        breakdown = cached(ctx.settings, analyzer.step_breakdown, **paths)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    if summary.is_empty():
        st.info(f"No spans in the last {f.since}{f.scope()} yet. Start `tracetune demo`, or point an "
                "OpenTelemetry exporter at the collector.")
        return
    tasks = summary.filter(pl.col("step") == analyzer.END_TO_END)
    requests, errors, slowest = st.columns(3)
    requests.metric("Requests", f"{int(tasks['requests'].sum()):,}", help="Tasks (root spans) in the range.")
    total = int(tasks["requests"].sum())
    errors.metric("Error %", f"{100 * int(tasks['errors'].sum()) / total:.1f} %" if total else "–",
                  help="Failed tasks ÷ tasks.")
    steps = summary.filter(pl.col("step") != analyzer.END_TO_END)
    if not steps.is_empty():
        top = steps.sort(["p95_ms", "pipeline", "step"], descending=[True, False, False]).row(0, named=True)
        slowest.metric(f"Slowest step p95 · {top['pipeline']} / {top['step']}", format_ms(top["p95_ms"]),
                       help="The step and route whose 95th-percentile latency is highest in the range.")

    columns = {"requests": ui.COUNT, "error %": ui.PCT, "p50 ms": ui.MS, "p95 ms": ui.MS, "p99 ms": ui.MS,
               "self ms": ui.MS, "critical %": ui.PCT, "batch size": st.column_config.NumberColumn(format="%.2f"),
               "queue ms": ui.MS, "cache hit %": ui.PCT}
    table = step_table(summary, breakdown, True)
    for (pipeline,), rows in table.group_by(["pipeline"], maintain_order=True):  # one table per pipeline: 13
        if show_pipeline:                                                        # columns would not fit the page
            st.markdown(f"**{pipeline}**")
        ui.table(rows.drop("pipeline"), columns)
    st.caption(f"{analyzer.END_TO_END}: whole tasks, as callers see them. Self time and critical-path share come "
               f"from up to {analyzer.traces.MAX_TRACES:,} traces sampled over the last "
               f"{raw_since(f.since, CRITICAL_WINDOW)} "
               "(all tenants); "
               f"{analyzer.ROOT_STEP} is time outside every step. {frames.MISSING} in batch size, queue ms or cache "
               f"hit %: the step does not batch or look up a cache; {frames.MISSING} in self ms and critical %: no "
               "sampled trace ran the step (whole tasks have neither).")

    st.subheader("Latency over time")
    percentile = st.radio("Percentile", PERCENTILES, index=1, horizontal=True, key="steps_percentile")
    _series_chart(series.filter(pl.col("step") != analyzer.END_TO_END), f"{percentile}_ms", f"{percentile} (ms)",
                  1.0, window, bucket, show_pipeline, "steps_latency_lines")
    st.subheader("Batching and caching over time")
    shown = st.radio("Show", list(OPERATIONS), horizontal=True, key="steps_operation")
    column, title, scale = OPERATIONS[shown]
    operated = series.filter((pl.col("step") != analyzer.END_TO_END) & pl.col(column).is_not_nan())
    if operated.is_empty():
        st.caption(f"No step reported its {shown} in the range.")
    else:
        _series_chart(operated, column, title, scale, window, bucket, show_pipeline, "steps_operation_lines")
    try:
        _errors(ctx)
        _signals(ctx)
    except StoreUnavailable as problem:
        st.error(str(problem))


def _signals_call(f) -> dict:
    return {"since": raw_since(f.since), "pipeline": f.pipeline_name}


def signal_tables(cold: pl.DataFrame, batching: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cold starts per step and route (count, executors, first-request and usual latency), and batch-queue
    depth per batched step and route (median, p95 and deepest queue a request joined)."""
    cold_table = cold.select("pipeline", "step", "route", pl.col("cold_starts").alias("cold starts"),
                             "executors", pl.col("cold_ms_p50").alias("first request ms"),
                             pl.col("cold_ms_max").alias("slowest first ms"),
                             pl.col("warm_ms_p50").alias("usual p50 ms"))
    queue_table = batching.select("pipeline", "step", "route", pl.col("batched_spans").alias("batched requests"),
                                  pl.col("queue_depth_p50").alias("queue depth p50"),
                                  pl.col("queue_depth_p95").alias("queue depth p95"),
                                  pl.col("queue_depth_max").alias("deepest queue"))
    return cold_table, queue_table


def cold_chart(cold: pl.DataFrame) -> pl.DataFrame:
    """Per step and route, its slowest first request after a start beside its usual median: one bar each."""
    data = frames.label(cold, ["pipeline", "step", "route"])
    return pl.concat([data.select("series", pl.lit("first after a start (slowest)").alias("request"),
                                  pl.col("cold_ms_max").alias("ms")),
                      data.select("series", pl.lit("usual (p50)").alias("request"), pl.col("warm_ms_p50").alias("ms"))])


def _signals(ctx: Context) -> None:
    f = ctx.filters
    since = raw_since(f.since)
    cold = cached(ctx.settings, analyzer.cold_starts, **_signals_call(f))
    batching = cached(ctx.settings, analyzer.batching, **_signals_call(f))
    cold_table, queue_table = signal_tables(cold, batching)
    st.subheader("Cold starts and batch queues")
    if cold_table.is_empty():
        st.caption(f"No model variant served its first request after an executor start in the last {since}.")
    else:
        ui.table(cold_table if not f.pipeline_name else cold_table.drop("pipeline"),
                 {"cold starts": ui.COUNT, "executors": ui.COUNT, "first request ms": ui.MS,
                  "slowest first ms": ui.MS, "usual p50 ms": ui.MS})
        st.caption(f"The last {since}. A cold start is a model variant's first request after an executor started "
                   "(`tracetune_cold_starts_total` on the executor's /metrics); usual p50: the same route's other "
                   "requests.")
        ui.chart(charts.bars(cold_chart(cold), "ms", "latency (ms)", "series", "step / route", color="request",
                             color_title="request", stack=False))
    if queue_table.is_empty():
        st.caption(f"No step ran batched in the last {since}.")
    else:
        ui.table(queue_table if not f.pipeline_name else queue_table.drop("pipeline"),
                 {"batched requests": ui.COUNT, "queue depth p50": ui.MS, "queue depth p95": ui.MS,
                  "deepest queue": ui.COUNT})
        st.caption("Queue depth: requests in the route's batch queue when a request joined it, itself included "
                   "(`tracetune_batch_queue_depth` is the same queue now); 0 for executors that do not record it.")


if __name__ == "__main__":
    run(render)

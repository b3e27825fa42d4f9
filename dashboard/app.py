"""The tracetune dashboard: per-step latency and errors of each pipeline, for product owners.

Run with `tracetune dashboard` (or `streamlit run dashboard/app.py`). Every number comes from
`analyzer` query functions; this page holds no SQL, only layout and a little arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import altair as alt
import polars as pl
import streamlit as st
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

import store
from analyzer import latency_series, step_stats
from tracetune import settings as settings_mod
from tracetune.settings import Settings, SettingsError

WINDOWS = ["5m", "15m", "1h", "6h", "24h"]
DEFAULT_WINDOW = "15m"
# Chart bucket per window: a few dozen points per line whatever the window.
BUCKET_SECONDS = {"5m": 10, "15m": 30, "1h": 60, "6h": 300, "24h": 900}
ALL_PIPELINES = "all"
REFRESH_SECONDS = 5

TABLE_COLUMNS = ["pipeline", "step", "requests", "error %", "p50 ms", "p95 ms", "p99 ms"]
# ClickHouse error codes that mean "nothing was ever written here", not "something is broken".
_NOT_CREATED_YET = {60, 81}  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_CODE = re.compile(r"Code:\s*(\d+)")


class StoreUnavailable(Exception):
    """ClickHouse could not answer; the message is one line for the page."""

    def __init__(self, message: str, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty  # True: the store is up but holds no span table yet


# ---- pure helpers (no Streamlit, no I/O) -----------------------------------------------------

def address(settings: Settings) -> str:
    """host:port/database of the ClickHouse this page reads, as shown to the user."""
    target = settings.clickhouse_target()
    return f"{target['host']}:{target['port']}/{target['database']}"


def headline(stats: pl.DataFrame) -> dict[str, Any]:
    """Requests, error % and the slowest step (by p95) over a step_stats frame.

    Every request runs a pipeline's first step, so a pipeline's requests are its busiest
    step's count; error % is failed step calls over all step calls.
    """
    if stats.is_empty():
        return {"requests": 0, "error_pct": 0.0, "slowest": None}
    requests = int(stats.group_by("pipeline").agg(pl.col("requests").max())["requests"].sum())
    calls = int(stats["requests"].sum())
    errors = int(stats["errors"].sum())
    slowest = stats.sort(["p95_ms", "pipeline", "step"], descending=[True, False, False]).row(0, named=True)
    return {
        "requests": requests,
        "error_pct": 100.0 * errors / calls if calls else 0.0,
        "slowest": {"pipeline": slowest["pipeline"], "step": slowest["step"], "p95_ms": slowest["p95_ms"]},
    }


def step_table(stats: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """The per-step table as shown: counts, error % and p50/p95/p99 in ms."""
    table = stats.select(
        "pipeline", "step", "requests",
        (pl.col("error_rate") * 100).alias("error %"),
        pl.col("p50_ms").alias("p50 ms"),
        pl.col("p95_ms").alias("p95 ms"),
        pl.col("p99_ms").alias("p99 ms"),
    )
    return table if show_pipeline else table.drop("pipeline")


def with_series(frame: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """Add the legend label of each line/bar: the step, or `pipeline / step` across pipelines."""
    label = pl.concat_str("pipeline", pl.lit(" / "), "step") if show_pipeline else pl.col("step")
    return frame.with_columns(label.alias("series"))


def format_ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


# ---- I/O at the edges --------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _cached_client(target: tuple, _settings: Settings):
    """One clickhouse-connect client per ClickHouse target, shared by every browser session."""
    return store.connect(_settings, ensure_schema=False)


def _unavailable(settings: Settings, exc: Exception) -> StoreUnavailable:
    where = address(settings)
    if isinstance(exc, OperationalError):
        return StoreUnavailable(f"Cannot reach ClickHouse at {where}: is `tracetune up` running?")
    code = _CODE.search(str(exc))
    if code and int(code.group(1)) in _NOT_CREATED_YET:
        return StoreUnavailable(f"ClickHouse at {where} has no otel_traces table yet; "
                                "`tracetune up` creates it.", empty=True)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return StoreUnavailable(f"ClickHouse at {where} could not answer: {first_line}")


def query(settings: Settings, fn: Callable[..., pl.DataFrame], **kwargs: Any) -> pl.DataFrame:
    """Run one analyzer function on the cached client; connection trouble becomes StoreUnavailable."""
    target = tuple(sorted(settings.clickhouse_target().items()))
    try:
        return fn(_cached_client(target, settings), **kwargs)
    except DatabaseError as exc:
        raise _unavailable(settings, exc) from None


def _show_unavailable(problem: StoreUnavailable, window: str) -> None:
    if problem.empty:
        st.info(f"No spans in the last {window} yet. {problem}")
    else:
        st.error(str(problem))


# ---- page --------------------------------------------------------------------------------------

def _metrics(stats: pl.DataFrame) -> None:
    head = headline(stats)
    requests, errors, slowest = st.columns(3)
    requests.metric("Requests", f"{head['requests']:,}",
                    help="Requests started in the window (the busiest step of each pipeline).")
    errors.metric("Error %", f"{head['error_pct']:.1f} %", help="Failed step calls ÷ all step calls.")
    top = head["slowest"]
    if top is not None:
        slowest.metric(f"Slowest step p95 · {top['pipeline']} / {top['step']}", format_ms(top["p95_ms"]),
                       help="The step whose 95th-percentile latency is highest in the window.")


def _table(stats: pl.DataFrame, show_pipeline: bool) -> None:
    ms = st.column_config.NumberColumn(format="%.1f")
    st.dataframe(
        step_table(stats, show_pipeline),
        hide_index=True,
        column_config={
            "requests": st.column_config.NumberColumn(format="%d"),
            "error %": st.column_config.NumberColumn(format="%.1f %%"),
            "p50 ms": ms, "p95 ms": ms, "p99 ms": ms,
        },
    )


def _latency_chart(series: pl.DataFrame, show_pipeline: bool, bucket_seconds: int) -> None:
    data = with_series(series, show_pipeline).select("bucket", "series", "requests", "p95_ms", "p50_ms")
    chart = alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("bucket:T", title=f"time ({bucket_seconds} s buckets)"),
        y=alt.Y("p95_ms:Q", title="p95 latency (ms)"),
        color=alt.Color("series:N", title="step"),
        tooltip=["series:N", alt.Tooltip("bucket:T", format="%H:%M:%S"), "requests:Q",
                 alt.Tooltip("p50_ms:Q", format=".1f"), alt.Tooltip("p95_ms:Q", format=".1f")],
    )
    st.altair_chart(chart, width="stretch")


def _percentile_chart(stats: pl.DataFrame, show_pipeline: bool) -> None:
    data = (
        with_series(stats, show_pipeline)
        .select("series", "p50_ms", "p95_ms", "p99_ms")
        .unpivot(index="series", variable_name="percentile", value_name="ms")
        .with_columns(pl.col("percentile").str.replace("_ms", ""))
    )
    chart = alt.Chart(data).mark_bar().encode(
        x=alt.X("series:N", title="step", sort=None),
        xOffset=alt.XOffset("percentile:N", sort=["p50", "p95", "p99"]),
        y=alt.Y("ms:Q", title="latency (ms)"),
        color=alt.Color("percentile:N", sort=["p50", "p95", "p99"]),
        tooltip=["series:N", "percentile:N", alt.Tooltip("ms:Q", format=".1f")],
    )
    st.altair_chart(chart, width="stretch")


def body(settings: Settings, window: str, pipeline: str) -> None:
    """Everything below the title; re-run alone when auto-refresh is on."""
    show_pipeline = pipeline == ALL_PIPELINES
    name = "" if show_pipeline else pipeline
    bucket = BUCKET_SECONDS[window]
    try:
        stats = query(settings, step_stats, since=window, pipeline=name)
        series = query(settings, latency_series, since=window, pipeline=name, bucket_seconds=bucket)
    except StoreUnavailable as problem:
        _show_unavailable(problem, window)
        return
    if stats.is_empty():
        scope = "" if show_pipeline else f" for pipeline {pipeline}"
        st.info(f"No spans in the last {window}{scope} yet. Start `tracetune demo`, or point an "
                f"OpenTelemetry exporter at the collector.")
        return

    _metrics(stats)
    st.subheader("Steps")
    _table(stats, show_pipeline)
    st.subheader("p95 latency over time")
    _latency_chart(series, show_pipeline, bucket)
    st.subheader("Latency percentiles per step")
    _percentile_chart(stats, show_pipeline)


def main() -> None:
    st.set_page_config(page_title="tracetune", layout="wide")
    st.title("tracetune")
    try:
        settings = settings_mod.load()
    except SettingsError as exc:
        st.error(str(exc))
        return

    window = st.sidebar.selectbox("Window", WINDOWS, index=WINDOWS.index(DEFAULT_WINDOW),
                                  help="Trailing time range every figure covers.")
    try:
        pipelines = sorted(set(query(settings, step_stats, since=window)["pipeline"].to_list()))
    except StoreUnavailable as problem:
        _show_unavailable(problem, window)
        return
    pipeline = st.sidebar.selectbox("Pipeline", [ALL_PIPELINES, *pipelines])
    refresh = st.sidebar.toggle(f"Refresh every {REFRESH_SECONDS} s", value=False)
    st.caption(f"Last {window} · {'all pipelines' if pipeline == ALL_PIPELINES else pipeline} · "
               f"ClickHouse {address(settings)}")

    st.fragment(body, run_every=REFRESH_SECONDS if refresh else None)(settings, window, pipeline)


if __name__ == "__main__":
    main()

"""The dashboard's tabs: latency, cost, critical path, drift, SLOs and alerts of the chosen window and pipeline.

Each tab is one function `(settings, window, pipeline) -> None` that calls analyzer functions through
`queries.query`, shapes the frames with `frames`, and lays them out; a tab that cannot get its data
says why in one line and leaves the other tabs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from tracetune import analyzer
from tracetune.analyzer import (
    PricesError,
    PriceTable,
    SLOError,
    cost_over_time,
    cost_per_1k,
    current_drift,
    current_prices,
    data_note,
    delivery,
    drift_flags,
    latency_series,
    latest_drift,
    list_slos,
    slo_status,
    step_breakdown,
    step_stats,
)
from tracetune.analyzer import alerts as alerting
from tracetune.dashboard import frames
from tracetune.dashboard.frames import format_money, format_ms, with_series
from tracetune.dashboard.queries import StoreUnavailable, query, show_unavailable, target_key
from tracetune.settings import Settings

__all__ = ["ALL_PIPELINES", "BUCKET_SECONDS", "DRIFT_CURRENT", "TABS"]

ALL_PIPELINES = "all"
# Chart bucket per window: a few dozen points per line whatever the window.
BUCKET_SECONDS = {"5m": 10, "15m": 30, "1h": 60, "6h": 300, "24h": 900}
# Drift has its own windows whatever the sidebar says: the analyzer loop's current window, against each
# pipeline's pinned baseline or else the preceding window of the same length.
DRIFT_CURRENT = analyzer.DEFAULT_CURRENT
DRIFT_FLAGS_WINDOW = "1h"  # flags of stored runs shown beside the latest run
DRIFT_RECOMPUTE_SECONDS = 60  # a drift computed on the fly is reused this long

_MS = st.column_config.NumberColumn(format="%.1f")
_PCT = st.column_config.NumberColumn(format="%.1f %%")
_COUNT = st.column_config.NumberColumn(format="%d")
_MONEY = st.column_config.NumberColumn(format="%.4g")


def _time_axis(bucket_seconds: int) -> alt.X:
    """Bucket start on a 24-hour clock (vega's default shows 09:15 for 21:15), in the browser's time zone."""
    return alt.X("bucket:T", title=f"time ({bucket_seconds} s buckets)",
                 axis=alt.Axis(format="%H:%M:%S" if bucket_seconds < 60 else "%H:%M"))


def _scope(pipeline: str) -> tuple[bool, str]:
    """(show the pipeline column, the analyzer's pipeline filter) for the sidebar's choice."""
    return (True, "") if pipeline == ALL_PIPELINES else (False, pipeline)


def _for(pipeline: str) -> str:
    return "" if pipeline == ALL_PIPELINES else f" for pipeline {pipeline}"


def _coloured(table: pl.DataFrame, column: str) -> pd.io.formats.style.Styler:
    """The table with `column`'s cells coloured by their value (frames.STATUS_COLOURS)."""
    def colour(value: str) -> str:
        background, text = frames.STATUS_COLOURS.get(value, ("", ""))
        return f"background-color: {background}; color: {text}" if background else ""

    return table.to_pandas().style.map(colour, subset=[column])


# ---- latency ---------------------------------------------------------------------------------

def _latency_metrics(stats: pl.DataFrame) -> None:
    head = frames.headline(stats)
    requests, errors, end_to_end, slowest = st.columns(4)
    requests.metric("Requests", f"{head['requests']:,}", help="Tasks in the window (root spans).")
    errors.metric("Error %", f"{head['error_pct']:.1f} %", help="Failed tasks ÷ tasks (client and server errors; "
                  "`tracetune errors` lists them).")
    if head["end_to_end"] is not None:
        e2e = head["end_to_end"]
        end_to_end.metric(f"End-to-end p95 · {e2e['pipeline']}", format_ms(e2e["p95_ms"]),
                          help="95th-percentile latency of whole tasks (root spans), what latency SLOs judge; "
                               "the slowest pipeline's.")
    top = head["slowest"]
    if top is not None:
        slowest.metric(f"Slowest step p95 · {top['pipeline']} / {top['step']}", format_ms(top["p95_ms"]),
                       help="The step whose 95th-percentile latency is highest in the window.")


def _latency_chart(series: pl.DataFrame, show_pipeline: bool, bucket_seconds: int) -> None:
    data = with_series(series, show_pipeline).select("bucket", "series", "requests", "p95_ms", "p50_ms")
    chart = alt.Chart(data).mark_line(point=True).encode(
        x=_time_axis(bucket_seconds),
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


def latency(settings: Settings, window: str, pipeline: str) -> None:
    """Requests, errors and p50/p95/p99 per step, p95 over time (the per-minute rollup)."""
    show_pipeline, name = _scope(pipeline)
    bucket = BUCKET_SECONDS[window]
    try:
        stats = query(settings, step_stats, since=window, pipeline=name)
        series = query(settings, latency_series, since=window, pipeline=name, bucket_seconds=bucket)
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    if stats.is_empty():
        st.info(f"No spans in the last {window}{_for(pipeline)} yet. Start `tracetune demo`, or point an "
                f"OpenTelemetry exporter at the collector.")
        return

    _latency_metrics(stats)
    st.subheader("Steps")
    st.caption(f"{analyzer.END_TO_END}: each pipeline's tasks (root spans), as callers see them.")
    st.dataframe(frames.step_table(stats, show_pipeline), hide_index=True, column_config={
        "requests": _COUNT, "error %": _PCT, "p50 ms": _MS, "p95 ms": _MS, "p99 ms": _MS})
    st.subheader("p95 latency over time")
    _latency_chart(series, show_pipeline, bucket)
    st.subheader("Latency percentiles per step")
    _percentile_chart(stats, show_pipeline)


# ---- cost ------------------------------------------------------------------------------------

def _prices(settings: Settings) -> tuple[PriceTable, str]:
    """The published price table and "", or, if none is, the bundled prices.toml and a note saying so.

    The page reads as the store's read-only user, so it never publishes prices itself: the analyzer
    (`tracetune up` starts it) does. PricesError (one line) when prices.toml cannot be read.
    """
    table = query(settings, current_prices)
    if table is not None:
        return table, ""
    return analyzer.load_prices(), " (prices.toml: not published yet, `tracetune analyzer` publishes it)"


def _cost_by_kind_chart(costs: pl.DataFrame, show_pipeline: bool, currency: str) -> None:
    data = frames.cost_split(costs, show_pipeline)
    chart = alt.Chart(data).mark_bar().encode(
        x=alt.X("per_1k:Q", title=f"cost per 1k requests ({currency})", stack="zero"),
        y=alt.Y("series:N", title="step", sort=None, axis=alt.Axis(labelLimit=320)),
        color=alt.Color("kind:N", title="cost", sort=list(frames.COST_SPLIT.values())),
        tooltip=["series:N", "kind:N", alt.Tooltip("per_1k:Q", format=".4g")],
    )
    st.altair_chart(chart, width="stretch")


def _cost_over_time_chart(over_time: pl.DataFrame, bucket_seconds: int, currency: str) -> None:
    data = over_time.select("bucket", "pipeline", "requests", "cost", "cost_per_1k")
    chart = alt.Chart(data).mark_line(point=True).encode(
        x=_time_axis(bucket_seconds),
        y=alt.Y("cost_per_1k:Q", title=f"cost per 1k requests ({currency})"),
        color=alt.Color("pipeline:N"),
        tooltip=["pipeline:N", alt.Tooltip("bucket:T", format="%H:%M:%S"), "requests:Q",
                 alt.Tooltip("cost:Q", format=".4g"), alt.Tooltip("cost_per_1k:Q", format=".4g")],
    )
    st.altair_chart(chart, width="stretch")


def cost(settings: Settings, window: str, pipeline: str) -> None:
    """Cost per 1k requests by pipeline and by step/route, split into tokens, compute and per-call prices."""
    show_pipeline, name = _scope(pipeline)
    bucket = BUCKET_SECONDS[window]
    try:
        prices, note = _prices(settings)
        by_pipeline = query(settings, cost_per_1k, since=window, by=("pipeline",), pipeline=name, prices=prices,
                            source="rollup")
        by_step = query(settings, cost_per_1k, since=window, by=("pipeline", "step", "route"), pipeline=name,
                        prices=prices, source="rollup")
        over_time = query(settings, cost_over_time, since=window, bucket_seconds=bucket, pipeline=name,
                          prices=prices)
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    except PricesError as exc:
        st.info(f"No cost without prices: {exc}")
        return
    currency = prices.currency
    st.caption(f"Prices: version {prices.version} · {currency}{note} · last {window}")
    requests = int(by_pipeline["requests"].sum() or 0)
    if requests == 0:
        st.info(f"No requests in the last {window}{_for(pipeline)} yet: cost per 1k counts root spans "
                "(`tracetune.pipeline`, no parent).")
        return

    total = float(by_pipeline["cost"].sum())
    kinds = {label: float(by_pipeline[column].sum()) for column, label in frames.COST_SPLIT.items()}
    per_1k, spent, count, biggest = st.columns(4)
    per_1k.metric(f"Cost per 1k requests ({currency})", format_money(1000 * total / requests, currency),
                  help="1000 × cost of the window's requests ÷ their number (docs/cost.md).")
    spent.metric(f"Total cost ({currency})", format_money(total, currency))
    count.metric("Priced requests", f"{requests:,}")
    top_kind = max(kinds, key=lambda k: kinds[k])
    biggest.metric("Largest part", f"{top_kind} · {100 * kinds[top_kind] / total:.0f} %" if total else "–",
                   help="Token, compute or per-call share of the total cost.")

    unpriced = by_step.filter(pl.col("unpriced_spans") > 0)
    if not unpriced.is_empty():
        where = ", ".join(f"{r['pipeline']}/{r['step']} (route {r['route'] or '–'})" for r in unpriced.to_dicts())
        st.warning(f"{int(unpriced['unpriced_spans'].sum())} step spans have a route or model that price version "
                   f"{prices.version} does not list, counted at 0: {where}. Add them to prices.toml.")

    money = {"cost per 1k": _MONEY, "total cost": _MONEY, "compute s": st.column_config.NumberColumn(format="%.3f"),
             **{f"{label} per 1k": _MONEY for label in frames.COST_SPLIT.values()},
             "requests": _COUNT, "spans": _COUNT, "tokens": _COUNT}
    st.subheader(f"Cost per 1k requests by pipeline ({currency})")
    st.dataframe(frames.cost_table(by_pipeline, ["pipeline"], True), hide_index=True, column_config=money)
    st.subheader(f"By step and route ({currency} per 1k requests of the pipeline)")
    st.dataframe(frames.cost_table(by_step, ["pipeline", "step", "route"], show_pipeline), hide_index=True,
                 column_config=money)
    st.subheader("Tokens, compute and per-call cost per step")
    _cost_by_kind_chart(by_step, show_pipeline, currency)
    st.subheader("Cost per 1k requests over time")
    _cost_over_time_chart(over_time, bucket, currency)


# ---- critical path ---------------------------------------------------------------------------

def _critical_chart(breakdown: pl.DataFrame, show_pipeline: bool) -> None:
    data = with_series(breakdown, show_pipeline).select(
        "series", "pipeline", "step", (pl.col("critical_share") * 100).alias("share"), "mean_critical_ms")
    chart = alt.Chart(data).mark_bar().encode(
        x=alt.X("share:Q", title="share of request time on the critical path (%)"),
        y=alt.Y("series:N", title="step", sort="-x", axis=alt.Axis(labelLimit=320)),
        color=alt.Color("pipeline:N"),
        tooltip=["series:N", alt.Tooltip("share:Q", format=".1f"), alt.Tooltip("mean_critical_ms:Q", format=".1f")],
    )
    st.altair_chart(chart, width="stretch")


def critical_path(settings: Settings, window: str, pipeline: str) -> None:
    """Which step the requests' time goes to: critical-path share per step, from sampled traces."""
    show_pipeline, name = _scope(pipeline)
    try:
        breakdown = query(settings, step_breakdown, since=window, pipeline=name)
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    if breakdown.is_empty():
        st.info(f"No requests in the last {window}{_for(pipeline)} yet: the critical path needs root spans "
                "with their step spans.")
        return
    top = frames.top_steps(breakdown)
    for column, row in zip(st.columns(min(4, len(top))) if top else [], top[:4], strict=False):
        column.metric(f"Biggest contributor · {row['pipeline']}",
                      f"{row['step']} · {100 * row['critical_share']:.0f} %",
                      help="Share of the pipeline's request time spent on this step's critical path.")
    sampled = breakdown.group_by("pipeline").agg(pl.col("sampled_traces").first()).sort("pipeline")
    st.caption("Requests sampled: " + ", ".join(f"{r['pipeline']} {r['sampled_traces']:,}" for r in sampled.to_dicts())
               + f" (at most {analyzer.traces.MAX_TRACES:,} per call, spread over the window). "
               f"{analyzer.ROOT_STEP} is time outside every step.")
    st.dataframe(frames.critical_table(breakdown, show_pipeline), hide_index=True, column_config={
        "traces": _COUNT, "self ms": _MS, "critical ms": _MS, "critical %": _PCT, "slowest 5% %": _PCT})
    st.subheader("Critical-path share per step")
    _critical_chart(breakdown, show_pipeline)


# ---- drift -----------------------------------------------------------------------------------

@st.cache_data(ttl=DRIFT_RECOMPUTE_SECONDS, show_spinner=False)
def _computed_drift(target: tuple, pipeline: str, _settings: Settings) -> pl.DataFrame:
    """current_drift as the analyzer loop computes it, when no stored run exists yet (kept a minute)."""
    return query(_settings, current_drift, current=DRIFT_CURRENT, pipeline=pipeline)


def drift(settings: Settings, window: str, pipeline: str) -> None:
    """Verdict per step feature (and step latency): the analyzer's latest run, else computed now."""
    show_pipeline, name = _scope(pipeline)
    try:
        results = query(settings, latest_drift, pipeline=name)
        stored = not results.is_empty()
        if not stored:
            results = _computed_drift(target_key(settings), name, settings)
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    if results.is_empty():
        st.info(f"No step spans in the last {DRIFT_CURRENT} nor in its reference{_for(pipeline)}: nothing to "
                "compare yet.")
        return
    first = results.row(0, named=True)
    references = sorted({analyzer.reference_label(row) for row in results.iter_rows(named=True)})
    span = (f"current {first['current_start']:%Y-%m-%d %H:%M:%S} – {first['current_end']:%H:%M:%S} UTC vs "
            + "; ".join(references))
    source = (f"Analyzer run of {results['computed_at'].max():%Y-%m-%d %H:%M:%S} UTC" if stored else
              "No stored analyzer run yet; computed now")
    st.caption(f"{source}: {span} (a pipeline's pinned baseline, else the preceding window of the same length: "
               "`tracetune drift baseline set`). The sidebar window does not apply here.")

    table = frames.drift_table(results, show_pipeline)
    counts = dict(table.group_by("status").len().iter_rows())
    for column, status in zip(st.columns(4), analyzer.drift.STATUSES, strict=True):
        column.metric(status.replace("_", " ").capitalize(), f"{counts.get(status, 0)}",
                      help="Features whose worst statistic says so.")
    st.dataframe(_coloured(table, "status"), hide_index=True, column_config={
        "value": st.column_config.NumberColumn("statistic value", format="%.4f"),
        "p_value": st.column_config.NumberColumn("p-value", format="%.4f"),
        "n_reference": st.column_config.NumberColumn("reference n", format="%d"),
        "n_current": st.column_config.NumberColumn("current n", format="%d")})
    limits = analyzer.Thresholds()
    st.caption("psi: population stability index (numeric, latency); js: Jensen–Shannon distance (categorical); "
               "p-value of KS (numeric) or chi-square (categorical). insufficient data: under "
               f"{limits.min_samples} samples in a window ({limits.psi_min_samples} for psi). Step latency drifts "
               "only if it moves by at least 1 ms and 20% of its median.")
    try:
        flags = query(settings, drift_flags, since=DRIFT_FLAGS_WINDOW, pipeline=name)
    except StoreUnavailable:
        return
    if not flags.is_empty():
        st.subheader(f"Flagged by analyzer runs in the last {DRIFT_FLAGS_WINDOW}")
        st.caption("Against the preceding window a change shows for a run or two, until both windows hold the new "
                   "traffic; these are the features any run flagged.")
        st.dataframe(_coloured(flags if show_pipeline else flags.drop("pipeline"), "worst"), hide_index=True)


# ---- SLOs ------------------------------------------------------------------------------------

def slos(settings: Settings, window: str, pipeline: str) -> None:
    """Burn rate over each window pair of each SLO objective, the rules firing and the budget left."""
    show_pipeline, name = _scope(pipeline)
    try:
        saved = [s for s in query(settings, list_slos) if not name or s.pipeline == name]
        statuses = [query(settings, slo_status, pipeline=s.pipeline, slo=s) for s in saved]
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    except SLOError as exc:
        st.warning(str(exc))
        return
    if not saved:
        target = name or "<pipeline>"
        st.info(f"No SLO set{_for(pipeline)}. Set one on the tuner with `PUT /v1/pipelines/{target}/slo` "
                "(p95_ms, p99_ms, error_rate or objective).")
        return
    status = pl.concat(statuses)
    firing = status.filter("firing")
    budgets = status.unique(["pipeline", "slo"], keep="first", maintain_order=True)
    rules, pages, budget = st.columns(3)
    rules.metric("Alert rules firing", f"{firing.height} of {status.height}",
                 help="A rule whose long window is longer than the pipeline's data does not fire (not enough data).")
    pages.metric("Pages firing", f"{firing.filter(pl.col('severity') == 'page').height}")
    with_data = budgets.filter(pl.col("budget_remaining").is_not_nan())
    if with_data.is_empty():
        budget.metric("Lowest budget left", "no data", help="No task in the SLO period yet.")
    else:
        lowest = with_data.sort("budget_remaining").row(0, named=True)
        budget.metric(f"Lowest budget left · {lowest['pipeline']} {lowest['slo']}",
                      f"{100 * lowest['budget_remaining']:.0f} %",
                      help=f"Error budget left over the {data_note(lowest['data_seconds'], lowest['period_days'])} "
                           f"of the {lowest['period_days']:g}-day period; below 0: overspent.")
    if firing.is_empty():
        st.success("No burn-rate alert is firing.")
    else:
        st.warning("Firing: " + "; ".join(
            f"{r['pipeline']} {r['slo']} {r['severity']} (burn {r['long_burn_rate']:.1f}× over {r['long_window']}, "
            f"{r['short_burn_rate']:.1f}× over {r['short_window']}, factor {r['factor']:g})"
            for r in firing.to_dicts()))
    notes = sorted({f"{r['pipeline']} over {data_note(r['data_seconds'], r['period_days'])}"
                    for r in budgets.iter_rows(named=True)})
    refused = sorted({(r["pipeline"], r["period_client_errors"]) for r in budgets.iter_rows(named=True)
                      if r["slo"] == "availability" and r["period_client_errors"]})
    st.caption(f"Periods: {', '.join(sorted({f'{d:g} days' for d in status['period_days']}))}; budgets count only "
               f"the time with data ({'; '.join(notes)}). A rule fires when the burn rate over both its long and "
               "short window is above its factor (SRE workbook), and only once the data covers its long window."
               + "".join(f" {p}: {n:,} client errors (invalid input) are not counted as unavailability."
                         for p, n in refused))
    st.dataframe(_coloured(frames.slo_table(status, show_pipeline), "state"), hide_index=True, column_config={
        "target ms": _MS, "objective %": st.column_config.NumberColumn(format="%.2f %%"),
        "burn factor": st.column_config.NumberColumn(format="%.2f"),
        "long burn": st.column_config.NumberColumn(format="%.2f"),
        "short burn": st.column_config.NumberColumn(format="%.2f"),
        "requests": _COUNT, "budget left %": _PCT})


def _since(moment) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment is not None else ""


def alerts(settings: Settings, window: str, pipeline: str) -> None:
    """What on-call was told: alerts firing and pending (silenced ones marked), those resolved in the last
    hour, the silences, and every notification's delivery to each receiver."""
    _, name = _scope(pipeline)
    try:
        found = query(settings, alerting.current_alerts)
        silences = query(settings, alerting.list_silences)
        log = query(settings, delivery.deliveries, limit=200)
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    shown = sorted((a for a in found.values() if not name or a.labels.get("pipeline") == name),
                   key=lambda a: ({"firing": 0, "pending": 1}.get(a.state, 2), a.active_at))
    firing = [a for a in shown if a.state == "firing"]
    failing = [d for d in log if d["status"] in ("retrying", "failed")]
    count, pages, broken = st.columns(3)
    count.metric("Alerts firing", f"{len(firing)}")
    pages.metric("Pages firing", f"{sum(a.labels.get('severity') == 'page' for a in firing)}")
    broken.metric("Deliveries retrying or failed", f"{len(failing)}",
                  help="`tracetune alerts deliveries` shows each attempt and the receiver's answer.")
    if not shown:
        st.info(f"No alert is firing or pending{_for(pipeline)}.")
    else:
        now = datetime.now(UTC)
        st.dataframe(pl.DataFrame([{
            "state": a.state + (" (silenced)" if a.silenced_by(silences, now) else ""),
            "alert": a.labels.get("alertname", ""), "pipeline": a.labels.get("pipeline", ""),
            "severity": a.labels.get("severity", ""), "since": _since(a.resolved_at or a.fired_at or a.active_at),
            "summary": a.annotations.get("summary", ""), "description": a.annotations.get("description", "")}
            for a in shown]), hide_index=True)
    st.subheader("Silences")
    if silences:
        st.dataframe(pl.DataFrame([{
            "matchers": " ".join(str(m) for m in s.matchers), "state": s.to_dict()["status"]["state"],
            "ends": _since(s.ends_at), "by": s.created_by, "comment": s.comment, "id": s.silence_id}
            for s in silences]), hide_index=True)
    else:
        st.caption("No silence. `tracetune alerts silence pipeline=NAME --for 2h` adds one.")
    st.subheader("Deliveries")
    if log:
        st.dataframe(pl.DataFrame([{
            "when": _since(d["created_at"]), "receiver": d["receiver"], "group": d["group_key"],
            "notification": d["notification_status"], "state": d["status"], "attempts": d["attempts"],
            "HTTP": d["http_status"], "error": d["error"] or ""} for d in log]), hide_index=True)
    else:
        st.caption("Nothing sent yet. Receivers: `alert_webhook_url`, `alert_slack_url`, "
                   "`alert_pagerduty_routing_key`; `tracetune alerts test` checks them.")


TABS: dict[str, Callable[[Settings, str, str], None]] = {
    "Latency": latency, "Cost": cost, "Critical path": critical_path, "Drift": drift, "SLOs": slos,
    "Alerts": alerts,
}

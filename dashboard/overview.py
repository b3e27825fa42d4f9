"""Overview: per pipeline, is the SLO on track (in words), how end-to-end p95 and cost per 1k move against
the SLO and the budget with the tuner's decisions marked, where the money goes, and what is alerting."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import streamlit as st

from tracetune import analyzer
from tracetune.analyzer import SLOError, alerts
from tracetune.dashboard import charts, frames, pricing, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable
from tracetune.tuner import decisions, versions

TOP_CONTRIBUTORS = 5
DECISIONS_READ = 200  # a pipeline's newest decisions read for the marks (those in the range are drawn)
HEADLINES_PER_ROW = 4
PANEL_WIDTH, PANEL_HEIGHT = 380, 150  # each pipeline's panel (px), two side by side at 1400 px


def _slo_calls(ctx: Context, saved: list[analyzer.SLO]) -> list[tuple]:
    return [(analyzer.slo_status, {"pipeline": s.pipeline, "slo": s, "tenant": ctx.filters.tenant_name})
            for s in saved]


def _slo_section(ctx: Context, saved: list[analyzer.SLO]) -> pl.DataFrame:
    f = ctx.filters
    statuses = [cached(ctx.settings, fn, **kwargs) for fn, kwargs in _slo_calls(ctx, saved)]
    status = pl.concat(statuses) if statuses else pl.DataFrame()
    words = frames.slo_words(status) if statuses else pl.DataFrame()
    st.subheader("SLOs")
    if words.is_empty():
        target = f.pipeline_name or "<pipeline>"
        st.info(f"No SLO set{f.scope()}. Set one on the tuner with `PUT /v1/pipelines/{target}/slo` "
                "(p95_ms, p99_ms, error_rate, cost_per_1k).")
        return words
    worst = frames.worst_state(words)
    for column, (pipeline, sentence) in zip(st.columns(min(4, len(worst))), list(worst.items())[:4], strict=False):
        column.metric(f"SLO · {pipeline}", sentence.split(":")[0].capitalize(), help=sentence, border=True)
    shown = words.select("pipeline", "objective", "target", "status", "state")
    ui.table(ui.coloured(shown, "state", frames.STATE_COLOURS),
             {"status": st.column_config.TextColumn("how it stands")})
    st.caption("Budget left is over the SLO period's tasks so far; \"at this burn\" is the pace of the last "
               f"{words['window'][0]} (errors or slow tasks against what the budget allows).")
    return words


def _decisions(ctx: Context, pipelines: list[str], window: tuple[datetime, datetime]) -> pl.DataFrame:
    rows = []
    for pipeline in pipelines:
        for d in cached(ctx.settings, decisions.history, pipeline=pipeline, limit=DECISIONS_READ):
            if d["decided_at"] >= window[0]:
                rows.append({"pipeline": pipeline, "kind": d["kind"], "reason": frames.readable(d["reason"]),
                             "decided_at": d["decided_at"]})
    return pl.DataFrame(rows, schema={"pipeline": pl.Utf8, "kind": pl.Utf8, "reason": pl.Utf8,
                                      "decided_at": pl.Datetime("us", "UTC")})


def _headline(pipelines: list[str], cost: pl.DataFrame, tasks: pl.DataFrame, saved: list[analyzer.SLO],
              currency: str) -> None:
    """Per pipeline: cost per 1k requests over the range against its budget, and its tasks' p95."""
    budgets = {s.pipeline: s.cost_per_1k for s in saved if s.cost_per_1k is not None}
    per_1k = {r["pipeline"]: r["cost_per_1k"] for r in cost.iter_rows(named=True)}
    for row in range(0, len(pipelines), HEADLINES_PER_ROW):
        for column, pipeline in zip(st.columns(HEADLINES_PER_ROW), pipelines[row:row + HEADLINES_PER_ROW],
                                    strict=False):
            value, budget = per_1k.get(pipeline), budgets.get(pipeline)
            said = (f"{100 * value / budget:.0f}% of the {frames.format_money(budget, currency)} budget"
                    if value is not None and budget else "no budget set" if value is not None else None)
            column.metric(pipeline,
                          frames.format_money(value, currency) if value is not None else "no requests",
                          delta=said, delta_color="red" if value is not None and budget and value > budget
                          else "green" if value is not None and budget else "gray", delta_arrow="off", border=True,
                          help=f"1000 × the cost of {pipeline}'s requests in the range ÷ their number "
                               f"({tasks.filter(pl.col('pipeline') == pipeline)['requests'].sum():,} requests).")


def render(ctx: Context) -> None:
    f = ctx.filters
    window = ui.window(f, datetime.now(UTC))
    bucket = ui.bucket_seconds(f)
    series = {"since": f.since, "pipeline": f.pipeline_name, "tenant": f.tenant_name, "bucket_seconds": bucket,
              "tasks_only": True}
    cells = {"since": f.since, "pipeline": f.pipeline_name, "bucket_seconds": bucket}
    prefetch(ctx.settings, [(analyzer.list_slos, {}), (analyzer.step_series, series), (versions.pipelines, {}),
                            (alerts.current_alerts, {}), (analyzer.current_prices, {}), (analyzer.cost_cells, cells)])
    try:
        saved = [s for s in cached(ctx.settings, analyzer.list_slos)
                 if not f.pipeline_name or s.pipeline == f.pipeline_name]
        tasks = cached(ctx.settings, analyzer.step_series, **series)
        declared = [p["pipeline"] for p in cached(ctx.settings, versions.pipelines)]
        open_alerts = cached(ctx.settings, alerts.current_alerts)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    tasks = tasks.filter(pl.col("step") == analyzer.END_TO_END)
    pipelines = sorted(set(tasks["pipeline"]) | {s.pipeline for s in saved})
    prefetch(ctx.settings, [*_slo_calls(ctx, saved), *((decisions.history, {"pipeline": p, "limit": DECISIONS_READ})
                                                       for p in pipelines if p in declared)])
    try:
        _slo_section(ctx, saved)
    except (StoreUnavailable, SLOError) as problem:
        st.warning(str(problem))

    if tasks.is_empty():
        st.subheader("End-to-end p95 and cost per 1k requests")
        st.info(f"No tasks in the last {f.since}{f.scope()} yet. Start `tracetune demo`, or point an "
                "OpenTelemetry exporter at the collector.")
        _alerts(open_alerts, f.pipeline_name)
        return
    marks = _decisions(ctx, [p for p in pipelines if p in declared], window)
    over_time, table, note = pl.DataFrame(), None, ""
    try:
        table, note = pricing.table(ctx.settings)
        cells = cached(ctx.settings, analyzer.cost_cells, **cells)
    except analyzer.PricesError as exc:
        st.info(f"No cost without prices: {exc}")
    else:
        st.subheader("Cost per 1k requests")
        _headline(pipelines, analyzer.cost_by(cells, table, ("pipeline",), tenant=f.tenant_name), tasks, saved,
                  table.currency)
        over_time = analyzer.cost_by(cells, table, ("pipeline",), tenant=f.tenant_name, over_time=True).filter(
            pl.col("requests") > 0)

    st.subheader("End-to-end p95 and cost per 1k requests, per pipeline")
    cost_words = f"cost per 1k requests ({table.currency}, prices {table.version}{note})" if table else ""
    st.caption("One row per pipeline, each on its own scale. Left: p95 latency of whole tasks (ms)" +
               (f"; right: {cost_words}" if table else "") +
               ". Dashed: the SLO target or the budget; dotted: that pipeline's tuner decisions (the Tuner page "
               "says what each did and why).")
    p95_targets = pl.DataFrame([{"pipeline": s.pipeline, "p95_ms": s.p95_ms} for s in saved if s.p95_ms],
                               schema={"pipeline": pl.Utf8, "p95_ms": pl.Float64})
    budgets = pl.DataFrame([{"pipeline": s.pipeline, "cost_per_1k": s.cost_per_1k} for s in saved
                            if s.cost_per_1k is not None], schema={"pipeline": pl.Utf8, "cost_per_1k": pl.Float64})
    left, right = st.columns(2)
    with left:
        points = frames.with_gaps(tasks.select("bucket", "pipeline", "p95_ms"), ["pipeline"], bucket)
        ui.chart(charts.pipeline_panels(points, "p95_ms", "p95 (ms)", window, p95_targets, "SLO p95", marks,
                                        PANEL_WIDTH, PANEL_HEIGHT))
    with right:
        if table is not None and not over_time.is_empty():
            points = frames.with_gaps(over_time.select("bucket", "pipeline", "cost_per_1k"), ["pipeline"], bucket)
            ui.chart(charts.pipeline_panels(points, "cost_per_1k", f"cost per 1k ({table.currency})", window,
                                            budgets, "budget", marks, PANEL_WIDTH, PANEL_HEIGHT))
    if table is not None:
        _contributors(cells, table, f.tenant_name)
    _alerts(open_alerts, f.pipeline_name)


def _contributors(cells: pl.DataFrame, table, tenant: str) -> None:
    by_step = analyzer.cost_by(cells, table, ("pipeline", "step", "route"), tenant=tenant)
    total = float(by_step["cost"].sum())
    st.subheader("Top cost contributors")
    if total <= 0:
        st.caption("Nothing priced in the window.")
        return
    top = (frames.label(by_step, ["pipeline", "step", "route"], "contributor")
           .with_columns((100 * pl.col("cost") / total).alias("share %"))
           .sort("cost", descending=True).head(TOP_CONTRIBUTORS))
    ui.chart(charts.bars(top, "share %", "share of the window's cost (%)", "contributor", "pipeline / step / route"))


def _alerts(found: dict, pipeline: str) -> None:
    st.subheader("Open alerts")
    shown = sorted((a for a in found.values() if a.state in ("firing", "pending")
                    and (not pipeline or a.labels.get("pipeline") == pipeline)),
                   key=lambda a: ({"firing": 0, "pending": 1}[a.state], a.active_at))
    if not shown:
        st.success("No alert is firing or pending.")
        return
    ui.table(pl.DataFrame([{"state": a.state, "alert": a.labels.get("alertname", ""),
                            "pipeline": a.labels.get("pipeline", ""), "severity": a.labels.get("severity", ""),
                            "since (UTC)": f"{a.fired_at or a.active_at:%Y-%m-%d %H:%M}",
                            "summary": a.annotations.get("summary", "")} for a in shown]))


if __name__ == "__main__":
    run(render)

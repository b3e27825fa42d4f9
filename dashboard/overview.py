"""Overview: per pipeline, is the SLO on track (in words), how end-to-end p95 and cost per 1k move against
the SLO and the budget with the tuner's decisions marked, where the money goes, and what is alerting."""

from __future__ import annotations

from datetime import UTC, datetime

import altair as alt
import polars as pl
import streamlit as st

from tracetune import analyzer
from tracetune.analyzer import SLOError, alerts
from tracetune.dashboard import charts, frames, pricing, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.queries import StoreUnavailable, cached, show_unavailable
from tracetune.tuner import decisions, versions

TOP_CONTRIBUTORS = 5
HEADLINES_PER_ROW = 4
PANEL_HEIGHT = 180


def _slo_section(ctx: Context, saved: list[analyzer.SLO]) -> pl.DataFrame:
    f = ctx.filters
    statuses = [cached(ctx.settings, analyzer.slo_status, pipeline=s.pipeline, slo=s, tenant=f.tenant_name)
                for s in saved]
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
             {"status": st.column_config.TextColumn("how it stands", width="large")})
    st.caption("Budget left is over the SLO period's tasks so far; \"at this burn\" is the pace of the last "
               f"{words['window'][0]} (errors or slow tasks against what the budget allows).")
    return words


def _decisions(ctx: Context, pipelines: list[str], window: tuple[datetime, datetime]) -> pl.DataFrame:
    rows = []
    for pipeline in pipelines:
        for d in cached(ctx.settings, decisions.history, pipeline=pipeline, limit=200):
            if d["decided_at"] >= window[0]:
                rows.append({"pipeline": pipeline, "kind": d["kind"], "reason": frames.readable(d["reason"]),
                             "decided_at": d["decided_at"]})
    return pl.DataFrame(rows, schema={"pipeline": pl.Utf8, "kind": pl.Utf8, "reason": pl.Utf8,
                                      "decided_at": pl.Datetime("us", "UTC")})


def _trend(series: pl.DataFrame, y: str, title: str, window, target: float | None, target_label: str,
           marks: pl.DataFrame, bucket: int) -> None:
    """One pipeline's line (broken at gaps) on its own scale, its target dashed, its tuner decisions dotted."""
    data = frames.with_gaps(series.rename({"pipeline": "series"}), ["series"], bucket)
    layers = [charts.time_lines(data, y, title, window, color_title="pipeline", legend=False)]
    if target is not None:
        layers.append(charts.target_rules(pl.DataFrame({"pipeline": [pipeline_of(series)], y: [target]}), y,
                                          target_label))
    if not marks.is_empty():
        layers.append(charts.decision_rules(marks))
    ui.chart(alt.layer(*layers).properties(height=PANEL_HEIGHT))


def pipeline_of(series: pl.DataFrame) -> str:
    return series["pipeline"][0]


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
            column.metric(f"Cost per 1k requests · {pipeline}",
                          frames.format_money(value, currency) if value is not None else "no requests",
                          delta=said, delta_color="red" if value is not None and budget and value > budget
                          else "green" if value is not None and budget else "gray", delta_arrow="off", border=True,
                          help=f"1000 × the cost of {pipeline}'s requests in the range ÷ their number "
                               f"({tasks.filter(pl.col('pipeline') == pipeline)['requests'].sum():,} requests).")


def render(ctx: Context) -> None:
    f = ctx.filters
    window = ui.window(f, datetime.now(UTC))
    bucket = ui.bucket_seconds(f)
    try:
        saved = [s for s in cached(ctx.settings, analyzer.list_slos)
                 if not f.pipeline_name or s.pipeline == f.pipeline_name]
        tasks = cached(ctx.settings, analyzer.step_series, since=f.since, pipeline=f.pipeline_name,
                       tenant=f.tenant_name, bucket_seconds=bucket)
        declared = [p["pipeline"] for p in cached(ctx.settings, versions.pipelines)]
        open_alerts = cached(ctx.settings, alerts.current_alerts)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    tasks = tasks.filter(pl.col("step") == analyzer.END_TO_END)
    pipelines = sorted(set(tasks["pipeline"]) | {s.pipeline for s in saved})
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
    over_time, cells, table, note = pl.DataFrame(), None, None, ""
    try:
        table, note = pricing.table(ctx.settings)
        cells = cached(ctx.settings, analyzer.cost_cells, since=f.since, pipeline=f.pipeline_name,
                       bucket_seconds=bucket)
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
    st.caption("Each pipeline on its own scale. Left: p95 latency of whole tasks (ms)" +
               (f"; right: {cost_words}" if table else "") +
               ". Dashed: the SLO target or the budget; dotted: that pipeline's tuner decisions (the Tuner page "
               "says what each did and why).")
    slos = {s.pipeline: s for s in saved}
    for pipeline in pipelines:
        mine = marks.filter(pl.col("pipeline") == pipeline)
        slo = slos.get(pipeline)
        st.markdown(f"**{pipeline}**" + (f" · {mine.height} tuner decision{'s' if mine.height != 1 else ''} in the "
                                         "range" if mine.height else ""))
        left, right = st.columns(2)
        own = tasks.filter(pl.col("pipeline") == pipeline)
        with left:
            if own.is_empty():
                st.caption(f"No tasks of {pipeline} in the last {f.since}.")
            else:
                _trend(own.select("bucket", "pipeline", "p95_ms"), "p95_ms", "p95 (ms)", window,
                       slo.p95_ms if slo else None, "SLO p95", mine, bucket)
        with right:
            spent = over_time.filter(pl.col("pipeline") == pipeline) if table else pl.DataFrame()
            if not spent.is_empty():
                _trend(spent.select("bucket", "pipeline", "cost_per_1k"), "cost_per_1k",
                       f"cost per 1k ({table.currency})", window, slo.cost_per_1k if slo else None, "budget",
                       mine, bucket)
    if cells is not None:
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
                            "since": f"{a.fired_at or a.active_at:%Y-%m-%d %H:%M}",
                            "summary": a.annotations.get("summary", "")} for a in shown]))


if __name__ == "__main__":
    run(render)

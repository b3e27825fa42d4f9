"""Drift: per feature the verdict and which reference it was judged against, its statistic against the
warn and drift thresholds over the stored runs, and the reference vs current histograms."""

from __future__ import annotations

from datetime import UTC, datetime

import altair as alt
import polars as pl
import streamlit as st

from tracetune import analyzer
from tracetune.analyzer import Thresholds
from tracetune.dashboard import charts, frames, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable

# Drift has its own current window whatever the time range: the analyzer loop's, against each pipeline's
# pinned baseline or else its first hour of traffic (analyzer.AUTO_BASELINE). The range picks the history shown.
DRIFT_CURRENT = analyzer.DEFAULT_CURRENT
LEVEL_COLOURS = {"warn": "#b58105", "drift": "#b02a37"}


def thresholds_of(pipeline: str, step: str, feature: str, statistic: str) -> pl.DataFrame:
    """The warn and drift levels of a statistic as the analyzer loop judges it (defaults and feature defaults):
    rows of level, value; none for a statistic judged by a p-value."""
    limits = Thresholds.resolve(None, pipeline, step, feature)
    rows = [{"level": level, "value": getattr(limits, f"{statistic}_{level}")} for level in ("warn", "drift")
            if hasattr(limits, f"{statistic}_{level}") and getattr(limits, f"{statistic}_{level}") is not None]
    return pl.DataFrame(rows, schema={"level": pl.Utf8, "value": pl.Float64})


def levels_words(statistic: str, levels: pl.DataFrame) -> str:
    """What the dashed lines of the history chart are, naming a level the thresholds switch off."""
    drawn = {row["level"]: row["value"] for row in levels.iter_rows(named=True)}
    said = [f"{level} at {drawn[level]:g}" for level in ("warn", "drift") if level in drawn]
    off = [level for level in ("warn", "drift") if level not in drawn]
    text = f"dashed: {' and '.join(said)}." if said else f"{statistic} has no warn or drift level set."
    if said and off:
        text += f" {statistic} has no {off[0]} level set (a verdict on it comes from the other statistics)."
    return text


def _history_chart(history: pl.DataFrame, row: dict, window, since: str, run_seconds: float) -> None:
    statistic = frames.DRIFT_STATISTICS.get(row["kind"], "psi")
    points = history.filter((pl.col("pipeline") == row["pipeline"]) & (pl.col("step") == row["step"])
                            & (pl.col("feature") == row["feature"]) & (pl.col("statistic") == statistic))
    if points.is_empty():
        st.caption(f"No stored analyzer run in the last {since} has {statistic} for this feature (the analyzer "
                   "stores one every interval while `tracetune up` runs).")
        return
    data = frames.with_gaps(points.select(pl.col("computed_at").cast(pl.Datetime("us", "UTC")).alias("bucket"),
                                          pl.lit(statistic).alias("series"), "value", "status"),
                            ["series"], max(60, int(3 * run_seconds)))  # three missed runs: a gap
    lines = charts.time_lines(data, "value", f"{statistic} (reference vs current)", window, color_title="statistic")
    levels = thresholds_of(row["pipeline"], row["step"], row["feature"], statistic)
    layers = [lines]
    if not levels.is_empty():
        for level, colour in LEVEL_COLOURS.items():
            rules = alt.Chart(levels.filter(pl.col("level") == level)).encode(y="value:Q")
            layers += [rules.mark_rule(strokeDash=[6, 4], color=colour).encode(tooltip=["level:N", "value:Q"]),
                       rules.mark_text(align="left", dx=4, dy=-6, color=colour).encode(text="level:N",
                                                                                       x=alt.value(0))]
    ui.chart(alt.layer(*layers))
    st.caption(f"{statistic} of each stored analyzer run (one every {run_seconds:g} s while it runs); "
               f"{levels_words(statistic, levels)} A gap is time without runs.")


def _histograms(ctx: Context, row: dict) -> None:
    reference = (row["reference_start"], row["reference_end"])
    current = (row["current_start"], row["current_end"])
    samples = cached(ctx.settings, analyzer.feature_samples, pipeline=row["pipeline"], step=row["step"],
                     feature=row["feature"], reference=reference, current=current)
    kind = "categorical" if row["kind"] == "categorical" else "numeric"
    histogram = analyzer.feature_histograms(samples["reference"], samples["current"], kind)
    if histogram.is_empty() or histogram["count"].sum() == 0:
        st.caption("No values of this feature in either window any more.")
        return
    order = histogram.filter(pl.col("window") == "reference").sort("order")["bin"].to_list()
    chart = alt.Chart(histogram.with_columns((pl.col("share") * 100).alias("share %"))).mark_bar().encode(
        x=alt.X("bin:N", sort=order, title=row["feature"], axis=alt.Axis(labelLimit=0, labelAngle=-30)),
        xOffset=alt.XOffset("window:N", sort=["reference", "current"]),
        y=alt.Y("share %:Q", title="share of values (%)"),
        color=alt.Color("window:N", sort=["reference", "current"]),
        tooltip=["window:N", "bin:N", "count:Q", alt.Tooltip("share %:Q", format=".1f")])
    ui.chart(chart)
    st.caption(f"Reference {analyzer.reference_label(row)} · current {row['current_start']:%Y-%m-%d %H:%M:%S} – "
               f"{row['current_end']:%H:%M:%S} UTC; numeric values in the reference's deciles (as PSI bins them).")


def render(ctx: Context) -> None:
    f = ctx.filters
    window = ui.window(f, datetime.now(UTC))
    prefetch(ctx.settings, [(analyzer.latest_drift, {"pipeline": f.pipeline_name}),
                            (analyzer.drift_history, {"since": f.since, "pipeline": f.pipeline_name}),
                            (analyzer.drift_flags, {"since": f.since, "pipeline": f.pipeline_name})])
    try:
        results = cached(ctx.settings, analyzer.latest_drift, pipeline=f.pipeline_name)
        stored = not results.is_empty()
        if not stored:
            results = cached(ctx.settings, analyzer.current_drift, current=DRIFT_CURRENT, pipeline=f.pipeline_name)
        history = cached(ctx.settings, analyzer.drift_history, since=f.since, pipeline=f.pipeline_name)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    if results.is_empty():
        st.info(f"No step spans in the last {DRIFT_CURRENT} nor in its reference{f.scope()}: nothing to compare yet.")
        return
    references = sorted({f"{row['pipeline']}: {analyzer.reference_label(row)}"
                         for row in results.unique("pipeline").iter_rows(named=True)})
    source = (f"Analyzer run of {results['computed_at'].max():%Y-%m-%d %H:%M:%S} UTC" if stored else
              "No stored analyzer run yet; computed now")
    first = results.row(0, named=True)
    st.caption(f"{source}: current {first['current_start']:%Y-%m-%d %H:%M:%S} – {first['current_end']:%H:%M:%S} UTC. "
               "The range picks the history below; the verdicts are of the latest window.")
    st.markdown(f"**Reference used** (a pinned baseline, else the pipeline's first {analyzer.AUTO_BASELINE} of "
                "traffic, held until its owner moves it with `tracetune drift baseline set`): " + "; ".join(references))

    table = frames.drift_table(results, True)
    counts = dict(table.group_by("status").len().iter_rows())
    for column, status in zip(st.columns(4), analyzer.drift.STATUSES, strict=True):
        column.metric(frames.STATUS_WORDS.get(status, status).capitalize(), f"{counts.get(status, 0)}",
                      help="Features whose worst statistic says so.")
    shown = table if not f.pipeline_name else table.drop("pipeline")
    shown = shown.with_columns(pl.col("status").replace(frames.STATUS_WORDS)).drop("kind")  # the statistic says it
    ui.table(ui.coloured(shown, "status"), {
        "value": st.column_config.NumberColumn("statistic value", format="%.4f"),
        "p_value": st.column_config.NumberColumn("p-value", format="%.4f"),
        "n_reference": st.column_config.NumberColumn("reference n", format="%d"),
        "n_current": st.column_config.NumberColumn("current n", format="%d")})
    limits = Thresholds()
    st.caption("psi: population stability index (numeric, latency); js: Jensen–Shannon distance (categorical); "
               "p-value of KS (numeric) or chi-square (categorical). not enough data: under "
               f"{limits.min_samples} samples in a window ({limits.psi_min_samples} for psi).")

    flags = cached(ctx.settings, analyzer.drift_flags, since=f.since, pipeline=f.pipeline_name)
    if not flags.is_empty():
        st.subheader(f"Flagged by analyzer runs in the last {f.since}")
        st.caption("The features any run flagged (warn or drift) in the range, with the first and last run that did "
                   "(UTC).")
        flagged = flags.with_columns(pl.col(c).dt.strftime("%Y-%m-%d %H:%M:%S").alias(c)
                                     for c in ("first_flagged", "last_flagged"))
        ui.table(ui.coloured(flagged if not f.pipeline_name else flagged.drop("pipeline"), "worst"),
                 {"first_flagged": st.column_config.TextColumn("first flagged (UTC)"),
                  "last_flagged": st.column_config.TextColumn("last flagged (UTC)"), "runs": ui.COUNT})

    st.subheader("One feature")
    options = [f"{r['pipeline']} / {r['step']} / {r['feature']}" for r in table.iter_rows(named=True)] \
        if "pipeline" in table.columns else []
    chosen = st.selectbox("Feature", options, key="drift_feature")
    pipeline, step, feature = chosen.split(" / ")
    row = results.filter((pl.col("pipeline") == pipeline) & (pl.col("step") == step)
                         & (pl.col("feature") == feature)).row(0, named=True)
    try:
        _history_chart(history, row, window, f.since, ctx.settings.analyzer_interval_seconds)
        _histograms(ctx, row)
    except StoreUnavailable as problem:
        st.error(str(problem))


if __name__ == "__main__":
    run(render)

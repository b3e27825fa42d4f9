"""Chart building blocks every page uses, with the fixes users asked for built in.

- Time axes tick on whole minutes, hours or days chosen from the window (explicit tick values), each
  labelled at that resolution, so no two ticks carry the same label (no `23:38 | 23:38`).
- Lines break where no data came in: each run of consecutive buckets is its own line segment
  (`frames.with_gaps`), so an idle hour is a gap, not a straight line across it.
- Category axes never cut their labels (`labelLimit` 0: `ticket_triage / classify` stays whole).
- Targets (SLO, budget) are horizontal rules; tuner decisions are vertical rules on the time axis.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import altair as alt
import polars as pl

__all__ = ["TICKS", "bars", "decision_rules", "pipeline_panels", "target_rules", "tick_interval", "ticks", "time_axis",
           "time_lines"]

# (step, unit, seconds, label format): the first whose ticks over the window are at most MAX_TICKS wins.
# Ticks a day or more apart name the day too: 23:00 today and 23:00 yesterday are different ticks.
TICKS: tuple[tuple[int, str, int, str], ...] = (
    (1, "minute", 60, "%H:%M"), (2, "minute", 120, "%H:%M"), (5, "minute", 300, "%H:%M"),
    (10, "minute", 600, "%H:%M"), (15, "minute", 900, "%H:%M"), (30, "minute", 1800, "%H:%M"),
    (1, "hour", 3600, "%H:%M"), (2, "hour", 7200, "%H:%M"), (3, "hour", 10800, "%b %d %H:%M"),
    (6, "hour", 21600, "%b %d %H:%M"), (12, "hour", 43200, "%b %d %H:%M"), (1, "day", 86400, "%b %d"),
)
MAX_TICKS = 8


def tick_interval(window_seconds: int) -> tuple[int, str, str]:
    """(step, unit, label format) of the time axis for a window: whole units, at most MAX_TICKS of them."""
    for step, unit, seconds, fmt in TICKS:
        if window_seconds / seconds <= MAX_TICKS:
            return step, unit, fmt
    return 1, "day", "%b %d"


def _moment(moment: datetime) -> alt.DateTime:
    """A UTC instant as vega-lite reads it everywhere (plain numbers are not taken as times in scale domains)."""
    moment = moment.astimezone(UTC)
    return alt.DateTime(year=moment.year, month=moment.month, date=moment.day, hours=moment.hour,
                        minutes=moment.minute, seconds=moment.second, utc=True)


def ticks(window: tuple[datetime, datetime]) -> tuple[list[datetime], str]:
    """The tick instants of a window (whole units of tick_interval, in UTC) and their label format."""
    start, end = (moment.astimezone(UTC) for moment in window)
    step, unit, fmt = tick_interval(int((end - start).total_seconds()))
    size = timedelta(**{f"{unit}s": step})
    first = start.replace(second=0, microsecond=0)
    if unit in ("hour", "day"):
        first = first.replace(minute=0)
    if unit == "day":
        first = first.replace(hour=0)
    epoch = datetime(2000, 1, 1, tzinfo=UTC)  # whole multiples of the step: 10:00, 10:10, ... not 10:03, 10:13
    first = epoch + (first - epoch) // size * size
    found, moment = [], first
    while moment <= end:
        if moment >= start:
            found.append(moment)
        moment += size
    return found, fmt


def time_axis(window: tuple[datetime, datetime], title: str = "time") -> alt.X:
    """The whole window on the x axis (so idle ends show as empty), ticks from `ticks` (labels never repeat)."""
    instants, fmt = ticks(window)
    return alt.X("bucket:T", title=title, scale=alt.Scale(domain=[_moment(window[0]), _moment(window[1])]),
                 axis=alt.Axis(format=fmt, values=[_moment(t) for t in instants], labelOverlap=True, labelAngle=0))


def time_lines(data: pl.DataFrame, y: str, y_title: str, window: tuple[datetime, datetime], color: str = "series",
               color_title: str = "series", tooltip: list | None = None, legend: bool = True) -> alt.LayerChart:
    """A line per `color` value over `bucket`, broken at gaps (`segment`, from frames.with_gaps), with points;
    legend=False for a chart of one series whose title names it."""
    base = alt.Chart(data).encode(
        x=time_axis(window),
        y=alt.Y(f"{y}:Q", title=y_title),
        color=alt.Color(f"{color}:N", title=color_title, legend=alt.Legend(labelLimit=0, orient="bottom",
                                                                          columns=2) if legend else None),
        detail="segment:N",
        tooltip=tooltip or [f"{color}:N", alt.Tooltip("bucket:T", format="%Y-%m-%d %H:%M"),
                            alt.Tooltip(f"{y}:Q", format=".4g")],
    )
    return alt.layer(base.mark_line(), base.mark_point(filled=True, size=30))


def target_rules(targets: pl.DataFrame, y: str, label: str) -> alt.LayerChart:
    """Dashed horizontal lines at `y` (e.g. each pipeline's SLO p95), labelled `label: <name>`."""
    data = targets.with_columns(pl.concat_str(pl.lit(f"{label}: "), pl.col("pipeline")).alias("target"))
    base = alt.Chart(data).encode(y=alt.Y(f"{y}:Q"))
    return alt.layer(
        base.mark_rule(strokeDash=[6, 4], color="#b02a37").encode(
            tooltip=["target:N", alt.Tooltip(f"{y}:Q", format=".4g")]),
        base.mark_text(align="left", dx=4, dy=-6, color="#b02a37").encode(text="target:N", x=alt.value(0)),
    )


def decision_rules(decisions: pl.DataFrame) -> alt.Chart:
    """A vertical line at each tuner decision (`decided_at`), its kind and reason in the tooltip."""
    return alt.Chart(decisions.rename({"decided_at": "bucket"})).mark_rule(color="#6f42c1", strokeDash=[2, 2]).encode(
        x="bucket:T", tooltip=["pipeline:N", "kind:N", alt.Tooltip("bucket:T", format="%Y-%m-%d %H:%M:%S"),
                               "reason:N"])


def bars(data: pl.DataFrame, x: str, x_title: str, y: str, y_title: str, color: str | None = None,
         color_title: str = "", stack: bool = True) -> alt.Chart:
    """Horizontal bars, one row per `y` category, labels never cut; stacked by `color` if given."""
    encoding = {
        "x": alt.X(f"{x}:Q", title=x_title, stack="zero" if stack else None),
        "y": alt.Y(f"{y}:N", title=y_title, sort=None, axis=alt.Axis(labelLimit=0)),
        "tooltip": [f"{y}:N", alt.Tooltip(f"{x}:Q", format=".4g")],
    }
    if color:
        encoding["color"] = alt.Color(f"{color}:N", title=color_title, legend=alt.Legend(labelLimit=0))
        encoding["tooltip"] = [f"{y}:N", f"{color}:N", alt.Tooltip(f"{x}:Q", format=".4g")]
        if not stack:
            encoding["yOffset"] = alt.YOffset(f"{color}:N")
    return alt.Chart(data).mark_bar().encode(**encoding)


def pipeline_panels(points: pl.DataFrame, y: str, y_title: str, window: tuple[datetime, datetime],
                    targets: pl.DataFrame, target_label: str, decisions: pl.DataFrame, width: int,
                    height: int) -> alt.FacetChart:
    """One panel per pipeline, each on its own y scale (a 0.11 pipeline does not flatten the others): its line
    (broken at gaps: `segment` from frames.with_gaps) over `bucket`, its target as a dashed rule, its decisions
    as dotted vertical rules. One chart of one dataset (a `row` column says which layer a row is for), so the
    page builds one spec, not one per pipeline.

    points: bucket, pipeline, `y`, segment; targets: pipeline, `y`; decisions: pipeline, decided_at, kind, reason.
    """
    rows = [points.select("pipeline", "bucket", pl.col(y).cast(pl.Float64), "segment",
                          pl.lit("point").alias("row"))]
    if not targets.is_empty():
        rows.append(targets.select("pipeline", pl.col(y).cast(pl.Float64), pl.lit("target").alias("row")).with_columns(
            label=pl.Series([f"{target_label} {value:,.0f}" if abs(value) >= 1000 else f"{target_label} {value:.4g}"
                             for value in targets[y].to_list()], dtype=pl.Utf8)))
    if not decisions.is_empty():
        rows.append(decisions.select("pipeline", pl.col("decided_at").alias("bucket"), "kind", "reason",
                                     pl.lit("decision").alias("row")))
    data = pl.concat(rows, how="diagonal_relaxed")
    x = time_axis(window)
    point = alt.datum.row == "point"
    base = alt.Chart()
    layers = [
        base.mark_line().encode(x=x, y=alt.Y(f"{y}:Q", title=y_title), detail="segment:N").transform_filter(point),
        base.mark_point(filled=True, size=30).encode(
            x=x, y=alt.Y(f"{y}:Q"), tooltip=["pipeline:N", alt.Tooltip("bucket:T", format="%Y-%m-%d %H:%M"),
                                            alt.Tooltip(f"{y}:Q", format=".4g")]).transform_filter(point),
    ]
    if "label" in data.columns:
        target = alt.datum.row == "target"
        layers += [base.mark_rule(strokeDash=[6, 4], color="#b02a37").encode(
                       y=alt.Y(f"{y}:Q"), tooltip=["label:N"]).transform_filter(target),
                   base.mark_text(align="left", dx=4, dy=-6, color="#b02a37").encode(
                       y=alt.Y(f"{y}:Q"), text="label:N", x=alt.value(0)).transform_filter(target)]
    if "kind" in data.columns:
        layers.append(base.mark_rule(color="#6f42c1", strokeDash=[2, 2]).encode(
            x="bucket:T", tooltip=["pipeline:N", "kind:N", alt.Tooltip("bucket:T", format="%Y-%m-%d %H:%M:%S"),
                                   "reason:N"]).transform_filter(alt.datum.row == "decision"))
    return (alt.layer(*layers, data=data).properties(width=width, height=height)
            .facet(row=alt.Row("pipeline:N", title=None, sort="ascending",
                               header=alt.Header(labelAngle=0, labelAlign="left", labelAnchor="start",
                                                 labelOrient="top", labelFontWeight="bold", labelFontSize=13)))
            .resolve_scale(y="independent"))

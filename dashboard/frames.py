"""Pure shaping of analyzer frames into what the dashboard shows: no Streamlit, no I/O.

Each function takes the frame an analyzer function returned and gives back the table, chart data
or headline figures of one tab, so the arithmetic can be checked without a browser or a server.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracetune.analyzer.drift import STATUSES
from tracetune.analyzer.stats import END_TO_END

__all__ = ["COST_SPLIT", "DRIFT_STATISTICS", "STATUS_COLOURS", "cost_split", "cost_table", "critical_table",
           "drift_table", "format_money", "format_ms", "headline", "slo_table", "step_table", "top_steps",
           "with_series"]

# Cost kinds in the order they stack, as the analyzer's column names and as the legend says them.
COST_SPLIT = {"token_cost": "tokens", "compute_cost": "compute", "call_cost": "per call"}
# Background and text colour of each drift verdict / SLO state cell.
STATUS_COLOURS = {
    "drift": ("#f8d7da", "#842029"), "warn": ("#fff3cd", "#664d03"), "ok": ("#d1e7dd", "#0f5132"),
    "insufficient_data": ("#e9ecef", "#495057"), "firing": ("#f8d7da", "#842029"),
    "not enough data": ("#e9ecef", "#495057"),
}
# The statistic shown for each feature kind in the drift table, beside its verdict.
DRIFT_STATISTICS = {"numeric": "psi", "latency": "psi", "categorical": "js"}


def format_ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def format_money(value: float | None, currency: str) -> str:
    """Money as read: cents for amounts of 1 or more, three significant digits below (costs per request are tiny)."""
    if value is None:
        return "–"
    if value == 0:
        return f"0 {currency}"
    return f"{value:,.2f} {currency}" if abs(value) >= 1 else f"{value:.3g} {currency}"


def with_series(frame: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """Add the legend label of each line/bar: the step, or `pipeline / step` across pipelines."""
    label = pl.concat_str("pipeline", pl.lit(" / "), "step") if show_pipeline else pl.col("step")
    return frame.with_columns(label.alias("series"))


# ---- latency ---------------------------------------------------------------------------------

def headline(stats: pl.DataFrame) -> dict[str, Any]:
    """Requests, error %, the slowest end-to-end p95 and the slowest step (by p95) over a step_stats frame.

    Requests and error % are tasks (the END_TO_END rows: root spans) when there are any; without
    root spans (an app that sends step spans only), a pipeline's requests are its busiest step's
    count and error % is failed step calls over all step calls.
    """
    if stats.is_empty():
        return {"requests": 0, "error_pct": 0.0, "slowest": None, "end_to_end": None}
    tasks, steps = stats.filter(pl.col("step") == END_TO_END), stats.filter(pl.col("step") != END_TO_END)
    if tasks.is_empty():
        requests = int(steps.group_by("pipeline").agg(pl.col("requests").max())["requests"].sum())
        calls, errors = int(steps["requests"].sum()), int(steps["errors"].sum())
    else:
        requests = calls = int(tasks["requests"].sum())
        errors = int(tasks["errors"].sum())

    def top(frame: pl.DataFrame) -> dict[str, Any] | None:
        if frame.is_empty():
            return None
        row = frame.sort(["p95_ms", "pipeline", "step"], descending=[True, False, False]).row(0, named=True)
        return {"pipeline": row["pipeline"], "step": row["step"], "p95_ms": row["p95_ms"]}

    return {"requests": requests, "error_pct": 100.0 * errors / calls if calls else 0.0,
            "slowest": top(steps), "end_to_end": top(tasks)}


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


# ---- cost ------------------------------------------------------------------------------------

def cost_table(costs: pl.DataFrame, keys: list[str], show_pipeline: bool) -> pl.DataFrame:
    """A cost_per_1k frame as shown: requests, cost per 1k and its token / compute / call parts per 1k."""
    per_1k = [(1000 * pl.col(column) / pl.col("requests")).alias(f"{label} per 1k")
              for column, label in COST_SPLIT.items()]
    table = costs.filter(pl.col("requests") > 0).select(
        *keys, "requests", "spans", pl.col("cost_per_1k").alias("cost per 1k"), *per_1k,
        pl.col("cost").alias("total cost"), pl.col("compute_seconds").alias("compute s"),
        (pl.col("input_tokens") + pl.col("output_tokens")).alias("tokens"),
    )
    return table if show_pipeline or "pipeline" not in keys else table.drop("pipeline")


def cost_split(costs: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """Long form of each step's cost per 1k by kind (tokens, compute, per call), for a stacked bar chart."""
    frame = costs.filter(pl.col("requests") > 0).group_by("pipeline", "step").agg(
        [(1000 * pl.col(column).sum() / pl.col("requests").first()).alias(label)
         for column, label in COST_SPLIT.items()])
    return (with_series(frame, show_pipeline)
            .unpivot(index="series", on=list(COST_SPLIT.values()), variable_name="kind", value_name="per_1k")
            .sort("series", "kind"))


# ---- critical path ---------------------------------------------------------------------------

def critical_table(breakdown: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """A step_breakdown frame as shown: self and critical-path time per step, shares in %."""
    table = breakdown.select(
        "pipeline", "step", "traces",
        pl.col("mean_self_ms").alias("self ms"),
        pl.col("mean_critical_ms").alias("critical ms"),
        (pl.col("critical_share") * 100).alias("critical %"),
        (pl.col("tail_share") * 100).alias("slowest 5% %"),
    )
    return table if show_pipeline else table.drop("pipeline")


def top_steps(breakdown: pl.DataFrame) -> list[dict[str, Any]]:
    """Per pipeline, the step with the largest share of request time (ties: step name)."""
    if breakdown.is_empty():
        return []
    top = (breakdown.filter(pl.col("critical_share").is_not_null())
           .sort(["pipeline", "critical_share", "step"], descending=[False, True, False])
           .group_by("pipeline", maintain_order=True).first())
    return top.select("pipeline", "step", "critical_share", "mean_critical_ms").to_dicts()


# ---- drift -----------------------------------------------------------------------------------

def drift_table(drift: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """One row per feature: its worst verdict, the headline statistic of its kind and the sample sizes.

    Worst verdict first (drift, warn, ok, insufficient_data), then by pipeline, step and feature.
    """
    columns = {"pipeline": pl.Utf8, "step": pl.Utf8, "feature": pl.Utf8, "kind": pl.Utf8, "status": pl.Utf8,
               "statistic": pl.Utf8, "value": pl.Float64, "p_value": pl.Float64, "n_reference": pl.Int64,
               "n_current": pl.Int64}
    if drift.is_empty():
        table = pl.DataFrame(schema=columns)
    else:
        keys = ["pipeline", "step", "feature"]
        rank = {status: i for i, status in enumerate(STATUSES)}
        worst = (drift.with_columns(pl.col("status").replace_strict(rank, return_dtype=pl.Int32).alias("rank"))
                 .group_by(keys).agg(pl.col("kind").first(), pl.col("rank").min(),
                                     pl.col("n_reference").max(), pl.col("n_current").max()))
        headline_stat = drift.filter(
            pl.col("statistic") == pl.col("kind").replace_strict(DRIFT_STATISTICS, default="psi"))
        p_stat = drift.filter(pl.col("statistic").is_in(["ks", "chi2"])).select(*keys, "p_value")
        table = (worst.join(headline_stat.select(*keys, "statistic", "value"), on=keys, how="left")
                 .join(p_stat, on=keys, how="left")
                 .sort(["rank", *keys])
                 .with_columns(pl.col("rank").replace_strict(dict(enumerate(STATUSES)), return_dtype=pl.Utf8)
                               .alias("status"))
                 .select(list(columns)).cast(columns))
    return table if show_pipeline else table.drop("pipeline")


# ---- SLOs ------------------------------------------------------------------------------------

def slo_table(status: pl.DataFrame, show_pipeline: bool) -> pl.DataFrame:
    """slo_status frames as shown: one row per (objective, burn-rate rule), budget left in % (NaN: no data).

    state: firing, ok, or "not enough data" for a rule whose long window is longer than the data."""
    table = status.select(
        "pipeline", "slo",
        pl.col("target_ms").alias("target ms"),
        (pl.col("objective") * 100).alias("objective %"),
        "severity",
        pl.concat_str("long_window", pl.lit(" / "), "short_window").alias("windows"),
        pl.col("factor").alias("burn factor"),
        pl.col("long_burn_rate").alias("long burn"),
        pl.col("short_burn_rate").alias("short burn"),
        pl.when(pl.col("firing")).then(pl.lit("firing")).when(~pl.col("enough_data"))
        .then(pl.lit("not enough data")).otherwise(pl.lit("ok")).alias("state"),
        pl.col("period_requests").alias("requests"),
        (pl.col("budget_remaining") * 100).alias("budget left %"),
    )
    return table if show_pipeline else table.drop("pipeline")

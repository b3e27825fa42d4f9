"""Pure shaping of analyzer frames into what the dashboard shows: no Streamlit, no I/O.

Each function takes the frame an analyzer function returned and gives back the table, chart data
or words of one page, so the arithmetic can be checked without a browser or a server.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tracetune.analyzer.drift import STATUSES
from tracetune.analyzer.slo import SLO_NAMES, STATE_ORDER, budget_words, duration_words, slo_words

__all__ = ["COST_SPLIT", "DRIVER_WORDS", "DRIFT_STATISTICS", "SLO_NAMES", "STATE_COLOURS", "STATE_ORDER",
           "STATUS_COLOURS", "budget_words", "change_sentence", "cost_split", "cost_table", "drift_table",
           "duration_words", "format_money", "format_ms", "label", "slo_words", "with_gaps", "with_series",
           "worst_state"]

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


# ---- tables and series, whatever the page ------------------------------------------------------

def with_gaps(frame: pl.DataFrame, keys: list[str], bucket_seconds: int) -> pl.DataFrame:
    """Number the runs of consecutive buckets of each series (`segment`): a bucket more than one step after
    the previous starts a new run, so a chart drawing one line per run shows idle time as a gap."""
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.Utf8).alias("segment"))
    step = pl.duration(seconds=max(1, int(bucket_seconds)))
    ordered = frame.sort([*keys, "bucket"])
    jump = (pl.col("bucket").diff().over(keys) > step).fill_null(False).cast(pl.Int32)
    return ordered.with_columns(
        pl.concat_str([*[pl.col(k).cast(pl.Utf8) for k in keys], jump.cum_sum().over(keys).cast(pl.Utf8)],
                      separator=" #").alias("segment"))


def label(frame: pl.DataFrame, columns: list[str], name: str = "series") -> pl.DataFrame:
    """A legend label joining `columns` with " / " (empty parts left out)."""
    parts = [pl.col(c).cast(pl.Utf8) for c in columns]
    return frame.with_columns(pl.concat_list(parts).list.eval(pl.element().filter(pl.element() != ""))
                              .list.join(" / ").alias(name))


# ---- SLO states (their words: analyzer.slo.slo_words) ---------------------------------------------

STATE_COLOURS = {"budget spent": ("#f8d7da", "#842029"), "burning fast": ("#f8d7da", "#842029"),
                 "at risk": ("#fff3cd", "#664d03"), "on track": ("#d1e7dd", "#0f5132"),
                 "no traffic yet": ("#e9ecef", "#495057")}


def worst_state(words: pl.DataFrame) -> dict[str, str]:
    """Per pipeline, the sentence of its worst objective."""
    return {row["pipeline"]: row["status"] for row in words.unique("pipeline", keep="first", maintain_order=True)
            .iter_rows(named=True)}


# ---- cost change in words -----------------------------------------------------------------------

DRIVER_WORDS = {"volume": "more or fewer requests", "mix": "steps called more or less often per request",
                "route": "calls moved between routes or models", "tokens": "tokens per call",
                "compute": "compute time per call"}


def change_sentence(row: dict[str, Any], currency: str) -> str:
    """One pipeline's cost change in a sentence: from → to per 1k, and the largest driver first."""
    before, after = row["per_1k_before"], row["per_1k_after"]
    if before is None and after is None:
        return f"{row['pipeline']}: no requests in either period"
    if before is None:
        return f"{row['pipeline']}: new this period, {format_money(after, currency)} per 1k requests"
    if after is None:
        return f"{row['pipeline']}: no requests this period (was {format_money(before, currency)} per 1k)"
    moved = after - before
    pct = f" ({100 * moved / before:+.0f}%)" if before else ""
    drivers = sorted(((k, row[k]) for k in ("mix", "route", "tokens", "compute") if row[k] is not None),
                     key=lambda kv: -abs(kv[1]))
    said = ", ".join(f"{DRIVER_WORDS[k]} {'+' if v >= 0 else '−'}{format_money(abs(v), currency)}"
                     for k, v in drivers if abs(v) >= 0.005 * max(abs(before), abs(after), 1e-12))
    direction = "up" if moved > 0 else "down" if moved < 0 else "unchanged"
    volume = row["requests_after"] - row["requests_before"]
    return (f"{row['pipeline']}: cost per 1k requests {direction}{pct}, {format_money(before, currency)} → "
            f"{format_money(after, currency)}" + (f": {said}" if said and moved else "")
            + f"; requests {row['requests_before']:,} → {row['requests_after']:,}"
            + (f" ({'+' if volume >= 0 else '−'}{format_money(abs(row['volume']), currency)} of total cost from volume)"
               if volume and row["volume"] is not None else ""))

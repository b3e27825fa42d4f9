"""Pure shaping of analyzer frames into what the dashboard shows: no Streamlit, no I/O.

Each function takes the frame an analyzer function returned and gives back the table, chart data
or words of one page, so the arithmetic can be checked without a browser or a server.
"""

from __future__ import annotations

import ast
import re
from datetime import datetime
from typing import Any

import polars as pl

from tracetune.analyzer.drift import STATUSES
from tracetune.analyzer.slo import SLO_NAMES, STATE_ORDER, budget_words, duration_words, slo_words

__all__ = ["COST_SPLIT", "DRIVER_WORDS", "DRIFT_STATISTICS", "MISSING", "SLO_NAMES", "STATE_COLOURS", "STATE_ORDER",
           "STATUS_COLOURS", "STATUS_WORDS", "budget_words", "change_sentence", "cost_split", "cost_table",
           "decision_change", "decision_effect", "drift_table", "duration_words", "fold_modelless", "format_money",
           "format_ms", "format_time", "knob_text", "label", "readable", "slo_words", "with_gaps", "with_series",
           "worst_state"]

MISSING = "—"
"""What a table cell shows where there is no value (the page's caption says what that means there)."""

# Cost kinds in the order they stack, as the analyzer's column names and as the legend says them.
COST_SPLIT = {"token_cost": "tokens", "compute_cost": "compute", "call_cost": "per call"}
# A drift verdict as a person reads it (the analyzer's statuses are identifiers).
STATUS_WORDS = {"insufficient_data": "not enough data"}
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


def format_time(moment: datetime | None, seconds: bool = True) -> str:
    """A UTC instant as people read it: `2026-12-05 23:09:25` (no microseconds, no offset: columns say UTC)."""
    if moment is None:
        return MISSING
    return f"{moment:%Y-%m-%d %H:%M:%S}" if seconds else f"{moment:%Y-%m-%d %H:%M}"


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


_SUMMED = ("spans", "input_tokens", "output_tokens", "compute_seconds", "token_cost", "compute_cost", "call_cost",
           "cost", "unpriced_spans")


def fold_modelless(costs: pl.DataFrame) -> pl.DataFrame:
    """A cost_by(pipeline, step, route, model) frame with each route's spans that called no model (a cascade
    answered from its cache: route set, no `gen_ai.request.model`, no tokens) counted in the row of the one
    model that route called, instead of a second, blank-model row of the same step and route. A route that
    called several models keeps its blank row (its spans belong to none of them)."""
    keys = ["pipeline", "step", "route"]
    blank = (pl.col("model") == "") & (pl.col("input_tokens") + pl.col("output_tokens") == 0)
    models = costs.filter(pl.col("model") != "").group_by(keys).agg(pl.col("model").n_unique().alias("_models"),
                                                                    pl.col("model").first().alias("_model"))
    marked = costs.join(models, on=keys, how="left").with_columns(
        pl.when(blank & (pl.col("_models") == 1)).then(pl.col("_model")).otherwise(pl.col("model")).alias("model"))
    other = [c for c in costs.columns if c not in (*keys, "model", *_SUMMED, "cost_per_1k")]
    folded = marked.group_by([*keys, "model"], maintain_order=True).agg(
        *(pl.col(c).sum() for c in _SUMMED), *(pl.col(c).first() for c in other))
    return folded.with_columns(cost_per_1k=pl.when(pl.col("requests") > 0)
                               .then(1000 * pl.col("cost") / pl.col("requests"))).select(costs.columns).sort(
        [*keys, "model"])


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


# ---- tuner decisions in words --------------------------------------------------------------------

def _number(value: float) -> str:
    """A measured or tuned number to four significant digits: 0.6431834373838553 -> 0.6432, 5.0 -> 5."""
    if value == int(value) and abs(value) < 1e6:
        return f"{int(value):,}"
    return f"{value:.4g}"


def knob_text(value: Any) -> str:
    """A knob value as people read it: on/off, numbers to four significant digits, route weights as shares."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return _number(float(value))
    if isinstance(value, dict):
        numbers = [v for v in value.values() if isinstance(v, int | float) and not isinstance(v, bool)]
        if value and len(numbers) == len(value) and abs(sum(numbers) - 1) < 1e-6:  # shares of traffic per route
            return " / ".join(f"{k} {100 * v:.1f}%" for k, v in value.items())
        if any(isinstance(v, dict) for v in value.values()):  # step -> knob -> value
            return "; ".join(f"{k}: {knob_text(v)}" for k, v in value.items())
        return ", ".join(f"{k} {knob_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(knob_text(v) for v in value)
    return str(value)


_LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{5,}(?:e-?\d+)?")


def _literals(text: str) -> list[tuple[int, int]]:
    """Spans of the outermost {...} / [...] groups in `text` (brackets inside quotes ignored)."""
    spans, depth, start, quote = [], 0, 0, ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and depth:
            quote = char
        elif char in "{[":
            start = i if depth == 0 else start
            depth += 1
        elif char in "}]" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def readable(text: str) -> str:
    """A reason as written by code, for people: Python dicts and lists spelled out as `knob value` lists
    (`{'cache_enabled': True}` -> `cache_enabled on`) and long decimals cut to four significant digits."""
    out, last = [], 0
    for start, end in _literals(text):
        try:
            value = ast.literal_eval(text[start:end])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict | list | tuple):
            out += [text[last:start], knob_text(value)]
            last = end
    out.append(text[last:])
    return _LONG_FLOAT.sub(lambda m: _number(float(m.group())), "".join(out))


def decision_change(before: dict, after: dict) -> str:
    """The knobs a decision changed, "; " between them: `classify batch_max_size 8 → 16` (configs as to_dict()).
    A static table does not break lines, so parts are joined in the line."""
    old, new = before.get("steps", {}), after.get("steps", {})
    lines = []
    for step in sorted(set(old) | set(new)):
        for knob in sorted(set(old.get(step, {})) | set(new.get(step, {}))):
            was, now = old.get(step, {}).get(knob), new.get(step, {}).get(knob)
            if was != now:
                lines.append(f"{step} {knob} {knob_text(was)} → {knob_text(now)}")
    for flag in ("frozen", "pinned"):
        if before.get(flag) != after.get(flag) and flag in after:
            lines.append(f"{flag} {knob_text(before.get(flag))} → {knob_text(after.get(flag))}")
    return "; ".join(lines) or "no knob changed"


# Metric names of predicted / observed effects -> (words, unit, scale to the unit)
METRICS = {"p95_ms": ("p95", " ms", 1.0), "p99_ms": ("p99", " ms", 1.0), "cost_per_1k": ("cost per 1k", "", 1.0),
           "error_rate": ("errors", "%", 100.0), "quality": ("quality", "", 1.0),
           "quality_lower_bound": ("quality (lower bound)", "", 1.0), "hit_ratio": ("cache hit ratio", "%", 100.0),
           "duplicate_rate": ("repeated inputs", "%", 100.0), "escalation_share": ("escalated", "%", 100.0),
           "compute_ms_per_request": ("compute per request", " ms", 1.0), "batch_size": ("batch size", "", 1.0),
           "utilisation": ("utilisation", "%", 100.0), "rate_limited_share": ("rate limited", "%", 100.0),
           "requests": ("tasks", "", 1.0)}
_ORDER = list(METRICS)


def _metric(name: str, value: float) -> str:
    words, unit, scale = METRICS.get(name, (name.replace("_", " "), "", 1.0))
    return f"{_number(value * scale)}{unit}"


def _words(name: str) -> str:
    return METRICS.get(name, (name.replace("_", " "), "", 1.0))[0]


def _versus(new: float, old: float) -> str:
    return f" ({100 * (new - old) / old:+.0f}%)" if old else ""


def decision_effect(predicted: dict[str, float], observed: dict[str, float]) -> str:
    """What a decision expected and what was measured after it, one part per metric ("; " between), in words:
    `cost per 1k: 0.42 before, predicted 0.3, observed 0.31 (-26%)`; a canary's verdict figures as
    `canary vs base: p95 176 ms vs 180 ms (-2%)`; "" when the decision predicted and measured nothing."""
    before = {k.removeprefix("before."): v for k, v in predicted.items() if k.startswith("before.")}
    expected = {k: v for k, v in predicted.items() if not k.startswith("before.")}
    lines = []
    pipeline_level = [m for m in _ORDER if m != "requests" and (m in expected or m in observed)]
    pipeline_level += sorted(k for k in set(expected) | set(observed)
                             if "." not in k and k not in METRICS)
    for name in pipeline_level:
        said = []
        if name in before:
            said.append(f"{_metric(name, before[name])} before")
        if name in expected:
            said.append(f"predicted {_metric(name, expected[name])}")
        if name in observed:
            said.append(f"observed {_metric(name, observed[name])}"
                        + (_versus(observed[name], before[name]) if name in before else ""))
        elif name in expected:
            said.append("not observed yet")
        lines.append(f"{_words(name)}: " + ", ".join(said))
    if "requests" in observed:
        lines.append(f"measured over {_number(observed['requests'])} tasks")
    arms = sorted({k.split(".", 1)[1] for k in observed if k.startswith("canary.")} - {"requests"},
                  key=lambda m: _ORDER.index(m) if m in _ORDER else len(_ORDER))
    for name in arms:
        if f"base.{name}" in observed:
            new, old = observed[f"canary.{name}"], observed[f"base.{name}"]
            lines.append(f"canary vs base, {_words(name)}: {_metric(name, new)} vs {_metric(name, old)}"
                         + _versus(new, old))
    steps: dict[str, list[str]] = {}
    for key, value in expected.items():
        if "." in key:
            step, _, name = key.rpartition(".")
            whole = step.endswith(".proposal")
            step = step.removesuffix(".proposal")
            steps.setdefault(step + (" (whole proposal)" if whole else ""), []).append(
                f"{_words(name)} {_metric(name, value)}")
    lines += [f"{step} predicted: {', '.join(said)}" for step, said in sorted(steps.items())]
    return "; ".join(lines)

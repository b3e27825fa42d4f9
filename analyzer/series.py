"""What the dashboard's pages plot: per-step series, cost cells and their change, drift history, from rollups.

Every query reads the per-minute rollup (`tracetune_spans_1m`), or the hourly one for windows of
HOURLY_FROM_SECONDS and more, so a page costs the same at any span rate; drift reads the stored
runs (`tracetune_drift`) and, for one feature's histograms, a capped sample of its spans.

The maths (pricing rollup cells, sharing batch compute over tenants, explaining a change in cost
per 1k by volume, step mix, route, tokens and compute) are pure functions over polars frames, so a
test can feed numbers in and check numbers out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import resources

import numpy as np
import polars as pl

from tracetune.analyzer._time import epoch_ns, utc
from tracetune.analyzer.cost import group_keys, price_cells, result_frame
from tracetune.analyzer.drift import LATENCY_FEATURE
from tracetune.analyzer.errors import ERROR_KIND_SQL
from tracetune.analyzer.prices import PriceTable
from tracetune.analyzer.stats import END_TO_END, HOURLY_FROM_SECONDS, parse_window

__all__ = ["COST_CHANGE_DRIVERS", "ERROR_SPAN_COLUMNS", "SERIES_COST_DIMENSIONS", "STEP_SERIES_COLUMNS", "cost_by",
           "cost_cells", "cost_change", "drift_history", "error_spans", "feature_histograms", "feature_samples",
           "pipelines", "price_cells", "share_batches", "step_series", "tenants"]

_SQL_DIR = resources.files("tracetune.analyzer").joinpath("sql")
_SQL = {name: _SQL_DIR.joinpath(f"series_{name}.sql").read_text()
        for name in ("steps", "cost_cells", "tenants", "pipelines", "drift_history", "feature_samples",
                     "error_spans")}
_SQL["error_spans"] = _SQL["error_spans"].replace("{kind_sql}", ERROR_KIND_SQL)
# The rollup a window reads, and its time column and floor function (the only fragments put into SQL).
_ROLLUPS = {"minute": ("tracetune_spans_1m", "minute", "toStartOfMinute", 60),
            "hour": ("tracetune_spans_1h", "hour", "toStartOfHour", 3600)}
_TIME = pl.Datetime("us", "UTC")

STEP_SERIES_COLUMNS = {"bucket": _TIME, "pipeline": pl.Utf8, "step": pl.Utf8, "route": pl.Utf8, "requests": pl.Int64,
                       "errors": pl.Int64, "p50_ms": pl.Float64, "p95_ms": pl.Float64, "p99_ms": pl.Float64,
                       "cache_hit_rate": pl.Float64, "mean_batch_size": pl.Float64, "mean_queue_ms": pl.Float64}
SERIES_COST_DIMENSIONS = ("pipeline", "tenant", "step", "route", "model")
_CELL_COLUMNS = {"bucket": _TIME, "kind": pl.Utf8, "pipeline": pl.Utf8, "step": pl.Utf8, "route": pl.Utf8,
                 "model": pl.Utf8, "tenant": pl.Utf8, "n": pl.Int64, "batched": pl.Int64, "input_tokens": pl.Int64,
                 "output_tokens": pl.Int64, "unbatched_ns": pl.Int64, "duration_ns": pl.Int64}
_SUMS = {"spans": pl.Int64, "input_tokens": pl.Int64, "output_tokens": pl.Int64, "compute_seconds": pl.Float64,
         "token_cost": pl.Float64, "compute_cost": pl.Float64, "call_cost": pl.Float64, "cost": pl.Float64,
         "unpriced_spans": pl.Int64}
# What a change in cost per 1k is put down to (cost_change), in the order they are applied.
COST_CHANGE_DRIVERS = ("mix", "route", "tokens", "compute")


def _seconds(since: str | int) -> int:
    return since if isinstance(since, int) else parse_window(since)


def _rollup(seconds: int, bucket_seconds: int) -> tuple[str, str, str, int]:
    """The rollup for a window, and the bucket rounded up to whole rows of it (0 stays 0: one bucket)."""
    table, column, floor, grain = _ROLLUPS["hour" if seconds >= HOURLY_FROM_SECONDS else "minute"]
    bucket = 0 if bucket_seconds <= 0 else -(-int(bucket_seconds) // grain) * grain
    return table, column, floor, bucket


def _fill(sql: str, table: str, column: str, floor: str) -> str:
    return sql.replace("{rollup_table}", table).replace("{time_column}", column).replace("{time_floor}", floor)


# ---- steps ------------------------------------------------------------------------------------------

def step_series(client, since: str | int = "1h", pipeline: str = "", tenant: str = "",
                bucket_seconds: int = 60, tasks_only: bool = False) -> pl.DataFrame:
    """Per bucket, pipeline, step and route: requests, errors, p50/p95/p99 ms, cache hit rate, mean batch
    size and queue time (STEP_SERIES_COLUMNS; NaN where a step never looked up the cache or batched).

    Whole tasks (root spans) are the rows whose step is END_TO_END. bucket_seconds is rounded up to
    whole minutes (whole hours for windows of 6 h and more); 0 gives one row per group for the whole
    window. Buckets without spans are absent: a chart of them shows the gap. tasks_only: the END_TO_END rows
    alone (a fifth of the quantile states to merge, for a page about whole tasks).
    """
    seconds = _seconds(since)
    table, column, floor, bucket = _rollup(seconds, bucket_seconds)
    result = client.query(_fill(_SQL["steps"], table, column, floor), parameters={
        "window_seconds": seconds, "pipeline": pipeline, "tenant": tenant, "bucket_seconds": bucket,
        "tasks_only": int(bool(tasks_only))})
    frame = result_frame(result, STEP_SERIES_COLUMNS)
    return frame.with_columns(pl.when(pl.col("step") == "").then(pl.lit(END_TO_END)).otherwise(pl.col("step"))
                              .alias("step"))


def pipelines(client, since: str | int = "1h") -> list[str]:
    """Pipelines with tasks or step spans in the window, by name (what step_series would list, for a fraction of
    its cost: no quantile state is read)."""
    seconds = _seconds(since)
    table, column, floor, _ = _rollup(seconds, 0)
    result = client.query(_fill(_SQL["pipelines"], table, column, floor), parameters={"window_seconds": seconds})
    return [row[0] for row in result.result_rows]


def tenants(client, since: str | int = "1h", pipeline: str = "") -> list[str]:
    """Tenants (`tracetune.tenant` of root spans) with tasks in the window, busiest first."""
    result = client.query(_SQL["tenants"], parameters={"window_seconds": _seconds(since), "pipeline": pipeline})
    return [row[0] for row in result.result_rows]


ERROR_SPAN_COLUMNS = {"pipeline": pl.Utf8, "step": pl.Utf8, "kind": pl.Utf8, "message": pl.Utf8, "count": pl.Int64,
                      "last_seen": _TIME, "example_trace_id": pl.Utf8}


def error_spans(client, since: str | int = "1h", pipeline: str = "", limit: int = 50) -> pl.DataFrame:
    """Failed spans grouped by pipeline, step ("" for tasks' root spans), kind and message, most frequent first:
    count, last_seen and the newest example_trace_id (ERROR_SPAN_COLUMNS).

    Reads only failed spans, so its cost follows the failures, not the traffic; `analyzer.errors` reads
    whole traces instead, to say which failures ended their task. A failed task's root span repeats its
    step's error: the root rows count failed tasks.
    """
    result = client.query(_SQL["error_spans"], parameters={"window_seconds": _seconds(since), "pipeline": pipeline,
                                                           "limit": max(1, int(limit))})
    return result_frame(result, ERROR_SPAN_COLUMNS)


# ---- cost -------------------------------------------------------------------------------------------

def cost_cells(client, since: str | int = "1h", pipeline: str = "", bucket_seconds: int = 0,
               offset_seconds: int = 0) -> pl.DataFrame:
    """Unpriced sums per bucket, kind (root, step, batch), pipeline, step, route, model and tenant.

    The window is `since` before now, moved back by offset_seconds (offset = the window's length: the
    previous period). bucket_seconds 0: one bucket for the whole window.
    """
    seconds = _seconds(since)
    table, column, floor, bucket = _rollup(seconds, bucket_seconds)  # both periods at one grain
    result = client.query(_fill(_SQL["cost_cells"], table, column, floor), parameters={
        "window_seconds": seconds, "offset_seconds": max(0, int(offset_seconds)), "pipeline": pipeline,
        "bucket_seconds": bucket})
    return result_frame(result, _CELL_COLUMNS)


def share_batches(cells: pl.DataFrame) -> pl.DataFrame:
    """Batch rows split over tenants by their batched step spans in the same bucket, pipeline, step and route.

    A batch span serves tasks of several tenants and carries none itself; its compute goes to each
    tenant in proportion to the step spans of that tenant it ran. Batches with no batched step span
    beside them keep their own tenant. Totals are unchanged.
    """
    keys = ["bucket", "pipeline", "step", "route"]
    batches = cells.filter(pl.col("kind") == "batch")
    if batches.is_empty():
        return cells
    weights = (cells.filter((pl.col("kind") == "step") & (pl.col("batched") > 0))
               .group_by(*keys, "tenant").agg(weight=pl.col("batched").sum()))
    weights = weights.with_columns(share=pl.col("weight") / pl.col("weight").sum().over(keys))
    shared = batches.join(weights.rename({"tenant": "to_tenant"}), on=keys, how="left").with_columns(
        tenant=pl.coalesce("to_tenant", "tenant"),
        share=pl.col("share").fill_null(1.0),
    ).with_columns(
        duration_ns=(pl.col("duration_ns") * pl.col("share")).round().cast(pl.Int64),
        n=(pl.col("n") * pl.col("share")).round().cast(pl.Int64),
    ).select(cells.columns)
    return pl.concat([cells.filter(pl.col("kind") != "batch"), shared])


def cost_by(cells: pl.DataFrame, table: PriceTable, by: str | Iterable[str] = ("pipeline",), tenant: str = "",
            over_time: bool = False) -> pl.DataFrame:
    """Cost per 1k requests of cost_cells grouped by any of pipeline, tenant, step, route, model (and the
    bucket, with over_time), for one tenant or all ("").

    The denominator is the requests (root spans) of the row's pipeline and tenant, or all requests when
    `by` names neither, so step, route and model rows add up to their pipeline's cost per 1k. Columns:
    [bucket], *by, requests, spans, tokens, compute and cost sums, cost_per_1k, unpriced_spans,
    price_version, currency.
    """
    keys = group_keys(by, SERIES_COST_DIMENSIONS)
    time_keys = ["bucket"] if over_time else []
    cells = share_batches(cells)
    if tenant:
        cells = cells.filter(pl.col("tenant") == tenant)
    priced = price_cells(cells, table)
    sums = [pl.col(name).sum().cast(dtype) for name, dtype in _SUMS.items()]
    group = [*time_keys, *keys]
    costs = priced.group_by(group).agg(sums) if group else priced.select(sums)
    request_keys = [*time_keys, *(k for k in keys if k in ("pipeline", "tenant"))]
    roots = cells.filter(pl.col("kind") == "root")
    if request_keys:
        requests = roots.group_by(request_keys).agg(requests=pl.col("n").sum().cast(pl.Int64))
        if set(keys) <= {"pipeline", "tenant"}:  # requests without priced steps still show, at cost 0
            frame = requests.join(costs, on=request_keys, how="left").with_columns(
                pl.col(name).fill_null(0) for name in _SUMS)
        else:
            frame = costs.join(requests, on=request_keys, how="left").with_columns(pl.col("requests").fill_null(0))
    else:
        frame = costs.with_columns(requests=pl.lit(int(roots["n"].sum() or 0), pl.Int64))
    frame = frame.with_columns(cost_per_1k=pl.when(pl.col("requests") > 0)
                               .then(1000 * pl.col("cost") / pl.col("requests")).otherwise(None))
    frame = frame.select(*group, "requests", *_SUMS, "cost_per_1k")
    if group:
        frame = frame.sort(group)
    return frame.with_columns(price_version=pl.lit(table.version, pl.Utf8), currency=pl.lit(table.currency, pl.Utf8))


def cost_change(previous: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    """Why each pipeline's cost per 1k moved between two periods, from cost_by(..., by=(pipeline, step,
    route, model)) frames of each (priced with the same table).

    With f = a step's spans per request, w = a route/model's share of the step's spans and u = its cost
    per span, cost per request c = Σ f·Σ w·u; the change c1 − c0 is split exactly into
      mix      Σ (f1 − f0)·ū0            steps called more or less often per request
      route    Σ f1·Σ (w1 − w0)·u0      calls moved between routes or models of a step
      tokens   Σ f1·Σ w1·(t1 − t0)      token cost per call (longer prompts, longer answers)
      compute  Σ f1·Σ w1·(k1 − k0)      compute and per-call cost per call (slower or faster steps)
    (u0 of a route or step new in the current period is its u1, so new things land in mix or route).
    volume is the total cost change that the change in requests alone makes at the old cost per
    request. Columns: pipeline, requests_before, requests_after, per_1k_before, per_1k_after, cost_before,
    cost_after, volume (total cost), mix, route, tokens, compute (each per 1k requests).
    """
    keys = ["pipeline", "step", "route", "model"]
    columns = ["spans", "token_cost", "cost", "requests"]
    joined = (previous.select(*keys, *columns).join(current.select(*keys, *columns), on=keys, how="full",
                                                    coalesce=True, suffix="_1")
              .with_columns(pl.col(c).fill_null(0) for c in [*columns, *(f"{c}_1" for c in columns)]))
    rows = []
    for (pipeline,), cells in joined.group_by(["pipeline"], maintain_order=True):
        r0 = int(previous.filter(pl.col("pipeline") == pipeline)["requests"].max() or 0)
        r1 = int(current.filter(pl.col("pipeline") == pipeline)["requests"].max() or 0)
        c0_total, c1_total = float(cells["cost"].sum()), float(cells["cost_1"].sum())
        effects = dict.fromkeys(COST_CHANGE_DRIVERS, 0.0)
        if r0 and r1:
            for _, step in cells.group_by(["step"], maintain_order=True):
                n0, n1 = step["spans"].to_numpy().astype(float), step["spans_1"].to_numpy().astype(float)
                u1 = np.divide(step["cost_1"].to_numpy(), n1, out=np.zeros_like(n1), where=n1 > 0)
                t1 = np.divide(step["token_cost_1"].to_numpy(), n1, out=np.zeros_like(n1), where=n1 > 0)
                u0 = np.where(n0 > 0, np.divide(step["cost"].to_numpy(), n0, out=np.zeros_like(n0), where=n0 > 0), u1)
                t0 = np.where(n0 > 0, np.divide(step["token_cost"].to_numpy(), n0, out=np.zeros_like(n0),
                                                where=n0 > 0), t1)
                f0, f1 = n0.sum() / r0, n1.sum() / r1
                w1 = n1 / n1.sum() if n1.sum() else np.zeros_like(n1)
                w0 = n0 / n0.sum() if n0.sum() else w1
                mean_u0 = float(np.dot(w0, u0))
                effects["mix"] += (f1 - f0) * mean_u0
                effects["route"] += f1 * float(np.dot(w1 - w0, u0))
                effects["tokens"] += f1 * float(np.dot(w1, t1 - t0))
                effects["compute"] += f1 * float(np.dot(w1, (u1 - t1) - (u0 - t0)))
        rows.append({"pipeline": pipeline, "requests_before": r0, "requests_after": r1,
                     "per_1k_before": 1000 * c0_total / r0 if r0 else None,
                     "per_1k_after": 1000 * c1_total / r1 if r1 else None,
                     "cost_before": c0_total, "cost_after": c1_total,
                     "volume": (r1 - r0) * c0_total / r0 if r0 else None,
                     **{k: 1000 * v if r0 and r1 else None for k, v in effects.items()}})
    schema = {"pipeline": pl.Utf8, "requests_before": pl.Int64, "requests_after": pl.Int64,
              "per_1k_before": pl.Float64, "per_1k_after": pl.Float64, "cost_before": pl.Float64,
              "cost_after": pl.Float64, "volume": pl.Float64, **dict.fromkeys(COST_CHANGE_DRIVERS, pl.Float64)}
    return pl.DataFrame(rows, schema=schema).sort("pipeline")


# ---- drift ------------------------------------------------------------------------------------------

_DRIFT_SCHEMA = {"computed_at": pl.Datetime("ms", "UTC"), "pipeline": pl.Utf8, "step": pl.Utf8, "feature": pl.Utf8,
                 "kind": pl.Utf8, "statistic": pl.Utf8, "value": pl.Float64, "p_value": pl.Float64,
                 "n_reference": pl.Int64, "n_current": pl.Int64, "reference_start": pl.Datetime("ms", "UTC"),
                 "reference_end": pl.Datetime("ms", "UTC"), "current_start": pl.Datetime("ms", "UTC"),
                 "current_end": pl.Datetime("ms", "UTC"), "status": pl.Utf8}


def drift_history(client, since: str | int = "6h", pipeline: str = "") -> pl.DataFrame:
    """Every statistic of every stored drift run in the window (the analyzer loop's), oldest first."""
    result = client.query(_SQL["drift_history"], parameters={"window_seconds": _seconds(since),
                                                             "pipeline": pipeline})
    if not result.result_rows:
        return pl.DataFrame(schema=_DRIFT_SCHEMA)
    frame = pl.DataFrame(result.result_rows, schema=list(result.column_names), orient="row", infer_schema_length=None)
    times = [pl.col(c).dt.convert_time_zone("UTC") if frame.schema[c].time_zone  # type: ignore[union-attr]
             else pl.col(c).dt.replace_time_zone("UTC") for c, t in _DRIFT_SCHEMA.items() if isinstance(t, pl.Datetime)]
    return frame.with_columns(times).select(list(_DRIFT_SCHEMA)).cast(_DRIFT_SCHEMA)


def feature_samples(client, pipeline: str, step: str, feature: str, reference: tuple[datetime, datetime],
                    current: tuple[datetime, datetime], cap: int = 5000) -> dict[str, list[str]]:
    """Up to `cap` values of one step feature (or of `latency_ms`) in each window:
    {"reference": [...], "current": [...]}."""
    result = client.query(_SQL["feature_samples"], parameters={
        "pipeline": pipeline, "step": step, "feature": feature, "latency": int(feature == LATENCY_FEATURE),
        "reference_start": epoch_ns(utc(reference[0])), "reference_end": epoch_ns(utc(reference[1])),
        "current_start": epoch_ns(utc(current[0])), "current_end": epoch_ns(utc(current[1])), "cap": int(cap)})
    found = {"reference": [], "current": []}
    for window, sample in result.result_rows:
        found[window] = [str(v) for v in sample]
    return found


def feature_histograms(reference: Sequence[str], current: Sequence[str], kind: str, bins: int = 10) -> pl.DataFrame:
    """Each window's share of values per bin: numeric features in bins of the reference's quantiles (as PSI
    cuts them, open ends), categorical ones per category. Columns: bin, order, window, count, share."""
    rows = []
    if kind == "categorical":
        categories = sorted(set(reference) | set(current))
        for window, values in (("reference", reference), ("current", current)):
            counts = {c: 0 for c in categories}
            for value in values:
                counts[value] += 1
            rows += [{"bin": c, "order": i, "window": window, "count": counts[c],
                      "share": counts[c] / len(values) if values else 0.0} for i, c in enumerate(categories)]
    else:
        ref = np.asarray(reference, dtype=float)
        cur = np.asarray(current, dtype=float)
        base = ref if ref.size else cur
        edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1])) if base.size else np.array([])
        labels = ([f"< {edges[0]:.4g}"] if edges.size else ["all"]) + \
            [f"{lo:.4g} – {hi:.4g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + \
            ([f"≥ {edges[-1]:.4g}"] if edges.size else [])
        for window, values in (("reference", ref), ("current", cur)):
            counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
            rows += [{"bin": labels[i], "order": i, "window": window, "count": int(counts[i]),
                      "share": float(counts[i] / values.size) if values.size else 0.0} for i in range(edges.size + 1)]
    return pl.DataFrame(rows, schema={"bin": pl.Utf8, "order": pl.Int64, "window": pl.Utf8, "count": pl.Int64,
                                      "share": pl.Float64})

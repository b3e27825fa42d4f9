"""What requests cost: token, compute and per-call prices applied to step spans in ClickHouse SQL.

A request is a root span (`tracetune.pipeline`, no parent) that started in the window; its cost is
the sum over the step spans of its trace of
  token cost    input/output tokens × price per 1M (by `gen_ai.request.model`); a step span's tokens are
                its `tracetune.llm.*_tokens` when it has them (the executor), else its
                `gen_ai.usage.*_tokens` (older executors, apps' own spans). Only step spans count, so
                the `gen_ai.usage.*` of an executor call's CLIENT span (no `tracetune.step`) is not
                counted a second time (the rule of store/sql/170_tracetune_spans_1m_mv_tokens.sql),
  compute cost  self time — or, if a batch span links to the step, batch duration ÷ batch size —
                × price per core-second (by `tracetune.route`), one core assumed,
  call cost     flat price per call, by step name, else by `gen_ai.provider.name`.
Prices go in as array parameters; all arithmetic runs in ClickHouse, so only aggregates come back.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from tracetune.analyzer.prices import PricesError, PriceTable, current
from tracetune.analyzer.stats import parse_window

__all__ = ["COST_DIMENSIONS", "cost_over_time", "cost_per_1k", "cost_per_request", "group_keys", "price_cells",
           "resolve_prices", "result_frame", "step_tokens_sql"]

# Request-level dimensions come from the root span; the rest from each step span.
COST_DIMENSIONS = ("pipeline", "tenant", "step", "route", "model")
_REQUEST_DIMENSIONS = ("pipeline", "tenant")

def step_tokens_sql(direction: str) -> str:
    """A step span's `direction` ("input" or "output") tokens as SQL, each LLM call counted once: its
    `tracetune.llm.*_tokens` (the executor's), else its `gen_ai.usage.*_tokens` (older executors, apps' own
    spans). The rule of store/sql/170_tracetune_spans_1m_mv_tokens.sql, whose text a migration must keep."""
    return (f"if(mapContains(SpanAttributes, 'tracetune.llm.{direction}_tokens'), "
            f"toUInt64OrZero(SpanAttributes['tracetune.llm.{direction}_tokens']), "
            f"toUInt64OrZero(SpanAttributes['gen_ai.usage.{direction}_tokens']))")


# Shared CTEs: roots in the window, their step spans, each step's children and batch share, priced.
_STEP_COSTS_CTE = """
WITH
    now64(9) - toIntervalSecond({window_seconds:UInt32}) AS window_start,
    mapFromArrays({models:Array(String)}, {input_per_1m:Array(Float64)}) AS input_price,
    mapFromArrays({models:Array(String)}, {output_per_1m:Array(Float64)}) AS output_price,
    mapFromArrays({routes:Array(String)}, {core_second:Array(Float64)}) AS core_second_price,
    mapFromArrays({calls:Array(String)}, {per_call:Array(Float64)}) AS call_price,
roots AS (
    SELECT TraceId AS trace_id, Timestamp AS ts, Duration AS root_ns,
           SpanAttributes['tracetune.pipeline'] AS pipeline,
           SpanAttributes['tracetune.tenant'] AS tenant
    FROM otel_traces
    WHERE Timestamp >= window_start AND ParentSpanId = ''
      AND SpanAttributes['tracetune.pipeline'] != '' AND SpanAttributes['tracetune.step'] = ''
      AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
),
steps AS (
    SELECT TraceId AS trace_id, SpanId AS span_id,
           toInt64(toUnixTimestamp64Nano(Timestamp)) AS start_ns, toInt64(Duration) AS duration_ns,
           SpanAttributes['tracetune.step'] AS step,
           SpanAttributes['tracetune.route'] AS route,
           SpanAttributes['gen_ai.request.model'] AS model,
           SpanAttributes['gen_ai.provider.name'] AS provider,
           """ + step_tokens_sql("input") + """ AS input_tokens,
           """ + step_tokens_sql("output") + """ AS output_tokens
    FROM otel_traces
    WHERE Timestamp >= window_start AND SpanAttributes['tracetune.step'] != ''
      AND TraceId IN (SELECT trace_id FROM roots)
),
children AS (
    SELECT TraceId AS trace_id, ParentSpanId AS parent_id,
           groupArray((toInt64(toUnixTimestamp64Nano(Timestamp)),
                       toInt64(toUnixTimestamp64Nano(Timestamp)) + toInt64(Duration))) AS intervals
    FROM otel_traces
    WHERE Timestamp >= window_start AND ParentSpanId != ''
      AND TraceId IN (SELECT trace_id FROM roots)
    GROUP BY trace_id, parent_id
),
batches AS (
    -- A batch span serves the step spans it links to; each is charged duration / batch size.
    SELECT linked_trace AS trace_id, linked_span AS span_id, count() AS batch_links,
           sum(Duration / batch_size) AS share_ns
    FROM (
        SELECT Duration, Links.TraceId AS link_traces, Links.SpanId AS link_spans,
               if(toUInt64OrZero(SpanAttributes['tracetune.batch_size']) > 0,
                  toUInt64OrZero(SpanAttributes['tracetune.batch_size']), length(Links.SpanId)) AS batch_size
        FROM otel_traces
        WHERE Timestamp >= window_start AND notEmpty(Links.SpanId)
          AND SpanAttributes['tracetune.batch_size'] != '' AND SpanAttributes['tracetune.step'] = ''
    )
    ARRAY JOIN link_traces AS linked_trace, link_spans AS linked_span
    GROUP BY trace_id, span_id
),
step_costs AS (
    SELECT s.trace_id AS trace_id, s.step AS step, s.route AS route, s.model AS model,
           s.input_tokens AS input_tokens, s.output_tokens AS output_tokens,
           -- self time: duration minus the union of the children's intervals, clipped to the span
           s.duration_ns - arrayFold(
               (acc, iv) -> (acc.1 + greatest(toInt64(0), iv.2 - greatest(iv.1, acc.2)), greatest(acc.2, iv.2)),
               arraySort(arrayMap(iv -> (greatest(iv.1, s.start_ns), least(iv.2, s.start_ns + s.duration_ns)),
                                  c.intervals)),
               (toInt64(0), s.start_ns)).1 AS self_ns,
           b.batch_links > 0 AS batched,
           if(batched, b.share_ns, toFloat64(self_ns)) / 1e9 AS compute_seconds,
           (s.input_tokens * input_price[s.model] + s.output_tokens * output_price[s.model]) / 1e6 AS token_cost,
           compute_seconds * core_second_price[s.route] AS compute_cost,
           if(mapContains(call_price, s.step), call_price[s.step], call_price[s.provider]) AS call_cost,
           token_cost + compute_cost + call_cost AS cost,
           (s.input_tokens + s.output_tokens > 0 AND NOT mapContains(input_price, s.model))
               OR (s.route != '' AND NOT mapContains(core_second_price, s.route)
                   AND NOT mapContains(call_price, s.step) AND NOT mapContains(call_price, s.provider)) AS unpriced
    FROM steps AS s
    LEFT JOIN children AS c ON c.trace_id = s.trace_id AND c.parent_id = s.span_id
    LEFT JOIN batches AS b ON b.trace_id = s.trace_id AND b.span_id = s.span_id
),
per_trace AS (
    SELECT trace_id, count() AS steps, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(compute_seconds) AS compute_seconds, sum(token_cost) AS token_cost,
           sum(compute_cost) AS compute_cost, sum(call_cost) AS call_cost, sum(cost) AS cost,
           countIf(unpriced) AS unpriced_spans
    FROM step_costs
    GROUP BY trace_id
)
"""

COST_PER_REQUEST_SQL = _STEP_COSTS_CTE + """
SELECT r.trace_id AS trace_id, toDateTime64(r.ts, 9, 'UTC') AS timestamp, r.pipeline AS pipeline, r.tenant AS tenant,
       r.root_ns / 1e6 AS duration_ms, p.steps AS steps, p.input_tokens AS input_tokens,
       p.output_tokens AS output_tokens, p.compute_seconds AS compute_seconds, p.token_cost AS token_cost,
       p.compute_cost AS compute_cost, p.call_cost AS call_cost, p.cost AS cost, p.unpriced_spans AS unpriced_spans
FROM roots AS r
LEFT JOIN per_trace AS p ON p.trace_id = r.trace_id
ORDER BY timestamp DESC, trace_id
LIMIT {limit:UInt64}
"""

# Step-level sums at the finest grain, plus request counts per (pipeline, tenant) as `kind = 'requests'`
# rows, in one statement so both see the same window.
COST_BREAKDOWN_SQL = _STEP_COSTS_CTE + """
SELECT 'steps' AS kind, r.pipeline AS pipeline, r.tenant AS tenant, s.step AS step, s.route AS route,
       s.model AS model, count() AS n, sum(s.input_tokens) AS input_tokens, sum(s.output_tokens) AS output_tokens,
       sum(s.compute_seconds) AS compute_seconds, sum(s.token_cost) AS token_cost,
       sum(s.compute_cost) AS compute_cost, sum(s.call_cost) AS call_cost, sum(s.cost) AS cost,
       countIf(s.unpriced) AS unpriced_spans
FROM step_costs AS s
INNER JOIN roots AS r ON r.trace_id = s.trace_id
GROUP BY pipeline, tenant, step, route, model
UNION ALL
SELECT 'requests' AS kind, pipeline, tenant, '' AS step, '' AS route, '' AS model, count() AS n,
       toUInt64(0) AS input_tokens, toUInt64(0) AS output_tokens, toFloat64(0) AS compute_seconds,
       toFloat64(0) AS token_cost, toFloat64(0) AS compute_cost, toFloat64(0) AS call_cost, toFloat64(0) AS cost,
       toUInt64(0) AS unpriced_spans
FROM roots
GROUP BY pipeline, tenant
"""

COST_OVER_TIME_SQL = _STEP_COSTS_CTE + """
SELECT toStartOfInterval(toDateTime64(r.ts, 9, 'UTC'), toIntervalSecond({bucket_seconds:UInt32})) AS bucket,
       r.pipeline AS pipeline,
       count() AS requests, sum(p.token_cost) AS token_cost, sum(p.compute_cost) AS compute_cost,
       sum(p.call_cost) AS call_cost, sum(p.cost) AS cost, 1000 * cost / requests AS cost_per_1k,
       sum(p.unpriced_spans) AS unpriced_spans
FROM roots AS r
LEFT JOIN per_trace AS p ON p.trace_id = r.trace_id
GROUP BY bucket, pipeline
ORDER BY bucket, pipeline
"""

_SUMS = {"spans": pl.Int64, "input_tokens": pl.Int64, "output_tokens": pl.Int64, "compute_seconds": pl.Float64,
         "token_cost": pl.Float64, "compute_cost": pl.Float64, "call_cost": pl.Float64, "cost": pl.Float64,
         "unpriced_spans": pl.Int64}
REQUEST_COLUMNS = {"trace_id": pl.Utf8, "timestamp": pl.Datetime("us", "UTC"), "pipeline": pl.Utf8,
                   "tenant": pl.Utf8, "duration_ms": pl.Float64, "steps": pl.Int64, "input_tokens": pl.Int64,
                   "output_tokens": pl.Int64, "compute_seconds": pl.Float64, "token_cost": pl.Float64,
                   "compute_cost": pl.Float64, "call_cost": pl.Float64, "cost": pl.Float64,
                   "unpriced_spans": pl.Int64}
OVER_TIME_COLUMNS = {"bucket": pl.Datetime("us", "UTC"), "pipeline": pl.Utf8, "requests": pl.Int64,
                     "token_cost": pl.Float64, "compute_cost": pl.Float64, "call_cost": pl.Float64,
                     "cost": pl.Float64, "cost_per_1k": pl.Float64, "unpriced_spans": pl.Int64}


def resolve_prices(client, prices: PriceTable | None) -> PriceTable:
    """The given table, else the latest published one; PricesError (one line) if there is none."""
    table = prices if prices is not None else current(client)
    if table is None:
        raise PricesError("no price table is published in tracetune_prices; publish prices.toml with "
                          "tracetune.analyzer.prices.publish(client, tracetune.analyzer.prices.load())")
    return table


def _parameters(table: PriceTable, since: str | int, pipeline: str) -> dict:
    models, routes, calls = sorted(table.models), sorted(table.routes), sorted(table.calls)
    return {
        "window_seconds": since if isinstance(since, int) else parse_window(since),
        "pipeline": pipeline,
        "models": models,
        "input_per_1m": [table.models[m].input_per_1m for m in models],
        "output_per_1m": [table.models[m].output_per_1m for m in models],
        "routes": routes, "core_second": [table.routes[r] for r in routes],
        "calls": calls, "per_call": [table.calls[c] for c in calls],
    }


def result_frame(result, schema: dict) -> pl.DataFrame:
    """A query result as a frame of `schema`'s columns; naive datetimes are UTC (as ClickHouse hands them back)."""
    if not result.result_rows:
        return pl.DataFrame(schema=schema)
    frame = pl.DataFrame(result.result_rows, schema=list(result.column_names), orient="row", infer_schema_length=None)
    casts = []
    for name, dtype in schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.Datetime):  # the client hands back naive UTC values (the SQL asks for UTC)
            zone = frame.schema[name].time_zone  # type: ignore[union-attr]
            column = column.dt.replace_time_zone("UTC") if zone is None else column.dt.convert_time_zone("UTC")
        casts.append(column.cast(dtype))
    return frame.select(casts)


def _stamp(frame: pl.DataFrame, table: PriceTable) -> pl.DataFrame:
    return frame.with_columns(price_version=pl.lit(table.version, pl.Utf8), currency=pl.lit(table.currency, pl.Utf8))


def cost_per_request(client, since: str | int = "1h", pipeline: str = "", *, prices: PriceTable | None = None,
                     limit: int = 10_000) -> pl.DataFrame:
    """One row per request (root span) in the window, newest first, at most `limit` rows.

    Columns: trace_id, timestamp, pipeline, tenant, duration_ms, steps, input_tokens, output_tokens,
    compute_seconds, token_cost, compute_cost, call_cost, cost, unpriced_spans, price_version, currency.
    """
    table = resolve_prices(client, prices)
    parameters = {**_parameters(table, since, pipeline), "limit": max(0, int(limit))}
    frame = result_frame(client.query(COST_PER_REQUEST_SQL, parameters=parameters), REQUEST_COLUMNS)
    return _stamp(frame, table)


def group_keys(by: str | Iterable[str], allowed: Iterable[str] = COST_DIMENSIONS) -> list[str]:
    """`by` as a list of distinct dimension names from `allowed`, or a ValueError naming the first bad one."""
    keys, allowed = ([by] if isinstance(by, str) else list(by)), list(allowed)
    unknown = [k for k in keys if k not in allowed]
    if unknown or len(set(keys)) != len(keys):
        raise ValueError(f"cannot group cost by {unknown[0] if unknown else keys!r}; "
                         f"use distinct names from {', '.join(allowed)}")
    return keys


ROLLUP_COST_SQL = """
SELECT kind, pipeline, step, route, model,
       sum(requests) AS n, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(unbatched_duration_sum_ns) AS unbatched_ns, sum(duration_sum_ns) AS duration_ns
FROM {rollup_table}
WHERE {time_column} >= {time_floor}(now() - toIntervalSecond({window_seconds:UInt32}))
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY kind, pipeline, step, route, model
"""
_ROLLUP_DIMENSIONS = ("pipeline", "step", "route", "model")


def _cost_per_1k_rollup(client, since: str | int, keys: list[str], pipeline: str, table: PriceTable) -> pl.DataFrame:
    """Cost per 1k from the per-minute / hourly rollup: SQL sums per (kind, pipeline, step, route, model),
    priced here on those few rows. Batched compute is the batch spans' total duration (the sum of every
    request's batch share); unbatched compute is the step spans' duration (their self time: executor
    steps are leaves). Per-call prices match the step name only (the provider is not rolled up)."""
    from tracetune.analyzer.stats import _ROLLUPS, HOURLY_FROM_SECONDS

    unknown = [k for k in keys if k not in _ROLLUP_DIMENSIONS]
    if unknown:
        raise ValueError(f"the rollup has no per-{unknown[0]} compute of batches; group by "
                         f"{', '.join(_ROLLUP_DIMENSIONS)} or use source='raw'")
    seconds = since if isinstance(since, int) else parse_window(since)
    rollup, time_column, floor = _ROLLUPS["hour" if seconds >= HOURLY_FROM_SECONDS else "minute"]
    sql = (ROLLUP_COST_SQL.replace("{rollup_table}", rollup).replace("{time_column}", time_column)
           .replace("{time_floor}", floor))
    result = client.query(sql, parameters={"window_seconds": seconds, "pipeline": pipeline})
    rows = pl.DataFrame(result.result_rows, schema=list(result.column_names), orient="row",
                        infer_schema_length=None) if result.result_rows else pl.DataFrame(
        schema={"kind": pl.Utf8, "pipeline": pl.Utf8, "step": pl.Utf8, "route": pl.Utf8, "model": pl.Utf8,
                "n": pl.Int64, "input_tokens": pl.Int64, "output_tokens": pl.Int64, "unbatched_ns": pl.Int64,
                "duration_ns": pl.Int64})

    priced = price_cells(rows, table)
    sums = [pl.col(name).sum().cast(dtype) for name, dtype in _SUMS.items()]
    costs = priced.group_by(keys).agg(sums) if keys else priced.select(sums)
    roots = rows.filter(pl.col("kind") == "root")
    if "pipeline" in keys:
        requests = roots.group_by("pipeline").agg(requests=pl.col("n").sum().cast(pl.Int64))
        frame = costs.join(requests, on="pipeline", how="left")
    else:
        frame = costs.with_columns(requests=pl.lit(int(roots["n"].sum() or 0), pl.Int64))
    frame = frame.with_columns(cost_per_1k=pl.when(pl.col("requests") > 0)
                               .then(1000 * pl.col("cost") / pl.col("requests")).otherwise(None))
    frame = frame.select(*keys, "requests", *_SUMS, "cost_per_1k")
    return _stamp(frame.sort(keys) if keys else frame, table)


def cost_per_1k(client, since: str | int = "1h", by: str | Iterable[str] = ("pipeline",), pipeline: str = "", *,
                prices: PriceTable | None = None, source: str = "raw") -> pl.DataFrame:
    """Cost per 1k requests grouped by any of pipeline, tenant, step, route, model.

    `source="rollup"` reads the per-minute / hourly rollups instead of raw spans (flat cost as spans
    grow; pipeline, step, route and model only).

    The denominator is the requests (root spans) of the row's pipeline/tenant — all requests when
    `by` names neither — so step, route and model rows add up to their pipeline's cost per 1k.
    Columns: *by, requests, spans, input_tokens, output_tokens, compute_seconds, token_cost,
    compute_cost, call_cost, cost, cost_per_1k, unpriced_spans, price_version, currency.
    """
    keys = group_keys(by)
    table = resolve_prices(client, prices)
    if source == "rollup":
        return _cost_per_1k_rollup(client, since, keys, pipeline, table)
    if source != "raw":
        raise ValueError(f"source must be 'raw' or 'rollup', not {source!r}")
    result = client.query(COST_BREAKDOWN_SQL, parameters=_parameters(table, since, pipeline))
    raw = result_frame(result, {"kind": pl.Utf8, **{k: pl.Utf8 for k in COST_DIMENSIONS}, "n": pl.Int64,
                          **{k: v for k, v in _SUMS.items() if k != "spans"}})
    request_keys = [k for k in keys if k in _REQUEST_DIMENSIONS]
    requests = raw.filter(pl.col("kind") == "requests")
    requests = (requests.group_by(request_keys).agg(requests=pl.col("n").sum()) if request_keys
                else pl.DataFrame({"requests": [requests["n"].sum()]}, schema={"requests": pl.Int64}))
    steps = raw.filter(pl.col("kind") == "steps").rename({"n": "spans"})
    sums = [pl.col(name).sum().cast(dtype) for name, dtype in _SUMS.items()]
    costs = steps.group_by(keys).agg(sums) if keys else steps.select(sums)
    if not request_keys:
        frame = costs.join(requests, how="cross")
    elif set(keys) <= set(_REQUEST_DIMENSIONS):  # requests without step spans still show, at cost 0
        frame = requests.join(costs, on=request_keys, how="left").with_columns(
            pl.col(name).fill_null(0) for name in _SUMS)
    else:
        frame = costs.join(requests, on=request_keys, how="left")
    frame = frame.with_columns(cost_per_1k=pl.when(pl.col("requests") > 0)
                               .then(1000 * pl.col("cost") / pl.col("requests")).otherwise(None))
    frame = frame.select(*keys, "requests", *_SUMS, "cost_per_1k")
    if keys:
        frame = frame.sort(keys)
    return _stamp(frame, table)


def cost_over_time(client, since: str | int = "1h", bucket_seconds: int = 60, pipeline: str = "", *,
                   prices: PriceTable | None = None) -> pl.DataFrame:
    """Requests, cost and cost per 1k per pipeline per time bucket (by the root span's start).

    Columns: bucket, pipeline, requests, token_cost, compute_cost, call_cost, cost, cost_per_1k,
    unpriced_spans, price_version, currency.
    """
    table = resolve_prices(client, prices)
    parameters = {**_parameters(table, since, pipeline), "bucket_seconds": max(1, int(bucket_seconds))}
    frame = result_frame(client.query(COST_OVER_TIME_SQL, parameters=parameters), OVER_TIME_COLUMNS)
    return _stamp(frame, table)


def price_cells(cells: pl.DataFrame, table: PriceTable) -> pl.DataFrame:
    """Step and batch cells priced with `table`: spans, tokens, compute_seconds, token/compute/call cost, cost,
    unpriced_spans (root cells are dropped: they are the requests, not the cost).

    Compute is a step span's own time, or for batched steps the batch span's duration (each request's
    share of it); tokens are priced by model, compute by route, calls by step name. A span is unpriced
    when its tokens' model, or its route when the step has no per-call price, is missing from the table:
    a step priced per call is priced, whatever its route.
    """
    def price(mapping: dict, column: str) -> pl.Expr:
        return pl.col(column).replace_strict(mapping, default=0.0, return_dtype=pl.Float64)

    step = pl.col("kind") == "step"
    tokens = pl.col("input_tokens") + pl.col("output_tokens")
    return cells.filter(pl.col("kind") != "root").with_columns(
        spans=pl.when(step).then(pl.col("n")).otherwise(0),
        input_tokens=pl.when(step).then(pl.col("input_tokens")).otherwise(0),
        output_tokens=pl.when(step).then(pl.col("output_tokens")).otherwise(0),
        compute_seconds=pl.when(pl.col("kind") == "batch").then(pl.col("duration_ns"))
        .otherwise(pl.col("unbatched_ns")) / 1e9,
    ).with_columns(
        token_cost=(pl.col("input_tokens") * price({m: p.input_per_1m for m, p in table.models.items()}, "model")
                    + pl.col("output_tokens") * price({m: p.output_per_1m for m, p in table.models.items()},
                                                      "model")) / 1e6,
        compute_cost=pl.col("compute_seconds") * price(table.routes, "route"),
        call_cost=pl.col("spans") * price(table.calls, "step"),
        unpriced_spans=pl.when(((tokens > 0) & ~pl.col("model").is_in(list(table.models)))
                               | ((pl.col("route") != "") & ~pl.col("route").is_in(list(table.routes))
                                  & ~pl.col("step").is_in(list(table.calls))))
        .then(pl.col("spans")).otherwise(0),
    ).with_columns(cost=pl.col("token_cost") + pl.col("compute_cost") + pl.col("call_cost"))

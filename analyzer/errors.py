"""Why tasks fail: error messages grouped by pipeline, step, kind and message (`tracetune errors`).

A failed task is a root span with an error status. Its kind tells whose fault it was:

| kind     | when                                                                                   |
|----------|----------------------------------------------------------------------------------------|
| `client` | the span's `tracetune.error_kind` is `client` (the executor's refusal of invalid input), |
|          | or, without it, a 4xx `error.type` / `http.response.status_code` (OTel conventions)    |
| `server` | every other error (a step crashed, a dependency failed, retries ran out)               |

The availability SLO counts only server errors: a user's empty ticket is not the service being down.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

from tracetune.analyzer.stats import parse_window

__all__ = ["ERROR_COLUMNS", "ERROR_KINDS", "ERROR_KIND_SQL", "errors"]

ERROR_KINDS = ("client", "server")

# The kind of an error span, from its own attributes; the same expression as the materialized view
# store/sql/046_tracetune_task_errors_1m_mv.sql (tests check that both agree).
ERROR_KIND_SQL = """multiIf(
    SpanAttributes['tracetune.error_kind'] IN ('client', 'server'), SpanAttributes['tracetune.error_kind'],
    match(SpanAttributes['error.type'], '^4[0-9][0-9]$')
        OR match(SpanAttributes['http.response.status_code'], '^4[0-9][0-9]$'), 'client',
    'server')"""

# Per trace: was the task (root span) failed, of which kind, and which step spans failed with what message.
# Every failed step span is reported; a failed task counts (failed_tasks) at its last failed step, or at
# the root when no step failed (its root span repeats that step's error, so it is not counted again).
# That step takes the task's kind; steps the task survived (e.g. a fallback answer) keep their own.
ERRORS_SQL = """
SELECT pipeline, step, kind, message, count() AS count, countIf(failed_here) AS failed_tasks,
       max(at) AS last_seen, argMax(trace_id, at) AS example_trace_id
FROM (
    SELECT trace_id, pipeline, failure.1 AS step, failure.3 AS at,
           task_failed AND idx = length(failures) AS failed_here,
           if(failed_here AND root_kind != '', root_kind, failure.4) AS kind,
           if(failure.2 != '', failure.2, '(no message)') AS message
    FROM (
        SELECT TraceId AS trace_id,
               any(SpanAttributes['tracetune.pipeline']) AS pipeline,
               countIf(is_root AND is_error) > 0 AS task_failed,
               anyIf(span_kind, is_root AND is_error) AS root_kind,
               arraySort(f -> f.3, groupArrayIf((step, StatusMessage, Timestamp, span_kind), is_error AND NOT is_root))
                   AS step_errors,
               if(empty(step_errors), groupArrayIf(('', StatusMessage, Timestamp, span_kind), is_error AND is_root),
                  step_errors) AS failures
        FROM (
            SELECT TraceId, SpanAttributes, StatusMessage, Timestamp,
                   SpanAttributes['tracetune.step'] AS step,
                   step = '' AS is_root,
                   StatusCode IN ('Error', 'STATUS_CODE_ERROR') AS is_error,
                   {kind_sql} AS span_kind
            FROM otel_traces
            WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
              AND SpanAttributes['tracetune.pipeline'] != ''
              AND (SpanAttributes['tracetune.step'] != '' OR ParentSpanId = '')
              AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
        )
        GROUP BY TraceId
        HAVING countIf(is_error) > 0
    )
    ARRAY JOIN failures AS failure, arrayEnumerate(failures) AS idx
)
WHERE ({kind:String} = '' OR kind = {kind:String})
GROUP BY pipeline, step, kind, message
ORDER BY count DESC, pipeline, step, message
LIMIT {limit:UInt32}
""".replace("{kind_sql}", ERROR_KIND_SQL)

ERROR_COLUMNS = {"pipeline": pl.Utf8, "step": pl.Utf8, "kind": pl.Utf8, "message": pl.Utf8, "count": pl.Int64,
                 "failed_tasks": pl.Int64, "last_seen": pl.Datetime("us", "UTC"), "example_trace_id": pl.Utf8}


def errors(client, since: str | int = "1h", pipeline: str = "", kind: Literal["", "client", "server"] = "",
           limit: int = 100) -> pl.DataFrame:
    """Error messages in the trailing window, grouped (ERROR_COLUMNS), most frequent first.

    count: error spans with that message; failed_tasks: how many of them failed their task (the rest
    were step errors the task survived). step is "" for a task that failed outside every step. A
    failed task counts once, at its last failed step (its root span repeats that error).
    """
    if kind not in ("", *ERROR_KINDS):
        raise ValueError(f"error kind must be one of {', '.join(ERROR_KINDS)}, not {kind!r}")
    seconds = since if isinstance(since, int) else parse_window(since)
    result = client.query(ERRORS_SQL, parameters={"window_seconds": seconds, "pipeline": pipeline, "kind": kind,
                                                  "limit": max(1, int(limit))})
    if not result.result_rows:
        return pl.DataFrame(schema=ERROR_COLUMNS)
    frame = pl.DataFrame([dict(zip(result.column_names, row, strict=True)) for row in result.result_rows],
                         infer_schema_length=None)
    last_seen = pl.col("last_seen")
    last_seen = last_seen.dt.convert_time_zone("UTC") if frame.schema["last_seen"].time_zone else \
        last_seen.dt.replace_time_zone("UTC")  # type: ignore[union-attr]
    return frame.with_columns(last_seen).select(list(ERROR_COLUMNS)).cast(ERROR_COLUMNS)

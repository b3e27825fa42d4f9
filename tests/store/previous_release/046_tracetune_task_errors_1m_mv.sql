-- A failed task is a root span (tracetune.pipeline set, no tracetune.step, no parent) with an error status.
-- Its kind, as ERROR_KIND_SQL in analyzer/errors.py (a test checks they agree): the executor's
-- `tracetune.error_kind` when set, else a 4xx `error.type` or `http.response.status_code` is 'client',
-- else 'server'. Counts only spans written after this view exists (no backfill).
CREATE MATERIALIZED VIEW IF NOT EXISTS tracetune_task_errors_1m_mv TO tracetune_task_errors_1m AS
SELECT
    toStartOfMinute(Timestamp) AS minute,
    SpanAttributes['tracetune.pipeline'] AS pipeline,
    SpanAttributes['tracetune.tenant'] AS tenant,
    multiIf(SpanAttributes['tracetune.error_kind'] IN ('client', 'server'), SpanAttributes['tracetune.error_kind'],
            match(SpanAttributes['error.type'], '^4[0-9][0-9]$')
                OR match(SpanAttributes['http.response.status_code'], '^4[0-9][0-9]$'), 'client',
            'server') AS error_kind,
    toUInt64(count()) AS errors
FROM otel_traces
WHERE SpanAttributes['tracetune.pipeline'] != ''
  AND SpanAttributes['tracetune.step'] = ''
  AND ParentSpanId = ''
  AND StatusCode IN ('Error', 'STATUS_CODE_ERROR')
GROUP BY minute, pipeline, tenant, error_kind

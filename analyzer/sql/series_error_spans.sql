-- The error list of the Steps page, from the failed spans alone (no trace is reassembled, so the cost
-- follows the failures, not the traffic): per pipeline, step ('' for the task's root span), kind and
-- message, how many spans failed so, when last, and the newest one's trace id. The kind is the span's
-- own, as analyzer/errors.py classifies it (the placeholder below is its ERROR_KIND_SQL, a constant).
SELECT
    SpanAttributes['tracetune.pipeline'] AS pipeline,
    SpanAttributes['tracetune.step'] AS step,
    {kind_sql} AS kind,
    if(StatusMessage != '', StatusMessage, '(no message)') AS message,
    count() AS count,
    max(Timestamp) AS last_seen,
    argMax(TraceId, Timestamp) AS example_trace_id
FROM otel_traces
WHERE StatusCode IN ('Error', 'STATUS_CODE_ERROR')
  AND Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
  AND SpanAttributes['tracetune.pipeline'] != ''
  AND (SpanAttributes['tracetune.step'] != '' OR ParentSpanId = '')
  AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
GROUP BY pipeline, step, kind, message
ORDER BY count DESC, pipeline, step, message
LIMIT {limit:UInt32}

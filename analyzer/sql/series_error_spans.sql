-- The error list of the Steps page, from the failed spans alone (no trace is reassembled, so the cost
-- follows the failures, not the traffic): per pipeline, step ('' for the task's root span), kind and
-- message, how many spans failed so, when last, and the newest one's trace id. The kind is the span's
-- own, as analyzer/errors.py classifies it (the placeholder below is its ERROR_KIND_SQL, a constant).
-- The failures come from tracetune_error_spans (fed by a view since migration 165). The part of the window
-- before its first row since a day before the window (a store that had spans before the view existed, or no
-- failure for that long) is read from otel_traces as before: no span is in both parts, none is missed, so
-- the answer does not depend on when the view was created; once failures are copied, that part is empty.
WITH now64(9) - toIntervalSecond({window_seconds:UInt32}) AS window_start,
     (SELECT if(count() = 0, now64(9) + toIntervalSecond(1), min(Timestamp)) FROM tracetune_error_spans
      WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32}) - toIntervalDay(1)) AS copied_from
SELECT
    SpanAttributes['tracetune.pipeline'] AS pipeline,
    SpanAttributes['tracetune.step'] AS step,
    {kind_sql} AS kind,
    if(StatusMessage != '', StatusMessage, '(no message)') AS message,
    count() AS count,
    max(Timestamp) AS last_seen,
    argMax(TraceId, Timestamp) AS example_trace_id
FROM (
    SELECT Timestamp, TraceId, ParentSpanId, StatusMessage, SpanAttributes
    FROM tracetune_error_spans
    WHERE Timestamp >= window_start
    UNION ALL
    SELECT Timestamp, TraceId, ParentSpanId, StatusMessage, SpanAttributes
    FROM otel_traces
    WHERE StatusCode IN ('Error', 'STATUS_CODE_ERROR')
      AND Timestamp >= window_start AND Timestamp < copied_from
)
WHERE SpanAttributes['tracetune.pipeline'] != ''
  AND (SpanAttributes['tracetune.step'] != '' OR ParentSpanId = '')
  AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
GROUP BY pipeline, step, kind, message
ORDER BY count DESC, pipeline, step, message
LIMIT {limit:UInt32}

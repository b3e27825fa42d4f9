-- Per pipeline step over a trailing window: requests, errors and exact latency percentiles (ms).
SELECT
    SpanAttributes['tracetune.pipeline'] AS pipeline,
    SpanAttributes['tracetune.step'] AS step,
    count() AS requests,
    countIf(StatusCode = 'STATUS_CODE_ERROR') AS errors,
    errors / requests AS error_rate,
    quantilesExactInclusive(0.5, 0.95, 0.99)(Duration) AS q,
    q[1] / 1e6 AS p50_ms,
    q[2] / 1e6 AS p95_ms,
    q[3] / 1e6 AS p99_ms,
    max(Duration) / 1e6 AS max_ms
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
  AND SpanAttributes['tracetune.step'] != ''
  AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
GROUP BY pipeline, step
ORDER BY pipeline, step

-- p50 / p95 per step per time bucket over a trailing window (ms), for latency charts.
SELECT
    toStartOfInterval(Timestamp, toIntervalSecond({bucket_seconds:UInt32})) AS bucket,
    SpanAttributes['tracetune.pipeline'] AS pipeline,
    SpanAttributes['tracetune.step'] AS step,
    count() AS requests,
    quantileExactInclusive(0.5)(Duration) / 1e6 AS p50_ms,
    quantileExactInclusive(0.95)(Duration) / 1e6 AS p95_ms
FROM otel_traces
WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
  AND SpanAttributes['tracetune.step'] != ''
  AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
GROUP BY bucket, pipeline, step
ORDER BY bucket, pipeline, step

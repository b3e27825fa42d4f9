-- Distributions of batch size, queue time and queue depth per pipeline step and route, from the raw step
-- spans that ran in a batch: quantiles, and how many spans ran in batches of each size. Queue depth is
-- `tracetune.queue_depth`, the requests in the route's batch queue when a request joined it (itself
-- included); 0 for spans of executors that do not record it. mapContains lets the store skip, by the span
-- attribute key index (idx_span_attr_key), every granule without a batched span: the cost follows the batched
-- spans, not the traffic (an OpenTelemetry app that never batches costs nothing here).
SELECT
    pipeline, step, route,
    count() AS batched_spans,
    quantilesExactInclusive(0.5, 0.95)(batch_size) AS bq,
    bq[1] AS batch_size_p50, bq[2] AS batch_size_p95, max(batch_size) AS batch_size_max,
    quantilesExactInclusive(0.5, 0.95, 0.99)(queue_ms) AS qq,
    qq[1] AS queue_ms_p50, qq[2] AS queue_ms_p95, qq[3] AS queue_ms_p99, max(queue_ms) AS queue_ms_max,
    quantilesExactInclusive(0.5, 0.95)(queue_depth) AS dq,
    dq[1] AS queue_depth_p50, dq[2] AS queue_depth_p95, max(queue_depth) AS queue_depth_max,
    sumMap([batch_size], [toUInt64(1)]) AS size_histogram
FROM (
    SELECT SpanAttributes['tracetune.pipeline'] AS pipeline, SpanAttributes['tracetune.step'] AS step,
           SpanAttributes['tracetune.route'] AS route,
           toUInt32OrZero(SpanAttributes['tracetune.batch_size']) AS batch_size,
           toFloat64OrZero(SpanAttributes['tracetune.queue_ms']) AS queue_ms,
           toUInt32OrZero(SpanAttributes['tracetune.queue_depth']) AS queue_depth
    FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
      AND mapContains(SpanAttributes, 'tracetune.batch_size')
      AND SpanAttributes['tracetune.step'] != '' AND SpanAttributes['tracetune.batch_size'] != ''
      AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
)
GROUP BY pipeline, step, route
ORDER BY pipeline, step, route

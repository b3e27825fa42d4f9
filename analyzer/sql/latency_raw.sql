-- The same figures as latency_rollup.sql, exact, from raw spans (for checks and small windows).
SELECT
    {group_by},
    count() AS requests,
    countIf(StatusCode IN ('Error', 'STATUS_CODE_ERROR')) AS errors,
    errors / requests AS error_rate,
    -- per second of data: from the first span in the window (of any group) to now, at least 1 s
    requests / greatest(1, (toUnixTimestamp64Milli(now64(3)) - toUnixTimestamp64Milli(min(min(Timestamp)) OVER ())) / 1e3)
        AS throughput_rps,
    quantilesExactInclusive(0.5, 0.9, 0.95, 0.99)(Duration) AS q,
    q[1] / 1e6 AS p50_ms,
    q[3] / 1e6 AS p95_ms,
    q[4] / 1e6 AS p99_ms,
    max(Duration) / 1e6 AS max_ms,
    avg(Duration) / 1e6 AS mean_ms,
    if(countIf(cache IN ('hit', 'miss')) = 0, nan, countIf(cache = 'hit') / countIf(cache IN ('hit', 'miss')))
        AS cache_hit_rate,
    if(countIf(batch_size > 0) = 0, nan, sumIf(batch_size, batch_size > 0) / countIf(batch_size > 0))
        AS mean_batch_size,
    if(countIf(batch_size > 0) = 0, nan, sumIf(queue_ms, batch_size > 0) / countIf(batch_size > 0)) AS mean_queue_ms
FROM (
    SELECT
        SpanAttributes['tracetune.pipeline'] AS pipeline,
        SpanAttributes['tracetune.step'] AS step,
        SpanAttributes['tracetune.route'] AS route,
        SpanAttributes['tracetune.tenant'] AS tenant,
        SpanAttributes['gen_ai.request.model'] AS model,
        if(SpanAttributes['tracetune.step'] != '', 'step', 'root') AS kind,
        ServiceName AS service,
        StatusCode,
        Timestamp,
        Duration,
        SpanAttributes['tracetune.cache'] AS cache,
        toUInt64OrZero(SpanAttributes['tracetune.batch_size']) AS batch_size,
        toFloat64OrZero(SpanAttributes['tracetune.queue_ms']) AS queue_ms
    FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
      AND SpanAttributes['tracetune.pipeline'] != ''
      AND (SpanAttributes['tracetune.step'] != '' OR ParentSpanId = '')
)
WHERE {step_filter}
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY {group_by}
ORDER BY {group_by}

-- Cold starts: the first request each model variant served after an executor started (step spans with
-- `tracetune.cold_start`), per pipeline step and route: how many (one per variant per executor start), on how
-- many executors (`service.instance.id`), their latency, and the route's median latency otherwise, to compare.
SELECT
    pipeline, step, route,
    countIf(cold) AS cold_starts,
    uniqExactIf(instance, cold) AS executors,
    quantileExactInclusiveIf(0.5)(duration_ms, cold) AS cold_ms_p50,
    maxIf(duration_ms, cold) AS cold_ms_max,
    quantileExactInclusiveIf(0.5)(duration_ms, NOT cold) AS warm_ms_p50,
    maxIf(at, cold) AS last_cold_start
FROM (
    SELECT SpanAttributes['tracetune.pipeline'] AS pipeline, SpanAttributes['tracetune.step'] AS step,
           SpanAttributes['tracetune.route'] AS route, SpanAttributes['tracetune.cold_start'] = 'true' AS cold,
           ResourceAttributes['service.instance.id'] AS instance, Duration / 1e6 AS duration_ms, Timestamp AS at
    FROM otel_traces
    WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
      AND SpanAttributes['tracetune.step'] != ''
      AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
)
GROUP BY pipeline, step, route
HAVING cold_starts > 0
ORDER BY pipeline, step, route

-- Cold starts: the first request each model variant served after an executor started (step spans with
-- `tracetune.cold_start`), per pipeline step and route: how many (one per variant per executor start), on how
-- many executors (`service.instance.id`), their latency, and the route's median latency otherwise, to compare.
-- The window's spans are read only if one of them is a cold start: the scalar subquery asks the span attribute
-- key index (idx_span_attr_key), which skips every granule without the key, and a window with none (most
-- windows: executors start rarely) answers at once with no row, as it would after reading them all.
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
      AND (SELECT count() FROM otel_traces
           WHERE Timestamp >= now64(9) - toIntervalSecond({window_seconds:UInt32})
             AND mapContains(SpanAttributes, 'tracetune.cold_start')) > 0
)
GROUP BY pipeline, step, route
HAVING cold_starts > 0
ORDER BY pipeline, step, route

CREATE MATERIALIZED VIEW IF NOT EXISTS tracetune_spans_1h_mv TO tracetune_spans_1h AS
SELECT
    toStartOfHour(minute) AS hour,
    service, kind, pipeline, step, route, tenant, model, status,
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(duration_sum_ns) AS duration_sum_ns,
    sum(unbatched_duration_sum_ns) AS unbatched_duration_sum_ns,
    max(duration_max_ns) AS duration_max_ns,
    quantilesDDMergeState(0.005, 0.5, 0.9, 0.95, 0.99)(duration_q) AS duration_q,
    sumMapMergeState(duration_hist) AS duration_hist,
    sum(cache_hits) AS cache_hits,
    sum(cache_lookups) AS cache_lookups,
    sum(batched) AS batched,
    sum(batch_size_sum) AS batch_size_sum,
    sum(queue_ms_sum) AS queue_ms_sum,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens
FROM tracetune_spans_1m
GROUP BY hour, service, kind, pipeline, step, route, tenant, model, status

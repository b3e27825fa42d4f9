-- Latency, errors, cache and batching per group from the per-minute rollup.
-- {group_by} is one of a fixed set of column lists chosen in analyzer/stats.py, never user text.
SELECT
    {group_by},
    sum(requests) AS requests,
    sum(errors) AS errors,
    errors / requests AS error_rate,
    -- per second of data: from the first minute with data in the window (the window's start at most) to now
    requests / greatest(1, dateDiff('second', greatest(min(min({time_column})) OVER (),
                                                       now() - toIntervalSecond({window_seconds:UInt32})), now()))
        AS throughput_rps,
    quantilesDDMerge(0.005, 0.5, 0.9, 0.95, 0.99)(duration_q) AS q,
    q[1] / 1e6 AS p50_ms,
    q[3] / 1e6 AS p95_ms,
    q[4] / 1e6 AS p99_ms,
    max(duration_max_ns) / 1e6 AS max_ms,
    sum(duration_sum_ns) / requests / 1e6 AS mean_ms,
    if(sum(cache_lookups) = 0, nan, sum(cache_hits) / sum(cache_lookups)) AS cache_hit_rate,
    if(sum(batched) = 0, nan, sum(batch_size_sum) / sum(batched)) AS mean_batch_size,
    if(sum(batched) = 0, nan, sum(queue_ms_sum) / sum(batched)) AS mean_queue_ms
FROM {rollup_table}
WHERE {time_column} >= {time_floor}(now() - toIntervalSecond({window_seconds:UInt32}))
  AND {step_filter}
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY {group_by}
ORDER BY {group_by}

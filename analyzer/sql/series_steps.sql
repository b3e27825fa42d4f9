-- Per time bucket x pipeline x step x route from the per-minute or hourly rollup: requests, errors,
-- p50 / p95 / p99 (DDSketch, 0.5% relative error), cache hit rate, mean batch size and queue time.
-- Root spans (whole tasks) come back with step = '' and route = ''. bucket_seconds = 0: one bucket for
-- the whole window (stamped 1970-01-01); tasks_only = 1: the root rows alone. {rollup_table}, {time_column},
-- {time_floor} come from the allow-list in analyzer/series.py, never from user text; every value is a typed
-- parameter.
SELECT
    if({bucket_seconds:UInt32} = 0, toDateTime(0, 'UTC'),
       toStartOfInterval(toDateTime({time_column}, 'UTC'),
                         toIntervalSecond(greatest(1, {bucket_seconds:UInt32})))) AS bucket,
    pipeline,
    if(kind = 'root', '', step) AS step,
    if(kind = 'root', '', route) AS route,
    sum(requests) AS requests,
    sum(errors) AS errors,
    quantilesDDMerge(0.005, 0.5, 0.9, 0.95, 0.99)(duration_q) AS q,
    q[1] / 1e6 AS p50_ms,
    q[3] / 1e6 AS p95_ms,
    q[4] / 1e6 AS p99_ms,
    if(sum(cache_lookups) = 0, nan, sum(cache_hits) / sum(cache_lookups)) AS cache_hit_rate,
    if(sum(batched) = 0, nan, sum(batch_size_sum) / sum(batched)) AS mean_batch_size,
    if(sum(batched) = 0, nan, sum(queue_ms_sum) / sum(batched)) AS mean_queue_ms
FROM {rollup_table}
WHERE {time_column} >= {time_floor}(now() - toIntervalSecond({window_seconds:UInt32}))
  AND (kind = 'root' OR (kind = 'step' AND {tasks_only:UInt8} = 0))
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
  AND ({tenant:String} = '' OR tenant = {tenant:String})
GROUP BY bucket, pipeline, step, route
ORDER BY bucket, pipeline, step, route

-- p50 / p95 per step per bucket (a whole number of minutes) from the per-minute rollup.
SELECT
    toStartOfInterval(minute, toIntervalSecond({bucket_seconds:UInt32})) AS bucket,
    pipeline,
    step,
    sum(requests) AS requests,
    quantilesDDMerge(0.005, 0.5, 0.9, 0.95, 0.99)(duration_q) AS q,
    q[1] / 1e6 AS p50_ms,
    q[3] / 1e6 AS p95_ms
FROM tracetune_spans_1m
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({window_seconds:UInt32}))
  AND kind = 'step'
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY bucket, pipeline, step
ORDER BY bucket, pipeline, step

-- What cost is made of, per time bucket x kind x pipeline x step x route x model x tenant, from the
-- per-minute or hourly rollup: spans, batched step spans, tokens, and durations (unbatched step time;
-- a batch row's duration is the compute its requests shared). The window is the `window_seconds`
-- before now, shifted back by `offset_seconds` (the previous period: offset = window). bucket_seconds
-- = 0: one bucket for the whole window. Prices are applied in analyzer/series.py on these few rows.
SELECT
    if({bucket_seconds:UInt32} = 0, toDateTime(0, 'UTC'),
       toStartOfInterval(toDateTime({time_column}, 'UTC'),
                         toIntervalSecond(greatest(1, {bucket_seconds:UInt32})))) AS bucket,
    kind, pipeline, step, route, model, tenant,
    sum(requests) AS n,
    sum(batched) AS batched,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(unbatched_duration_sum_ns) AS unbatched_ns,
    sum(duration_sum_ns) AS duration_ns
FROM {rollup_table}
WHERE {time_column} >= {time_floor}(now() - toIntervalSecond({window_seconds:UInt32} + {offset_seconds:UInt32}))
  AND ({offset_seconds:UInt32} = 0
       OR {time_column} < {time_floor}(now() - toIntervalSecond({offset_seconds:UInt32})))
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY bucket, kind, pipeline, step, route, model, tenant
ORDER BY bucket, kind, pipeline, step, route, model, tenant

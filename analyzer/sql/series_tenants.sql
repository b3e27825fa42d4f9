-- Tenants with tasks in the window (root rows of the per-minute rollup), busiest first.
SELECT tenant, sum(requests) AS requests
FROM tracetune_spans_1m
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({window_seconds:UInt32}))
  AND kind = 'root' AND tenant != ''
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY tenant
ORDER BY requests DESC, tenant

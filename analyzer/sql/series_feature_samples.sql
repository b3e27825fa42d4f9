-- Samples of one step feature (or of step latency in ms, when `latency` is 1) in a reference and a
-- current window, reservoir-sampled to `cap` values per window, for the drift page's histograms.
SELECT window, groupArraySample({cap:UInt32}, 1)(value) AS sample
FROM (
    SELECT
        if(Timestamp >= fromUnixTimestamp64Nano({current_start:Int64}), 'current', 'reference') AS window,
        if({latency:UInt8} = 1, toString(Duration / 1e6),
           SpanAttributes[concat('tracetune.feature.', {feature:String})]) AS value
    FROM otel_traces
    WHERE ((Timestamp >= fromUnixTimestamp64Nano({reference_start:Int64})
            AND Timestamp < fromUnixTimestamp64Nano({reference_end:Int64}))
        OR (Timestamp >= fromUnixTimestamp64Nano({current_start:Int64})
            AND Timestamp < fromUnixTimestamp64Nano({current_end:Int64})))
      AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
      AND SpanAttributes['tracetune.step'] = {step:String}
      AND ({latency:UInt8} = 1 OR mapContains(SpanAttributes, concat('tracetune.feature.', {feature:String})))
)
GROUP BY window

-- Per-minute rollup of pipeline spans, fed by tracetune_spans_1m_mv. One row per minute x service x
-- kind x pipeline x step x route x tenant x model x status. kind: 'root' (a task), 'step' (a step
-- span), 'batch' (a batch span: step = the step it served; its durations sum to the compute that
-- the batched requests shared). The analyzer's latency series, SLO burn, baselines and rollup cost
-- (and the dashboard through them) read this, so their cost stays flat as raw spans grow. The tuner
-- does not: tuner/observe.py reads raw otel_traces over its short window, since it needs per-span
-- attributes this rollup does not keep (input hashes, predictions, confidences, batch padding).
-- duration_q: DDSketch states with 0.5% guaranteed relative error on every quantile.
-- duration_hist: counts per log2 bucket (8 per doubling, bucket = floor(log2(ns + 1) * 8)), to count
-- requests slower than a latency target without the raw spans.
-- non_replicated_deduplication_window as on otel_traces (see 001): a retried batch is counted once.
CREATE TABLE IF NOT EXISTS tracetune_spans_1m (
    minute DateTime CODEC(Delta, ZSTD(1)),
    service LowCardinality(String),
    kind LowCardinality(String),
    pipeline LowCardinality(String),
    step LowCardinality(String),
    route LowCardinality(String),
    tenant LowCardinality(String),
    model LowCardinality(String),
    status LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    duration_sum_ns SimpleAggregateFunction(sum, UInt64),
    unbatched_duration_sum_ns SimpleAggregateFunction(sum, UInt64),
    duration_max_ns SimpleAggregateFunction(max, UInt64),
    duration_q AggregateFunction(quantilesDD(0.005, 0.5, 0.9, 0.95, 0.99), UInt64),
    duration_hist AggregateFunction(sumMap, Map(UInt16, UInt64)),
    cache_hits SimpleAggregateFunction(sum, UInt64),
    cache_lookups SimpleAggregateFunction(sum, UInt64),
    batched SimpleAggregateFunction(sum, UInt64),
    batch_size_sum SimpleAggregateFunction(sum, UInt64),
    queue_ms_sum SimpleAggregateFunction(sum, Float64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (pipeline, kind, step, minute, route, tenant, model, status, service)
SETTINGS non_replicated_deduplication_window = 10000

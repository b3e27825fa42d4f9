-- Hourly rollup, fed from the per-minute rollup by tracetune_spans_1h_mv (a cascade of states), so
-- questions over hours or days read 60x fewer rows. Same columns, sketch and deduplication window as
-- tracetune_spans_1m.
CREATE TABLE IF NOT EXISTS tracetune_spans_1h (
    hour DateTime CODEC(Delta, ZSTD(1)),
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
PARTITION BY toYYYYMM(hour)
ORDER BY (pipeline, kind, step, hour, route, tenant, model, status, service)
SETTINGS non_replicated_deduplication_window = 10000

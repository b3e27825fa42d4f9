-- Trace id -> time range lookup, as the clickhouseexporter creates it beside otel_traces: an
-- AggregatingMergeTree, so merges keep one row per trace (min Start, max End) per week. Fed by
-- otel_traces_trace_id_ts_mv, so it drops retried batches as otel_traces does (see 001).
CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = AggregatingMergeTree()
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000

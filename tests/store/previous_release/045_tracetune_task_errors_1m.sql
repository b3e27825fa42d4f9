-- Failed tasks per minute x pipeline x tenant x error kind, fed by tracetune_task_errors_1m_mv, so the
-- availability SLO can leave out client errors (invalid input) without reading raw spans.
-- error_kind: 'client' or 'server', as analyzer/errors.py classifies a failed root span.
CREATE TABLE IF NOT EXISTS tracetune_task_errors_1m (
    minute DateTime CODEC(Delta, ZSTD(1)),
    pipeline LowCardinality(String),
    tenant LowCardinality(String),
    error_kind LowCardinality(String),
    errors SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (pipeline, error_kind, minute, tenant)
SETTINGS non_replicated_deduplication_window = 10000

-- SLO burn-rate snapshots written by the analyzer loop on every refresh (append-only history).
CREATE TABLE IF NOT EXISTS tracetune_slo_status (
    computed_at DateTime64(3),
    pipeline LowCardinality(String),
    slo LowCardinality(String),
    target_ms Nullable(Float64),
    objective Float64,
    error_budget Float64,
    period_days Float64,
    severity LowCardinality(String),
    long_window LowCardinality(String),
    short_window LowCardinality(String),
    factor Float64,
    long_burn_rate Float64,
    short_burn_rate Float64,
    firing UInt8,
    period_requests UInt64,
    period_bad Float64,
    budget_remaining Float64
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(computed_at)
ORDER BY (pipeline, slo, computed_at)

-- Drift results written by analyzer.drift.store_drift, one row per (pipeline, step, feature, statistic)
-- per run (append-only). `p_value` is nan for statistics without one (psi, wasserstein, js);
-- n_* are the sample sizes the statistic was computed on (capped per window).
CREATE TABLE IF NOT EXISTS tracetune_drift (
    computed_at DateTime64(3),
    pipeline LowCardinality(String),
    step LowCardinality(String),
    feature LowCardinality(String),
    kind LowCardinality(String),
    statistic LowCardinality(String),
    value Float64,
    p_value Float64,
    n_reference UInt64,
    n_current UInt64,
    reference_start DateTime64(3),
    reference_end DateTime64(3),
    current_start DateTime64(3),
    current_end DateTime64(3),
    status LowCardinality(String)
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(computed_at)
ORDER BY (pipeline, step, feature, computed_at)

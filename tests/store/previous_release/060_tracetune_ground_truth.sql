-- What the load generator sent and what came back, so quality can be measured against truth.
CREATE TABLE IF NOT EXISTS tracetune_ground_truth (
    sent_at DateTime64(3),
    run_id String,
    pipeline LowCardinality(String),
    trace_id String,
    tenant LowCardinality(String),
    label LowCardinality(String),
    predicted LowCardinality(String),
    scenario LowCardinality(String),
    duplicate UInt8,
    status UInt16,
    latency_ms Float64
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(sent_at)
ORDER BY (pipeline, sent_at)

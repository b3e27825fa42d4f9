-- SLOs per pipeline, versioned and append-only: the row with the highest version wins.
-- `slo` is the JSON body of analyzer.slo.SLO (p95_ms, p99_ms, error_rate, cost_per_1k, ...); an empty
-- body is a deletion (the pipeline has no SLO from that version on).
CREATE TABLE IF NOT EXISTS tracetune_slos (
    pipeline LowCardinality(String),
    version UInt32,
    slo String,
    created_at DateTime64(3) DEFAULT now64(3),
    author LowCardinality(String)
) ENGINE = MergeTree()
ORDER BY (pipeline, version)

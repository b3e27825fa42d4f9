-- Every executor config the tuner has served, one row per version (append-only).
CREATE TABLE IF NOT EXISTS tracetune_config_versions (
    pipeline LowCardinality(String),
    version UInt32,
    config String,
    created_at DateTime64(3) DEFAULT now64(3),
    author LowCardinality(String),
    reason String
) ENGINE = MergeTree()
ORDER BY (pipeline, version)

-- Whether the tuner loop may change a pipeline: frozen (it changes nothing) or pinned (a config set
-- by hand holds). A row per change (append-only); the highest (changed_at, seq) wins.
CREATE TABLE IF NOT EXISTS tracetune_tuner_state (
    changed_at DateTime64(6, 'UTC'),
    seq UInt64,
    pipeline LowCardinality(String),
    frozen Bool,
    pinned Bool,
    reason String,
    author LowCardinality(String)
) ENGINE = MergeTree()
ORDER BY (pipeline, changed_at, seq)

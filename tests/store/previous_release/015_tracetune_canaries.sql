-- Canaries: a config version served to a share of tasks before everyone gets it. A row per change of
-- state (append-only): running, then promoted, rolled_back or cancelled; the highest (changed_at, seq)
-- wins. A version whose latest state is not `promoted` is never the config in force.
CREATE TABLE IF NOT EXISTS tracetune_canaries (
    changed_at DateTime64(6, 'UTC'),
    seq UInt64,
    pipeline LowCardinality(String),
    version UInt32,
    base_version UInt32,
    share Float64,
    status LowCardinality(String),
    reason String
) ENGINE = MergeTree()
ORDER BY (pipeline, version, changed_at, seq)

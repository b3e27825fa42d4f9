-- Every tuner decision (tune, pin, change, rollback, freeze, canary ...), append-only: the config
-- before and after as JSON, the reason, the predicted effect. `seq` grows within a process, so two
-- decisions in the same microsecond still have an order: newest = highest (decided_at, seq).
CREATE TABLE IF NOT EXISTS tracetune_decisions (
    decided_at DateTime64(6, 'UTC'),
    seq UInt64,
    decision_id String,
    pipeline LowCardinality(String),
    kind LowCardinality(String),
    version_before UInt32,
    version_after UInt32,
    config_before String,
    config_after String,
    reason String,
    predicted Map(String, Float64),
    author LowCardinality(String)
) ENGINE = MergeTree()
ORDER BY (pipeline, decided_at, seq)
;
-- What was observed after a decision, appended later (one row per observation); rows of one decision
-- merge in (observed_at, seq) order, the latest value of each metric wins.
CREATE TABLE IF NOT EXISTS tracetune_decision_observations (
    observed_at DateTime64(6, 'UTC'),
    seq UInt64,
    decision_id String,
    pipeline LowCardinality(String),
    observed Map(String, Float64)
) ENGINE = MergeTree()
ORDER BY (pipeline, decision_id, observed_at, seq)

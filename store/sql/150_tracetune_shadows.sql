-- Shadow trials: a candidate config run on a sample of tasks beside the config in force, its answers
-- recorded and never returned, before a canary exposes users. A row per change of state (append-only):
-- running, then passed, rejected or cancelled; the highest (changed_at, seq) wins. `steps` holds the
-- candidate's knob changes and `plan` what the loop needs to go on to the canary (JSON).
CREATE TABLE IF NOT EXISTS tracetune_shadows (
    changed_at DateTime64(6, 'UTC'),
    seq UInt64,
    pipeline LowCardinality(String),
    trial UInt32,
    base_version UInt32,
    share Float64,
    status LowCardinality(String),
    steps String,
    plan String,
    reason String
) ENGINE = MergeTree()
ORDER BY (pipeline, trial, changed_at, seq)

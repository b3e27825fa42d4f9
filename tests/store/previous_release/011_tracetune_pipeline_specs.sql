-- What each pipeline declares (its steps' knobs with defaults and bounds, its starting SLO), as
-- executors register it with the tuner; a row per change (append-only), the latest wins.
CREATE TABLE IF NOT EXISTS tracetune_pipeline_specs (
    pipeline LowCardinality(String),
    spec String,
    registered_at DateTime64(3) DEFAULT now64(3),
    source String
) ENGINE = MergeTree()
ORDER BY (pipeline, registered_at)

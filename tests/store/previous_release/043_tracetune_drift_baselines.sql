-- Pinned drift baselines (analyzer/drift.py), versioned and append-only: per pipeline the row with the
-- highest version wins. A pipeline's drift is computed against [reference_start, reference_end) while
-- one is set; `active` 0 is a removal (from that version on, the preceding window of the same length
-- is the reference again).
CREATE TABLE IF NOT EXISTS tracetune_drift_baselines (
    pipeline LowCardinality(String),
    version UInt32,
    reference_start DateTime64(3),
    reference_end DateTime64(3),
    active UInt8,
    note String,
    created_at DateTime64(3) DEFAULT now64(3),
    author LowCardinality(String)
) ENGINE = MergeTree()
ORDER BY (pipeline, version)

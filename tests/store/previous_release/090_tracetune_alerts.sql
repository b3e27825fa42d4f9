-- Alert state changes (pending, firing, resolved, inactive), one row per change, append-only; the
-- highest (changed_at, seq) per fingerprint is the alert's state now.
CREATE TABLE IF NOT EXISTS tracetune_alert_state (
    changed_at DateTime64(6, 'UTC'),
    seq UInt64,
    fingerprint String,
    rule LowCardinality(String),
    labels Map(String, String),
    annotations Map(String, String),
    state LowCardinality(String),
    active_at DateTime64(6, 'UTC'),
    fired_at Nullable(DateTime64(6, 'UTC')),
    resolved_at Nullable(DateTime64(6, 'UTC')),
    value Float64
) ENGINE = MergeTree()
ORDER BY (fingerprint, changed_at, seq)
;
-- What each notification group last told its receivers (when, and each alert's status then).
CREATE TABLE IF NOT EXISTS tracetune_alert_groups (
    changed_at DateTime64(6, 'UTC'),
    seq UInt64,
    group_key String,
    labels Map(String, String),
    first_seen_at DateTime64(6, 'UTC'),
    last_notified_at Nullable(DateTime64(6, 'UTC')),
    notified String
) ENGINE = MergeTree()
ORDER BY (group_key, changed_at, seq)
;
-- Silences: label matchers (JSON, as Alertmanager's API writes them) and a time range; a row per change.
CREATE TABLE IF NOT EXISTS tracetune_alert_silences (
    changed_at DateTime64(6, 'UTC'),
    seq UInt64,
    silence_id String,
    matchers String,
    starts_at DateTime64(6, 'UTC'),
    ends_at DateTime64(6, 'UTC'),
    created_by String,
    comment String
) ENGINE = MergeTree()
ORDER BY (silence_id, changed_at, seq)

-- What operators did with dead letters (append-only, the audit): each replay with its outcome, each discard
-- with who and why. A letter is the idempotency key of tracetune_dead_letters (one per pipeline, step and
-- task); its state is its newest event, unless it was dead-lettered again after it (then it is open again).
-- Written by the tuner's /v1/dead-letters API (analyzer/dead_letters.py).
CREATE TABLE IF NOT EXISTS tracetune_dead_letter_events (
    at DateTime64(6, 'UTC'),
    seq UInt64 COMMENT 'orders events of the same microsecond',
    idempotency_key String,
    pipeline LowCardinality(String),
    step LowCardinality(String),
    action LowCardinality(String) COMMENT 'replayed | replay_failed | discarded',
    author String COMMENT 'who asked for it',
    reason String COMMENT 'why (a discard), or the replay''s last error',
    attempts UInt16 COMMENT 'attempts the replay made (0 for a discard)',
    http_status UInt16 COMMENT 'the downstream''s last answer; 0 when none (timeout, connection, discard)',
    response String COMMENT 'the downstream''s JSON answer to a successful replay'
) ENGINE = MergeTree()
ORDER BY (idempotency_key, at, seq)

-- Side effects that gave up (retries exhausted or refused), one row per task and step (append-only).
-- Written by executor/effects.py DeadLetters; replay a row by re-sending `payload` with `idempotency_key`.
CREATE TABLE IF NOT EXISTS tracetune_dead_letters (
    created_at DateTime64(3) DEFAULT now64(3),
    pipeline LowCardinality(String),
    step LowCardinality(String),
    task_id String,
    idempotency_key String,
    attempts UInt16,
    last_status UInt16 COMMENT 'last HTTP status; 0 when the last attempt got no answer (timeout, connection)',
    error String,
    payload String COMMENT 'JSON body of the request'
) ENGINE = MergeTree()
ORDER BY (pipeline, step, created_at)

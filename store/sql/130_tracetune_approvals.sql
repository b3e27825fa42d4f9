-- Approval modes (tuner/approval.py). Proposals of the tuning loop that an operator decides: a row when the
-- loop proposes (status `pending`, or `observed` in observe mode, with the changes, reason, predictions and
-- the objectives it restores), then claims on its outcome (`approved`, `rejected`, `expired`, `stale`).
-- Append-only; the EARLIEST claim wins, so replicas answering at once agree on one outcome. Times are the
-- store's clock (now64), never a client's.
CREATE TABLE IF NOT EXISTS tracetune_proposals (
    changed_at DateTime64(6, 'UTC') DEFAULT now64(6),
    claim String,
    proposal UInt64,
    pipeline LowCardinality(String),
    status LowCardinality(String),
    base_version UInt32,
    changes String,
    reason String,
    predicted Map(String, Float64),
    violated Array(String),
    waits_for String,
    canary_share Float64,
    expiry_seconds Float64,
    expires_at DateTime64(6, 'UTC') DEFAULT changed_at + toIntervalMicrosecond(toInt64(expiry_seconds * 1000000)),
    author LowCardinality(String),
    note String
) ENGINE = MergeTree()
ORDER BY (proposal, changed_at, claim)
;
-- Who decides a pipeline's proposals, as set through the tuner API (a newer declaration wins over an older
-- row here): the approval policy as JSON ({"mode", "knobs", "max_change"}), who set it and why.
CREATE TABLE IF NOT EXISTS tracetune_approval_modes (
    changed_at DateTime64(6, 'UTC') DEFAULT now64(6),
    pipeline LowCardinality(String),
    approval String,
    author LowCardinality(String),
    reason String
) ENGINE = MergeTree()
ORDER BY (pipeline, changed_at)

-- Leases: which replica of the analyzer or tuner is the active one (tracetune.store.lease). Append-only:
-- a claim for a term, then the winner's renewals; the earliest claim of a term wins it, the newest
-- row of a term says when it expires. Both times come from the server's clock (now64), never a client's.
-- A release is a row with `seconds` 0. Rows older than a week are dropped; a lease renews far more often.
CREATE TABLE IF NOT EXISTS tracetune_leases (
    name LowCardinality(String),
    term UInt64,
    holder String,
    seconds Float64,
    claimed_at DateTime64(6, 'UTC') DEFAULT now64(6),
    expires_at DateTime64(6, 'UTC') DEFAULT claimed_at + toIntervalMicrosecond(toInt64(seconds * 1000000))
) ENGINE = MergeTree()
ORDER BY (name, term, claimed_at, holder)
TTL toDateTime(claimed_at) + INTERVAL 7 DAY

-- Damaged write-ahead log records the collector found at start (or when reading a record back): one row
-- per run of unreadable bytes, with where it was (segment file, byte range, LSN range) and how many spans
-- it held (NULL when the records on either side cannot tell). The segment itself is kept in
-- <home>/wal/damaged/. A retried batch (same insert_deduplication_token) is stored once.
CREATE TABLE IF NOT EXISTS tracetune_wal_damage (
    detected_at DateTime64(3),
    wal_id String,
    segment String,
    start_byte UInt64,
    end_byte UInt64,
    first_lsn UInt64,
    last_lsn UInt64,
    spans Nullable(UInt64),
    kept_in String,
    message String
) ENGINE = MergeTree()
ORDER BY (detected_at, wal_id, first_lsn)
SETTINGS non_replicated_deduplication_window = 10000

-- Spans the collector received but did not store in otel_traces, one row per span with the reason,
-- kept as OTLP JSON to inspect or replay. receiver: 'http', 'grpc' or 'writer'. No TTL. A retried
-- batch (same insert_deduplication_token) is stored once, as in otel_traces (see 001).
CREATE TABLE IF NOT EXISTS tracetune_quarantine (
    received_at DateTime64(3),
    receiver LowCardinality(String),
    reason String,
    service_name LowCardinality(String),
    trace_id String,
    span_id String,
    span_name String,
    span_json String CODEC(ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(received_at)
ORDER BY (received_at)
SETTINGS non_replicated_deduplication_window = 10000

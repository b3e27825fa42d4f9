-- Failed spans (status Error), fed by tracetune_error_spans_mv with the columns the error list reads, so the
-- Steps page's error list reads the failures of its window (a few percent of the spans) instead of every
-- span's attributes. Only spans written after the view exists are here: the query reads otel_traces for
-- the part of its window older than this table's first row (analyzer/sql/series_error_spans.sql).
-- Sharded like otel_traces (by trace), so a span's copy lives on its own shard.
CREATE TABLE IF NOT EXISTS tracetune_error_spans (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY Timestamp
SETTINGS non_replicated_deduplication_window = 10000
;
-- Only the status is looked at per inserted span; the attributes are copied for the failed ones alone.
CREATE MATERIALIZED VIEW IF NOT EXISTS tracetune_error_spans_mv TO tracetune_error_spans AS
SELECT Timestamp, TraceId, ParentSpanId, StatusMessage, SpanAttributes
FROM otel_traces
WHERE StatusCode IN ('Error', 'STATUS_CODE_ERROR')

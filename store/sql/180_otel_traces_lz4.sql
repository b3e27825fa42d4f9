-- LZ4 (ClickHouse's default codec) instead of ZSTD(1) for otel_traces' text and map columns: the store
-- compresses every inserted row once and again at every merge, and on spans as the collector writes them
-- ZSTD(1) cost about 1 µs of store CPU per row more for these columns than LZ4, for parts that were no
-- smaller (bench/ingest_store.py --codecs; docs/collector.md). The ids (random hex, which only entropy coding
-- shrinks: LZ4 stores them about four times larger) and the numbers (Timestamp, Duration, event times) keep
-- ZSTD(1). Columns, types, sort key and indexes stay the contrib clickhouseexporter's. A codec change is
-- metadata only: parts already written keep ZSTD(1) until a merge rewrites them.
ALTER TABLE otel_traces
    MODIFY COLUMN TraceState CODEC(LZ4),
    MODIFY COLUMN SpanName CODEC(LZ4),
    MODIFY COLUMN SpanKind CODEC(LZ4),
    MODIFY COLUMN ServiceName CODEC(LZ4),
    MODIFY COLUMN ResourceAttributes CODEC(LZ4),
    MODIFY COLUMN ScopeName CODEC(LZ4),
    MODIFY COLUMN ScopeVersion CODEC(LZ4),
    MODIFY COLUMN SpanAttributes CODEC(LZ4),
    MODIFY COLUMN StatusCode CODEC(LZ4),
    MODIFY COLUMN StatusMessage CODEC(LZ4),
    MODIFY COLUMN `Events.Name` CODEC(LZ4),
    MODIFY COLUMN `Events.Attributes` CODEC(LZ4),
    MODIFY COLUMN `Links.TraceState` CODEC(LZ4),
    MODIFY COLUMN `Links.Attributes` CODEC(LZ4)

-- Tables created by an older tracetune lack the deduplication window that makes a retried insert
-- count once (see 001); give it to them. On tables that have it this changes nothing.
ALTER TABLE otel_traces MODIFY SETTING non_replicated_deduplication_window = 10000
;
ALTER TABLE otel_traces_trace_id_ts MODIFY SETTING non_replicated_deduplication_window = 10000
;
ALTER TABLE tracetune_spans_1m MODIFY SETTING non_replicated_deduplication_window = 10000
;
ALTER TABLE tracetune_spans_1h MODIFY SETTING non_replicated_deduplication_window = 10000

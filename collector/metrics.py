"""The collector's Prometheus metrics (served on its `/metrics`), named as Prometheus asks: unit suffixes, `_total`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SPANS_RECEIVED = Counter("tracetune_collector_spans_received", "Spans in requests that were read and parsed",
                         ["receiver"])
SPANS_ACCEPTED = Counter("tracetune_collector_spans_accepted", "Spans acknowledged (in the write-ahead log)",
                         ["receiver"])
SPANS_REJECTED = Counter("tracetune_collector_spans_rejected",
                         "Spans refused and quarantined, by the field that was wrong", ["receiver", "reason"])
REQUESTS_REFUSED = Counter("tracetune_collector_requests_refused",
                           "Requests refused whole, by HTTP status (gRPC maps them to its codes)",
                           ["receiver", "status"])
SPANS_WRITTEN = Counter("tracetune_collector_spans_written", "Spans inserted into ClickHouse")
INSERT_FAILURES = Counter("tracetune_collector_insert_failures", "Inserts that failed and will be retried or split")
QUEUE_SPANS = Gauge("tracetune_collector_queue_spans", "Spans acknowledged and not yet in ClickHouse")
WAL_BYTES = Gauge("tracetune_collector_wal_bytes", "Bytes of write-ahead log records not yet in ClickHouse")
INSERT_SECONDS = Histogram("tracetune_collector_insert_duration_seconds", "Time of one insert into ClickHouse",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCH_SPANS = Histogram("tracetune_collector_batch_spans", "Spans per insert",
                        buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000))
WAL_DAMAGED_RECORDS = Counter("tracetune_collector_wal_damaged_records",
                              "Runs of damaged write-ahead log records found and reported (tracetune_wal_damage)")

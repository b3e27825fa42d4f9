"""Inserts into the tracetune schema land or fail loudly, retried batches count once, and the views keep up."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

SPAN_COLUMNS = ["Timestamp", "TraceId", "SpanId", "ParentSpanId", "ServiceName", "SpanName", "SpanKind",
                "SpanAttributes", "Duration", "StatusCode"]
DAY0 = datetime(2024, 5, 1, 12, 0)
MAX_UINT64 = 2**64 - 1


def spans(n: int, *, days: int = 1, trace: int = 0, duration: int = 1_000_000, status: str = "Unset") -> list[list]:
    """n root spans of pipeline 'triage', spread over `days` dates (one partition of otel_traces each)."""
    return [[DAY0 + timedelta(days=i % days, seconds=i), f"{trace:016x}{i:016x}", f"{trace:08x}{i:08x}", "", "svc",
             "triage", "Server", {"tracetune.pipeline": "triage"}, duration + i, status] for i in range(n)]


def insert(client, rows: list[list], **settings) -> None:
    client.insert("otel_traces", rows, column_names=SPAN_COLUMNS, settings=settings)


def counts(client) -> tuple[int, int, int]:
    """(raw spans, requests in the minute rollup, requests in the hour rollup)."""
    return client.query("SELECT (SELECT count() FROM otel_traces), (SELECT sum(requests) FROM tracetune_spans_1m), "
                        "(SELECT sum(requests) FROM tracetune_spans_1h)").first_row


def test_insert_over_more_partitions_than_allowed_fails_and_stores_nothing(client, db_settings):
    with pytest.raises(DatabaseError) as err:
        insert(client, spans(101, days=101))
    assert err.value.code == 252 and "TOO_MANY_PARTS" in str(err.value)
    assert counts(client) == (0, 0, 0)

    # What any HTTP client sees: an error status with the engine's code, not 200.
    target = db_settings.clickhouse_target()
    body = "".join(f"{DAY0.date() + timedelta(days=i)} 00:00:00\tt{i}\ts{i}\n" for i in range(101))
    response = httpx.post(f"http://{target['host']}:{target['port']}/", content=body.encode(),
                          auth=(target["username"], target["password"]), params={
        "database": db_settings.database, "query": "INSERT INTO otel_traces (Timestamp, TraceId, SpanId) FORMAT TSV"})
    assert response.status_code == 500 and response.headers["X-ClickHouse-Exception-Code"] == "252"
    assert counts(client) == (0, 0, 0)


@pytest.mark.parametrize("limit", [0, 1000])
def test_max_partitions_per_insert_block_is_a_per_insert_setting(client, limit):
    """A replay of old data may span more dates than the engine's default of 100 (0: no limit)."""
    insert(client, spans(101, days=101), max_partitions_per_insert_block=limit)
    assert counts(client) == (101, 101, 101)


def test_error_in_a_materialized_view_fails_the_insert(client):
    client.command("CREATE TABLE sink (x UInt8) ENGINE = Null")
    client.command("CREATE MATERIALIZED VIEW failing_mv TO sink AS "
                   "SELECT throwIf(Duration = 13, 'no thirteens') AS x FROM otel_traces")
    with pytest.raises(DatabaseError) as err:
        insert(client, spans(1, duration=13))
    assert err.value.code == 395 and "no thirteens" in str(err.value)


def test_span_with_the_largest_duration_reaches_both_rollups(client):
    insert(client, spans(1, duration=MAX_UINT64))
    assert counts(client) == (1, 1, 1)
    row = client.query("SELECT max(duration_max_ns), sumMapMerge(duration_hist), "
                       "quantilesDDMerge(0.005, 0.5, 0.9, 0.95, 0.99)(duration_q)[2] FROM tracetune_spans_1m").first_row
    assert row[0] == MAX_UINT64
    assert row[1] == {512: 1}  # floor(log2(2^64) * 8): the top bucket, well inside UInt16
    assert row[2] == pytest.approx(MAX_UINT64, rel=0.01)
    hourly = client.query("SELECT max(duration_max_ns), sumMapMerge(duration_hist) FROM tracetune_spans_1h").first_row
    assert hourly == (MAX_UINT64, {512: 1})


@pytest.mark.parametrize("status", ["Error", "STATUS_CODE_ERROR"])
def test_errors_reach_the_rollups_in_either_spelling(client, status):
    insert(client, spans(3, status=status) + spans(2, trace=1, status="Unset"))
    for table in ("tracetune_spans_1m", "tracetune_spans_1h"):
        assert client.query(f"SELECT sum(requests), sum(errors) FROM {table}").first_row == (5, 3)


def test_a_retried_batch_counts_once_in_the_spans_and_every_rollup(client):
    batch = spans(50)
    insert(client, batch, insert_deduplication_token="t1")
    insert(client, batch, insert_deduplication_token="t1")
    assert counts(client) == (50, 50, 50)
    assert client.query("SELECT count() FROM otel_traces_trace_id_ts FINAL").first_row[0] == 50

    insert(client, batch, insert_deduplication_token="t2")  # another token is another batch
    assert counts(client) == (100, 100, 100)


def test_a_retried_batch_over_several_dates_counts_once(client):
    batch = spans(60, days=3)
    insert(client, batch, insert_deduplication_token="multi")
    assert client.query("SELECT uniqExact(_partition_id) FROM otel_traces").first_row[0] == 3
    insert(client, batch, insert_deduplication_token="multi")
    assert counts(client) == (60, 60, 60)


def test_a_retry_after_a_failed_view_completes_the_rollups_without_double_counting(client):
    """The spans were stored but a view failed: the retry drops the stored spans and fills in the view."""
    client.command("CREATE TABLE sink (x UInt8) ENGINE = Null")
    client.command("CREATE MATERIALIZED VIEW failing_mv TO sink AS "  # fails while max_insert_threads is 3
                   "SELECT throwIf(getSetting('max_insert_threads') = 3, 'view down') AS x FROM otel_traces")
    batch = spans(20)
    with pytest.raises(DatabaseError, match="view down"):
        insert(client, batch, insert_deduplication_token="t1", max_insert_threads=3)
    insert(client, batch, insert_deduplication_token="t1")
    assert counts(client) == (20, 20, 20)


def test_trace_lookup_table_keeps_one_row_per_trace_as_the_exporters_does(client):
    assert client.query("SELECT engine FROM system.tables WHERE database = currentDatabase() "
                        "AND name = 'otel_traces_trace_id_ts'").first_row[0] == "AggregatingMergeTree"
    first, later = spans(1), spans(1)
    later[0][0] += timedelta(hours=1)
    later[0][2] = "later"
    insert(client, first)
    insert(client, later)
    client.command("OPTIMIZE TABLE otel_traces_trace_id_ts FINAL")
    rows = client.query("SELECT TraceId, End - Start FROM otel_traces_trace_id_ts").result_rows
    assert rows == [(first[0][1], 3600)]  # one row per trace: the first start, the last end


QUARANTINE_COLUMNS = {"received_at": "DateTime64(3)", "receiver": "LowCardinality(String)", "reason": "String",
                      "service_name": "LowCardinality(String)", "trace_id": "String", "span_id": "String",
                      "span_name": "String", "span_json": "String"}


def test_quarantine_table_keeps_a_retried_batch_once(client):
    columns = dict(client.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                "AND table = 'tracetune_quarantine' ORDER BY position").result_rows)
    assert columns == QUARANTINE_COLUMNS
    row = [datetime(2024, 5, 1, 12, 0, 0, 123000), "http", "bad span id", "svc", "ab" * 16, "cd" * 8, "poison",
           '{"name": "poison"}']
    for _ in range(2):
        client.insert("tracetune_quarantine", [row], column_names=list(QUARANTINE_COLUMNS),
                      settings={"insert_deduplication_token": "q1"})
    assert client.query("SELECT * FROM tracetune_quarantine").result_rows == [tuple(row)]


def test_tables_from_an_older_schema_get_the_dedup_window_when_the_schema_is_applied(client, db_settings):
    from tracetune import store
    tables = ["otel_traces", "otel_traces_trace_id_ts", "tracetune_spans_1m", "tracetune_spans_1h"]
    for table in tables:  # as an older tracetune left them: no deduplication window
        client.command(f"ALTER TABLE {table} RESET SETTING non_replicated_deduplication_window")
    insert(client, spans(5), insert_deduplication_token="old")
    insert(client, spans(5), insert_deduplication_token="old")
    assert counts(client) == (10, 10, 10)  # without the window a retry is stored twice

    client.command("DROP TABLE tracetune_schema_migrations")  # an older tracetune kept no record of migrations
    store.connect(db_settings)  # what every component does at start
    for table in tables:
        create = client.command(f"SHOW CREATE TABLE {table}")
        assert "non_replicated_deduplication_window = 10000" in create, table
    insert(client, spans(5, trace=1), insert_deduplication_token="new")
    insert(client, spans(5, trace=1), insert_deduplication_token="new")
    assert counts(client) == (15, 15, 15)

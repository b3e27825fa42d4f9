"""clickhouse-connect against the embedded store, exactly as every tracetune component uses it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import clickhouse_connect
import pandas as pd
import pyarrow as pa
import pytest
from clickhouse_connect.driver.compression import available_compression
from clickhouse_connect.driver.exceptions import DatabaseError

# The OTel span shape in miniature: nanosecond timestamps, attribute maps, nested events.
SPANS_DDL = """
CREATE TABLE {table} (
    ts DateTime64(9),
    attrs Map(LowCardinality(String), String),
    events Nested(name LowCardinality(String), ts DateTime64(9), attrs Map(LowCardinality(String), String)),
    service LowCardinality(String),
    duration UInt64
) ENGINE = MergeTree ORDER BY (service, ts)
"""
COLUMNS = ["ts", "attrs", "events.name", "events.ts", "events.attrs", "service", "duration"]
NS = 1_714_564_800_123_456_789  # 2024-05-01T12:00:00.123456789Z: the last three digits only survive at ns
SPANS = [
    # (ts_ns, attrs, [(event name, event ts_ns, event attrs)], service, duration)
    (NS, {"http.method": "GET", "llm.model": "small"}, [("retry", NS + 1, {"attempt": "1"}), ("done", NS + 7, {})],
     "triage", 1_234_567),
    (NS + 999, {}, [], "router", 2**64 - 1),
    (NS + 1_000_000_001, {"quote": "it's \"q\"\t\\", "ünï": "cödé"}, [("x", NS, {"k": ""})], "triage", 0),
]
ORDER = "ORDER BY service, ts"


def _micros(ns: int) -> datetime:
    """What a Python datetime can hold of a DateTime64(9): clickhouse-connect truncates to microseconds."""
    return datetime(1970, 1, 1) + timedelta(microseconds=ns // 1000)


def _sorted(spans):
    return sorted(spans, key=lambda s: (s[3], s[0]))


def _native_rows():
    """Rows for client.insert: pandas Timestamps keep the nanoseconds that datetime would drop."""
    return [[pd.Timestamp(ts, unit="ns"), attrs, [e[0] for e in events],
             [pd.Timestamp(e[1], unit="ns") for e in events], [e[2] for e in events], service, duration]
            for ts, attrs, events, service, duration in SPANS]


def _arrow_table() -> pa.Table:
    ns, attrs_t = pa.timestamp("ns"), pa.map_(pa.string(), pa.string())
    return pa.table({
        "ts": pa.array([s[0] for s in SPANS], ns),
        "attrs": pa.array([list(s[1].items()) for s in SPANS], attrs_t),
        "events.name": pa.array([[e[0] for e in s[2]] for s in SPANS], pa.list_(pa.string())),
        "events.ts": pa.array([[e[1] for e in s[2]] for s in SPANS], pa.list_(ns)),
        "events.attrs": pa.array([[list(e[2].items()) for e in s[2]] for s in SPANS], pa.list_(attrs_t)),
        "service": pa.array([s[3] for s in SPANS], pa.string()),
        "duration": pa.array([s[4] for s in SPANS], pa.uint64()),
    })


def _make_table(client, database: str | None = None) -> str:
    table = f"spans_{uuid.uuid4().hex[:8]}"
    name = f"`{database}`.`{table}`" if database else table
    client.command(SPANS_DDL.format(table=name))
    return table


def _assert_reads_back(client, table: str) -> None:
    """Every read API returns what was written, at the precision that API can carry."""
    expected = _sorted(SPANS)

    # query(): Python datetimes (microseconds), dicts for maps, one list per Nested sub-column.
    result = client.query(f"SELECT {', '.join(f'`{c}`' for c in COLUMNS)} FROM {table} {ORDER}")
    assert list(result.column_names) == COLUMNS
    assert result.result_rows == [
        (_micros(ts), attrs, [e[0] for e in events], [_micros(e[1]) for e in events], [e[2] for e in events],
         service, duration)
        for ts, attrs, events, service, duration in expected
    ]
    # ...and the engine itself kept every nanosecond.
    nanos = client.query(f"SELECT toUnixTimestamp64Nano(ts), arrayMap(t -> toUnixTimestamp64Nano(t), events.ts) "
                         f"FROM {table} {ORDER}").result_rows
    assert nanos == [(s[0], [e[1] for e in s[2]]) for s in expected]

    # query_arrow(): timestamp[ns] columns, exact.
    arrow = client.query_arrow(f"SELECT * FROM {table} {ORDER}")
    assert arrow.column_names == COLUMNS
    assert arrow.schema.field("ts").type == pa.timestamp("ns", tz=arrow.schema.field("ts").type.tz)
    assert arrow.column("ts").cast(pa.int64()).to_pylist() == [s[0] for s in expected]
    event_ts = arrow.column("events.ts").combine_chunks()
    assert [[t.value for t in row] for row in event_ts.to_pylist()] == [[e[1] for e in s[2]] for s in expected]
    assert [dict(m) for m in arrow.column("attrs").to_pylist()] == [s[1] for s in expected]
    assert arrow.column("events.name").to_pylist() == [[e[0] for e in s[2]] for s in expected]
    assert [[dict(m) for m in row] for row in arrow.column("events.attrs").to_pylist()] == \
        [[e[2] for e in s[2]] for s in expected]
    assert arrow.column("service").to_pylist() == [s[3] for s in expected]
    assert arrow.column("duration").to_pylist() == [s[4] for s in expected]

    # query_df(): datetime64[ns], exact; uint64 stays unsigned.
    df = client.query_df(f"SELECT * FROM {table} {ORDER}")
    assert list(df.columns) == COLUMNS
    assert str(df["ts"].dtype) == "datetime64[ns]"
    assert [t.value for t in df["ts"]] == [s[0] for s in expected]
    assert df["duration"].tolist() == [s[4] for s in expected]
    assert df["attrs"].tolist() == [s[1] for s in expected]
    assert [list(v) for v in df["events.name"]] == [[e[0] for e in s[2]] for s in expected]
    assert [[pd.Timestamp(t).value for t in v] for v in df["events.ts"]] == [[e[1] for e in s[2]] for s in expected]
    assert df["service"].tolist() == [s[3] for s in expected]


def test_native_insert_reads_back_through_every_api(client):
    table = _make_table(client)
    summary = client.insert(table, _native_rows(), column_names=COLUMNS)
    assert summary.written_rows == len(SPANS)
    _assert_reads_back(client, table)


def test_arrow_insert_reads_back_through_every_api(client):
    table = _make_table(client)
    client.insert_arrow(table, _arrow_table())
    _assert_reads_back(client, table)


def test_query_arrow_round_trips_into_insert_arrow(client):
    source, copy = _make_table(client), _make_table(client)
    client.insert(source, _native_rows(), column_names=COLUMNS)
    client.insert_arrow(copy, client.query_arrow(f"SELECT * FROM {source}"))
    query = "SELECT toUnixTimestamp64Nano(ts), * EXCEPT ts FROM {} " + ORDER
    assert client.query(query.format(copy)).result_rows == client.query(query.format(source)).result_rows


def test_server_side_parameters_are_bound_by_the_engine(client):
    table = _make_table(client)
    client.insert(table, _native_rows(), column_names=COLUMNS)
    tricky = "it's'); DROP TABLE x; --"
    row = client.query("SELECT {s:String}, {n:UInt64}, {ts:DateTime64(9)}, {xs:Array(String)}",
                       parameters={"s": tricky, "n": 2**64 - 1, "ts": pd.Timestamp(NS, unit="ns"),
                                   "xs": ["a", "b'c"]}).first_row
    assert row == (tricky, 2**64 - 1, _micros(NS), ["a", "b'c"])
    count = client.query(f"SELECT count() FROM {table} WHERE service = {{svc:String}} AND duration < {{d:UInt64}}",
                         parameters={"svc": "triage", "d": 2**63}).first_row[0]
    assert count == 2
    assert client.command("SELECT {a:String} || {b:String}", parameters={"a": "x", "b": "y z"}) == "xy z"


def test_per_query_settings_apply_to_that_query_only(client):
    default = int(client.query("SELECT getSetting('max_threads')").first_row[0])
    assert client.query("SELECT getSetting('max_threads')", settings={"max_threads": default + 3}).first_row[0] \
        == default + 3
    assert client.query("SELECT getSetting('max_threads')").first_row[0] == default

    with pytest.raises(DatabaseError) as err:
        client.query("SELECT number FROM numbers(10)", settings={"max_result_rows": 1, "result_overflow_mode": "throw"})
    assert err.value.code == 396 and "TOO_MANY_ROWS_OR_BYTES" in str(err.value)

    # The session time zone travels back in X-ClickHouse-Timezone, so DateTime reads as local wall time.
    value = client.query("SELECT toDateTime('2024-01-01 00:00:00')",
                         settings={"session_timezone": "Asia/Tokyo"}).first_row[0]
    assert value == datetime(2024, 1, 1, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert value.utcoffset() == timedelta(hours=9)


def test_database_other_than_the_clients(client, db_settings):
    other = f"other_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE DATABASE `{other}`")
    table = _make_table(client, other)
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        client.query(f"SELECT count() FROM {table}")  # not in the client's own database

    client.insert(table, _native_rows()[:1], column_names=COLUMNS, database=other)
    client.insert_arrow(table, _arrow_table().slice(1), database=other)
    assert client.query(f"SELECT count() FROM `{other}`.{table}").first_row[0] == len(SPANS)
    assert client.query(f"SELECT currentDatabase(), count() FROM {table}",
                        settings={"database": other}).first_row == (other, len(SPANS))
    assert client.query("SELECT currentDatabase()").first_row[0] == db_settings.database

    target = db_settings.clickhouse_target()
    elsewhere = clickhouse_connect.get_client(host=target["host"], port=target["port"], database=other,
                                              username=target["username"], password=target["password"],
                                              autogenerate_session_id=False)
    try:
        assert elsewhere.query(f"SELECT count() FROM {table}").first_row[0] == len(SPANS)
    finally:
        elsewhere.close()


@pytest.mark.parametrize("query, code, name", [
    ("SELEC 1", 62, "Syntax error"),
    ("SELECT * FROM no_such_table", 60, "UNKNOWN_TABLE"),
])
def test_invalid_query_raises_database_error_with_the_engine_message(client, query, code, name):
    with pytest.raises(DatabaseError) as err:
        client.query(query)
    assert err.value.code == code
    assert name in str(err.value) and f"Code: {code}." in str(err.value)
    with pytest.raises(DatabaseError, match=name):
        client.command(query)


def test_insert_of_bad_data_raises_with_the_engine_message(client):
    table = _make_table(client)
    with pytest.raises(DatabaseError) as err:
        client.raw_insert(table, ["service", "duration"], b"triage,not-a-number\n", fmt="CSV")
    assert err.value.code is not None and "DB::Exception" in str(err.value)
    assert client.query(f"SELECT count() FROM {table}").first_row[0] == 0


@pytest.mark.parametrize("compress", [
    "lz4", "gzip",
    pytest.param("zstd", marks=pytest.mark.skipif("zstd" not in available_compression, reason="no zstd")),
    False,
])
def test_compressed_clients_round_trip(db_settings, compress):
    """Several insert blocks (one compressed frame each), then a response far bigger than one frame."""
    target = db_settings.clickhouse_target()
    client = clickhouse_connect.get_client(host=target["host"], port=target["port"], database=db_settings.database,
                                           username=target["username"], password=target["password"],
                                           compress=compress, autogenerate_session_id=False)
    try:
        assert client.compression == (compress or None)
        client.command("CREATE TABLE blobs (id UInt32, payload String) ENGINE = MergeTree ORDER BY id")
        rows = [[i, f"{i:08d}" * 125] for i in range(6000)]  # ~6 MB: clickhouse-connect sends ~2 MB blocks
        summary = client.insert("blobs", rows, column_names=["id", "payload"])
        assert summary.written_rows == len(rows)
        assert client.query("SELECT * FROM blobs ORDER BY id").result_rows == [tuple(r) for r in rows]

        table = _make_table(client)
        client.insert_arrow(table, _arrow_table())
        _assert_reads_back(client, table)
    finally:
        client.close()

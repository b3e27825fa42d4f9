"""The store's ClickHouse HTTP interface spoken directly: what curl, Grafana and other clients send."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib

import httpx
import lz4.frame
import pyarrow as pa
import pytest

try:
    from backports import zstd
except ImportError:  # pragma: no cover - depends on the environment
    zstd = None

TABLE_DDL = """
CREATE TABLE events (
    id UInt32,
    name String,
    attrs Map(String, String),
    ts DateTime64(9)
) ENGINE = MergeTree ORDER BY id
"""
ROWS = [  # (id, name, attrs, ts as ClickHouse prints it)
    (1, "plain", {"k": "v"}, "2024-05-01 12:00:00.123456789"),
    (2, "comma, \"quote\" and 'apostrophe'", {}, "2024-05-01 12:00:00.000000001"),
    (3, "tab\tnew\nline ünï", {"a": "1", "b": ""}, "1970-01-01 00:00:00.000000000"),
]
EPOCH_NS = [1_714_564_800_123_456_789, 1_714_564_800_000_000_001, 0]
SELECT_ALL = "SELECT id, name, attrs, toString(ts) AS ts FROM events ORDER BY id"

_needs_zstd = pytest.mark.skipif(zstd is None, reason="no zstd module")
COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    # Two frames, as clickhouse-connect sends one per insert block.
    "lz4": lambda data: lz4.frame.compress(data[: len(data) // 2]) + lz4.frame.compress(data[len(data) // 2:]),
    "zstd": lambda data: zstd.compress(data[: len(data) // 2]) + zstd.compress(data[len(data) // 2:]),
}
DECOMPRESSORS = {
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
    "lz4": lz4.frame.decompress,
    "zstd": lambda data: zstd.decompress(data),
}
ENCODINGS = ["gzip", "deflate", "lz4", pytest.param("zstd", marks=_needs_zstd)]


def _json_each_row(rows=ROWS) -> bytes:
    return b"".join(json.dumps({"id": i, "name": n, "attrs": a, "ts": t}).encode() + b"\n" for i, n, a, t in rows)


@pytest.fixture
def events(http) -> str:
    _ok(http.post("/", content=TABLE_DDL))
    return "events"


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    assert "X-ClickHouse-Exception-Code" not in response.headers
    return response


def _rows(http: httpx.Client, query: str = SELECT_ALL) -> list[tuple]:
    lines = _ok(http.post("/", content=f"{query} FORMAT JSONEachRow")).text.splitlines()
    return [tuple(json.loads(line).values()) for line in lines]


def test_ping(http):
    for path in ("/ping", "/"):
        response = http.get(path)
        assert response.status_code == 200
        assert response.content == b"Ok.\n"


@pytest.mark.parametrize("query, status, code, text", [
    ("SELEC 1", 400, 62, "Syntax error"),
    ("SELECT * FROM no_such_table", 404, 60, "UNKNOWN_TABLE"),
])
def test_errors_carry_status_code_header_and_engine_message(http, query, status, code, text):
    for response in (http.post("/", content=query), http.get("/", params={"query": query})):
        assert response.status_code == status
        assert response.headers["X-ClickHouse-Exception-Code"] == str(code)
        assert response.text.startswith(f"Code: {code}. DB::Exception: ")
        assert text in response.text


def test_engine_message_is_passed_through_once(http):
    response = http.post("/", content="SELECT 1 FORMAT NoSuchFormat")
    assert response.is_error
    assert response.headers["X-ClickHouse-Exception-Code"] == "73"
    assert response.text.count("Code: 73.") == 1 and "UNKNOWN_FORMAT" in response.text


def test_unknown_database_is_an_error(http):
    response = http.post("/", params={"database": "no_such_db"}, content="SELECT 1")
    assert response.is_error
    assert response.headers["X-ClickHouse-Exception-Code"] == "81"
    assert "UNKNOWN_DATABASE" in response.text


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_request_body(http, events, encoding):
    body = COMPRESSORS[encoding](b"INSERT INTO events FORMAT JSONEachRow\n" + _json_each_row())
    response = _ok(http.post("/", content=body, headers={"Content-Encoding": encoding}))
    assert json.loads(response.headers["X-ClickHouse-Summary"])["written_rows"] == str(len(ROWS))
    assert _rows(http) == ROWS


def test_undecodable_request_body_is_a_bad_request(http, events):
    response = http.post("/", content=b"INSERT INTO events FORMAT JSONEachRow\n{}",
                         headers={"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert "gzip" in response.text and response.headers["X-ClickHouse-Exception-Code"]
    assert _rows(http) == []


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_response(http, events, encoding):
    _ok(http.post("/", content=b"INSERT INTO events FORMAT JSONEachRow\n" + _json_each_row()))
    query = f"{SELECT_ALL} FORMAT JSONEachRow"
    with http.stream("POST", "/", params={"enable_http_compression": "1"}, content=query,
                     headers={"Accept-Encoding": encoding}) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == encoding
    plain = DECOMPRESSORS[encoding](raw)
    assert raw != plain
    assert [tuple(json.loads(line).values()) for line in plain.decode().splitlines()] == ROWS

    # Without enable_http_compression=1 the body stays plain, as in ClickHouse.
    with http.stream("POST", "/", content=query, headers={"Accept-Encoding": encoding}) as response:
        assert "Content-Encoding" not in response.headers
        assert b"".join(response.iter_raw()) == plain


def test_tab_separated_is_the_default_format(http, events):
    _ok(http.post("/", content=b"INSERT INTO events FORMAT JSONEachRow\n" + _json_each_row()))
    response = _ok(http.post("/", content=SELECT_ALL))
    assert response.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert response.text == (
        "1\tplain\t{'k':'v'}\t2024-05-01 12:00:00.123456789\n"
        "2\tcomma, \"quote\" and \\'apostrophe\\'\t{}\t2024-05-01 12:00:00.000000001\n"
        "3\ttab\\tnew\\nline ünï\t{'a':'1','b':''}\t1970-01-01 00:00:00.000000000\n"
    )
    response = _ok(http.post("/", params={"default_format": "JSONEachRow"}, content=SELECT_ALL))
    assert response.headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert [tuple(json.loads(line).values()) for line in response.text.splitlines()] == ROWS


def test_json_and_json_each_row(http, events):
    _ok(http.post("/", content=b"INSERT INTO events FORMAT JSONEachRow\n" + _json_each_row()))
    response = _ok(http.post("/", content=f"{SELECT_ALL} FORMAT JSON"))
    assert response.headers["X-ClickHouse-Format"] == "JSON"
    document = response.json()
    assert document["meta"] == [{"name": "id", "type": "UInt32"}, {"name": "name", "type": "String"},
                                {"name": "attrs", "type": "Map(String, String)"}, {"name": "ts", "type": "String"}]
    assert document["rows"] == len(ROWS)
    assert [tuple(row.values()) for row in document["data"]] == ROWS
    assert _rows(http) == ROWS


def test_native_out_and_back_in(http, events):
    _ok(http.post("/", content=b"INSERT INTO events FORMAT JSONEachRow\n" + _json_each_row()))
    native = _ok(http.post("/", content="SELECT * FROM events ORDER BY id FORMAT Native"))
    assert native.headers["X-ClickHouse-Format"] == "Native"
    _ok(http.post("/", content="CREATE TABLE copy AS events"))
    _ok(http.post("/", params={"query": "INSERT INTO copy FORMAT Native"}, content=native.content))
    assert _rows(http, SELECT_ALL.replace("events", "copy")) == ROWS


def test_arrow_in_and_out(http, events):
    table = pa.table({
        "id": pa.array([r[0] for r in ROWS], pa.uint32()),
        "name": [r[1] for r in ROWS],
        "attrs": pa.array([list(r[2].items()) for r in ROWS], pa.map_(pa.string(), pa.string())),
        "ts": pa.array(EPOCH_NS, pa.timestamp("ns")),
    })
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _ok(http.post("/", params={"query": "INSERT INTO events FORMAT Arrow"}, content=sink.getvalue()))
    assert _rows(http) == ROWS

    response = _ok(http.post("/", content="SELECT * FROM events ORDER BY id FORMAT Arrow"))
    back = pa.ipc.open_file(io.BytesIO(response.content)).read_all()
    assert back.column("ts").cast(pa.int64()).to_pylist() == EPOCH_NS
    assert [dict(m) for m in back.column("attrs").to_pylist()] == [r[2] for r in ROWS]
    assert back.column("id").to_pylist() == [r[0] for r in ROWS]


def _row_binary(rows) -> bytes:
    def string(value: str) -> bytes:
        data = value.encode()
        return _varint(len(data)) + data

    out = b""
    for row_id, name, attrs, ts_ns in rows:
        out += struct.pack("<I", row_id) + string(name) + _varint(len(attrs))
        out += b"".join(string(k) + string(v) for k, v in attrs.items())
        out += struct.pack("<q", ts_ns)
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_row_binary_insert(http, events, client):
    rows = [(r[0], r[1], r[2], ns) for r, ns in zip(ROWS, EPOCH_NS, strict=True)]
    # The statement in the body, then binary data (starting with bytes that look like blanks).
    first = _row_binary(rows[:1])
    _ok(http.post("/", content=b"INSERT INTO events FORMAT RowBinary\n" + first))
    # clickhouse-connect's raw_insert: the same, built by the client.
    summary = client.raw_insert("events", ["id", "name", "attrs", "ts"], _row_binary(rows[1:]), fmt="RowBinary")
    assert summary.written_rows == 2
    assert _rows(http) == ROWS


def test_csv_insert_with_the_statement_in_the_query_parameter(http, events):
    csv = (b'1,plain,"{\'k\':\'v\'}",2024-05-01 12:00:00.123456789\n'
           b'2,"comma, ""quote"" and \'apostrophe\'",{},2024-05-01 12:00:00.000000001\n'
           b'3,"tab\tnew\nline \xc3\xbcn\xc3\xaf","{\'a\':\'1\',\'b\':\'\'}",1970-01-01 00:00:00.000000000\n')
    response = _ok(http.post("/", params={"query": "INSERT INTO events FORMAT CSV"}, content=csv))
    assert response.content == b""
    assert _rows(http) == ROWS


def test_values_insert(http, events):
    _ok(http.post("/", params={"query": "INSERT INTO events VALUES"},
                  content="(1, 'plain', {'k': 'v'}, '2024-05-01 12:00:00.123456789')"))
    _ok(http.post("/", content="INSERT INTO events (id, name) VALUES (2, 'x; y')"))
    assert [r[:2] for r in _rows(http)] == [(1, "plain"), (2, "x; y")]


def test_insert_with_its_own_settings_clause(http, events):
    _ok(http.post("/", params={"query": "INSERT INTO events (id, ts) SETTINGS date_time_input_format = 'best_effort' "
                                        "FORMAT CSV"}, content=b"1,2024-05-01T12:00:00.5Z\n"))
    assert _rows(http, "SELECT id, toString(ts) FROM events") == [(1, "2024-05-01 12:00:00.500000000")]


def test_url_settings_steer_how_the_insert_is_parsed(http, events):
    csv = b"".join(b"%s,%s,{},2024-05-01 12:00:00\n" % row for row in ((b"1", b"a"), (b"x", b"b"), (b"3", b"c")))
    response = http.post("/", params={"query": "INSERT INTO events FORMAT CSV"}, content=csv)
    assert response.headers["X-ClickHouse-Exception-Code"] == "27"
    _ok(http.post("/", params={"query": "INSERT INTO events FORMAT CSV", "input_format_allow_errors_num": "1"},
                  content=csv))
    assert [r[:2] for r in _rows(http)] == [(1, "a"), (3, "c")]


def test_insert_without_rows_is_checked_and_writes_nothing(http, events):
    response = _ok(http.post("/", params={"query": "INSERT INTO events FORMAT RowBinary"}, content=b""))
    assert json.loads(response.headers["X-ClickHouse-Summary"])["written_rows"] == "0"
    response = http.post("/", params={"query": "INSERT INTO no_such_table FORMAT RowBinary"}, content=b"")
    assert response.headers["X-ClickHouse-Exception-Code"] == "60"


def test_binary_insert_with_blank_lines_in_the_data(http, events):
    """Data bytes `\\n\\n` (here in the id 0x0a0a) end the data of a query text in chDB, not of a request body."""
    ids = [0x0A0A, 0x0A0A0A0A, 7]
    rows = [(i, f"n{i}", {}, ns) for i, ns in zip(ids, EPOCH_NS, strict=True)]
    _ok(http.post("/", content=b"INSERT INTO events FORMAT RowBinary\n" + _row_binary(rows)))
    assert [r[0] for r in _rows(http)] == sorted(ids)


@pytest.mark.parametrize("statement", [
    "INSERT INTO events SELECT * FROM input('id UInt32, name String, attrs Map(String, String), ts DateTime64(9)') "
    "FORMAT CSV",
    "INSERT INTO events FROM INFILE '/etc/hostname' FORMAT CSV",
])
def test_insert_forms_the_store_cannot_confirm_are_refused(http, events, statement):
    response = http.post("/", params={"query": statement}, content=b'1,"a",{},0\n')
    assert response.status_code == 501 and response.headers["X-ClickHouse-Exception-Code"] == "48"
    assert "send INSERT INTO table (columns) FORMAT X" in response.text
    assert _rows(http, "SELECT count() FROM events") == [(0,)]


def test_insert_select_from_the_values_table_function_is_a_query(http, events):
    _ok(http.post("/", content="INSERT INTO events (id, name) SELECT * FROM values('id UInt32, name String', (4, 'x'))"
                               " SETTINGS max_threads = 1"))
    assert [r[:2] for r in _rows(http)] == [(4, "x")]


def test_keywords_inside_names_strings_and_comments_are_not_clauses(http):
    _ok(http.post("/", content="CREATE TABLE t (`values` String, `format` String) ENGINE = Memory"))
    _ok(http.post("/", content=b"INSERT INTO t (`values`, `format`) FORMAT CSV\nVALUES,FORMAT JSON\n"))
    _ok(http.post("/", params={"query": "INSERT INTO t (format, `values`) FORMAT TSV"}, content=b"a\tb\n"))
    assert _rows(http, "SELECT * FROM t ORDER BY `values`") == [("VALUES", "FORMAT JSON"), ("b", "a")]

    response = _ok(http.post("/", content="SELECT 'x FORMAT JSON' -- FORMAT JSON"))
    assert response.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert response.text == "x FORMAT JSON\n"
    response = _ok(http.post("/", content="SELECT count() AS format FROM t FORMAT JSONEachRow;"))
    assert response.headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert int(response.json()["format"]) == 2


def test_one_statement_per_request(http, events):
    response = http.post("/", content="SELECT 1; DROP TABLE events")
    assert response.status_code == 400
    assert response.headers["X-ClickHouse-Exception-Code"] == "62"
    assert "Multi-statements are not allowed" in response.text
    assert _rows(http, "SELECT count() FROM events") == [(0,)]


def test_get_is_read_only(http):
    assert _ok(http.get("/", params={"query": "SELECT 1 + 1"})).text == "2\n"
    response = http.get("/", params={"query": "CREATE TABLE g (a UInt8) ENGINE = Memory"})
    assert response.status_code == 500  # READONLY is not in ClickHouse's code-to-status table
    assert response.headers["X-ClickHouse-Exception-Code"] == "164"
    response = http.get("/", params={"query": "CREATE TABLE g (a UInt8) ENGINE = Memory", "readonly": "0"})
    assert response.headers["X-ClickHouse-Exception-Code"] == "164"
    assert _rows(http, "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'g'") \
        == [(0,)]


def test_query_parameters_settings_and_headers(http):
    response = _ok(http.post("/", params={"param_s": "it's", "param_n": "42", "max_threads": "3"},
                             content="SELECT {s:String} AS s, {n:UInt8} + 1 AS n, getSetting('max_threads') AS t, "
                                     "timezone() AS tz FORMAT JSONEachRow"))
    row = response.json()
    assert (row["s"], row["n"], row["t"]) == ("it's", 43, 3)
    assert response.headers["X-ClickHouse-Timezone"] == row["tz"]
    assert response.headers["X-ClickHouse-Query-Id"]

    response = _ok(http.post("/", params={"session_timezone": "America/New_York", "query_id": "q-1"},
                             content="SELECT timezone()"))
    assert response.headers["X-ClickHouse-Timezone"] == "America/New_York"
    assert response.headers["X-ClickHouse-Query-Id"] == "q-1"


@pytest.mark.parametrize("fmt, content_type", [
    ("TabSeparated", "text/tab-separated-values; charset=UTF-8"),  # streamed
    ("TSVWithNamesAndTypes", "text/tab-separated-values; charset=UTF-8"),
    ("CSV", "text/csv; charset=UTF-8; header=absent"),
    ("CSVWithNames", "text/csv; charset=UTF-8; header=present"),
    ("JSON", "application/json; charset=UTF-8"),
    ("JSONCompact", "application/json; charset=UTF-8"),
    ("JSONEachRow", "application/x-ndjson; charset=UTF-8"),
    ("NDJSON", "application/x-ndjson; charset=UTF-8"),
    ("JSONCompactEachRow", "text/plain; charset=UTF-8"),  # ClickHouse declares none for it: its default
    ("Native", "application/octet-stream"),
    ("RowBinary", "application/octet-stream"),
    ("Parquet", "application/octet-stream"),
    ("Arrow", "application/octet-stream"),
    ("Pretty", "text/plain; charset=UTF-8"),
    ("Markdown", "text/plain; charset=UTF-8"),
    ("Vertical", "text/plain; charset=UTF-8"),
])
def test_content_type_is_the_formats_own(http, fmt, content_type):
    for query in (f"SELECT 1 AS x FORMAT {fmt}", "SELECT 1 AS x"):
        response = _ok(http.post("/", content=query, params={} if "FORMAT" in query else {"default_format": fmt}))
        assert response.headers["Content-Type"] == content_type, query


def test_content_type_of_a_json_array_of_rows_and_of_commands(http, events):
    response = _ok(http.post("/", content="SELECT 1 AS x FORMAT JSONEachRow",
                             params={"output_format_json_array_of_rows": "1"}))
    assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
    assert json.loads(response.content) == [{"x": 1}]
    response = _ok(http.post("/", content=b"INSERT INTO events FORMAT JSONEachRow\n" + _json_each_row()))
    assert response.headers["Content-Type"] == "text/plain; charset=UTF-8"

"""Results as the engine produces them, errors inside a stream, and the rest of the protocol clients rely on."""

from __future__ import annotations

import io
import threading
import time
import uuid

import lz4.frame
import pyarrow as pa
import pyarrow.parquet as pq

from tests.servers import wait_until

FAILS_AT_ROW_100 = "SELECT number, sleepEachRow(0.001), throwIf(number = 100) FROM numbers(200)"


def test_an_error_after_the_first_rows_ends_the_stream_with_clickhouses_exception_block(http):
    response = http.post("/", content=FAILS_AT_ROW_100, params={"max_block_size": "1"})
    assert response.status_code == 200  # the rows before the error were already sent
    tag = response.headers["X-ClickHouse-Exception-Tag"]
    body = response.content
    rows, block = body.split(b"\r\n__exception__\r\n" + tag.encode() + b"\r\n", 1)
    assert rows.splitlines()[:3] == [b"0\t0\t0", b"1\t0\t0", b"2\t0\t0"] and len(rows.splitlines()) >= 50
    message, trailer = block.split(b"\n", 1)
    assert message.startswith(b"Code: 395.") and b"FUNCTION_THROW_IF_VALUE_IS_NON_ZERO" in message
    assert trailer == f"{len(message)} {tag}\r\n__exception__\r\n".encode()


def test_waiting_for_the_end_turns_the_same_error_into_an_http_error(http):
    response = http.post("/", content=FAILS_AT_ROW_100, params={"max_block_size": "1", "wait_end_of_query": "1"})
    assert response.status_code == 500 and response.headers["X-ClickHouse-Exception-Code"] == "395"


def test_a_session_is_clean_after_a_query_failed_in_it(http):
    """chDB hands a failed query's leftover rows to the next query on the same connection; the store drains them."""
    session = {"session_id": uuid.uuid4().hex}
    for params in ({"wait_end_of_query": "1"}, {}):
        http.post("/", content=FAILS_AT_ROW_100, params={**session, **params, "max_block_size": "1"})
        assert http.post("/", content="SELECT 42", params=session).text == "42\n"
        assert http.post("/", content="SELECT 43", params={**session, "max_threads": "1"}).text == "43\n"


def test_a_long_result_streams_in_compressed_frames(http):
    response = http.post("/", content="SELECT number FROM numbers(3000000)", headers={"Accept-Encoding": "lz4"},
                         params={"enable_http_compression": "1", "max_block_size": "65536"})
    assert response.headers["Content-Encoding"] == "lz4" and "X-ClickHouse-Exception-Tag" in response.headers
    raw, frames = response.content, 0
    text = b""
    while raw:  # one LZ4 frame per engine chunk: many, each complete
        decompressor = lz4.frame.LZ4FrameDecompressor()
        text += decompressor.decompress(raw)
        raw, frames = decompressor.unused_data, frames + 1
    assert frames > 1
    values = text.split()
    assert len(values) == 3_000_000 and values[0] == b"0" and values[-1] == b"2999999"


def test_a_client_that_leaves_mid_stream_stops_the_query(http):
    marker = uuid.uuid4().hex
    query = f"SELECT number, sleepEachRow(0.01) FROM numbers(100000) /* {marker} */"
    got = threading.Event()

    def read_a_little() -> None:
        with http.stream("POST", "/", content=query, params={"max_block_size": "1"}) as response:
            for _ in response.iter_bytes():
                got.set()
                return  # leaves the stream: the connection closes

    reader = threading.Thread(target=read_a_little)
    reader.start()
    assert got.wait(20)
    reader.join(20)
    check = "SELECT count() FROM system.processes WHERE position(query, {m:String}) > 0 AND query_id != queryID()"
    wait_until(lambda: http.post("/", content=check, params={"param_m": marker}).text == "0\n", 10, 0.1,
               "the abandoned stream's query to stop (it would run 1000 s)")


def test_statements_without_a_result_name_no_format(http):
    """clickhouse-connect tells a command summary from an empty result by X-ClickHouse-Format, as ClickHouse sets it."""
    for statement in ("CREATE TABLE nf (a UInt8) ENGINE = Memory", "INSERT INTO nf VALUES (1)", "SET max_threads = 1",
                      "DROP TABLE nf"):
        response = http.post("/", content=statement)
        assert response.status_code == 200 and "X-ClickHouse-Format" not in response.headers, statement
    for statement in ("SELECT 1 WHERE 0", "SHOW TABLES", "EXISTS TABLE nf", "DESCRIBE TABLE system.one"):
        response = http.post("/", content=statement, params={"wait_end_of_query": "1"})
        assert response.headers["X-ClickHouse-Format"] == "TabSeparated", statement


def test_binary_data_in_a_query_reaches_the_engine_unchanged(http):
    """clickhouse-connect sends binary parameters as `$name$...$name$` heredocs inside the query text."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"movie": ["b", "a"], "rating": [7.5, 8.25]}), buffer)
    data = buffer.getvalue()
    assert not _is_utf8(data)
    query = b"SELECT movie, rating FROM format(Parquet, $p$" + data + b"$p$) ORDER BY movie"
    response = http.post("/", content=query)
    assert response.status_code == 200, response.text
    assert response.text == "a\t8.25\nb\t7.5\n"


def test_show_create_answers_for_system_tables(http):
    response = http.post("/", content="SHOW CREATE TABLE system.one FORMAT TSVWithNames",
                         params={"wait_end_of_query": "1"})
    header, statement = response.text.split("\n", 1)
    assert header == "statement" and statement.startswith("CREATE TABLE system.one\\n(\\n    `dummy` UInt8")


def test_show_policies_answers_empty(http):
    response = http.post("/", content="SHOW POLICIES", params={"wait_end_of_query": "1"})
    assert response.status_code == 200 and response.text == ""


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_slow_first_chunk_still_lets_other_queries_run(http):
    started = time.perf_counter()
    slow = threading.Thread(target=lambda: http.post("/", content="SELECT sleep(2)"))
    slow.start()
    time.sleep(0.2)
    assert http.post("/", content="SELECT 1").text == "1\n"
    quick = time.perf_counter() - started
    slow.join()
    assert quick < (time.perf_counter() - started) / 2

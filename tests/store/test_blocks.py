"""ClickHouse's native block compression over HTTP (`compress=1` answers, `decompress=1` bodies)."""

from __future__ import annotations

import struct

import pytest

from tracetune.store import blocks

QUERY = "SELECT number AS n, toString(number) AS s FROM numbers(300000) ORDER BY n"


def _plain(http, query: str, **params) -> bytes:
    response = http.post("/", content=query, params=params)
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.parametrize("fmt", ["TabSeparated", "CSVWithNames"])  # one streamed, one answered whole
def test_compressed_answer_is_checksummed_blocks(http, fmt):
    plain = _plain(http, f"{QUERY} FORMAT {fmt}")
    framed = _plain(http, f"{QUERY} FORMAT {fmt}", compress="1")
    assert framed[16] == blocks.LZ4 and len(framed) < len(plain)
    size, plain_size = struct.unpack_from("<II", framed, 17)
    assert 9 < size < plain_size <= blocks.BLOCK_SIZE
    assert blocks.decompress(framed) == plain
    broken = bytearray(framed)
    broken[30] ^= 1
    with pytest.raises(blocks.BlockError, match="checksum"):
        blocks.decompress(bytes(broken))


def test_decompress_request_body(http):
    http.post("/", content="CREATE TABLE t (n UInt64) ENGINE = MergeTree ORDER BY n").raise_for_status()
    data = "".join(f"{n}\n" for n in range(1000)).encode()
    for method in (blocks.LZ4, blocks.NONE):
        response = http.post("/", params={"decompress": "1"},
                             content=blocks.compress(b"INSERT INTO t FORMAT TSV\n" + data, method))
        assert response.status_code == 200, response.text
    assert _plain(http, "SELECT count(), sum(n) FROM t") == b"2000\t999000\n"

    broken = bytearray(blocks.compress(b"INSERT INTO t FORMAT TSV\n" + data))
    broken[-1] ^= 1
    response = http.post("/", params={"decompress": "1"}, content=bytes(broken))
    assert response.status_code == 400 and response.headers["X-ClickHouse-Exception-Code"] == "40"
    response = http.post("/", params={"decompress": "1"}, content=b"INSERT INTO t FORMAT TSV\n1\n")
    assert response.status_code == 400 and "decompress=1" in response.text
    assert _plain(http, "SELECT count() FROM t") == b"2000\n"


def test_connectorx_reads_through_polars(http, db_settings):
    """polars.read_database_uri's connectorx engine speaks RowBinary with compress=1 (the Rust clickhouse crate)."""
    pytest.importorskip("connectorx")
    import polars as pl

    target = db_settings.clickhouse_target()
    uri = (f"clickhouse://{target['username']}:{target['password']}@{target['host']}:{target['port']}"
           f"/{db_settings.database}")
    frame = pl.read_database_uri(QUERY, uri, engine="connectorx")
    assert frame.height == 300000
    assert frame["n"].sum() == sum(range(300000))
    assert frame["s"][12345] == "12345"

"""ClickHouse HTTP sessions, external data and the request envelope, as the embedded store serves them.

A `session_id` keeps one connection per user: its temporary tables, `SET`s and `USE` last across requests,
expire after `session_timeout`, and take one request at a time. A request's own URL settings, its `database`
and a GET's read-only mode are for that request only. Beside sessions: external data (temporary tables
sent with a query), form-encoded bodies, the `X-ClickHouse-Summary`/`-Query-Id` headers, and the checks
on the parameters that steer the HTTP layer. Every test talks to the real store over real HTTP.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Iterator

import httpx
import pytest
from clickhouse_connect.driver.external import ExternalData

from tests.servers import wait_until
from tracetune import store
from tracetune.base.settings import Settings

MAX_THREADS = "SELECT value, changed FROM system.settings WHERE name = 'max_threads'"


def _http(settings: Settings, readonly: bool = False) -> httpx.Client:
    target = settings.clickhouse_target(readonly)
    return httpx.Client(base_url=f"http://{target['host']}:{target['port']}",
                        auth=(target["username"], target["password"]),
                        params={"database": settings.database}, timeout=30)


@pytest.fixture
def settings(store_settings: Settings) -> Settings:
    """Settings on a fresh, empty database of the session's store (no tracetune schema needed here: faster)."""
    settings = store_settings.replace(database=f"s_{uuid.uuid4().hex[:12]}")
    with _http(settings) as client:
        _ok(client.post("/", params={"database": ""}, content=f"CREATE DATABASE {settings.database}"))
    return settings


@pytest.fixture
def http(settings: Settings) -> Iterator[httpx.Client]:
    """A plain HTTP client on the store as `default`, in the test's own database."""
    with _http(settings) as client:
        yield client


@pytest.fixture
def reader(settings: Settings) -> Iterator[httpx.Client]:
    """The same, as the read-only user `reader`."""
    with _http(settings, readonly=True) as client:
        yield client


@pytest.fixture
def client(settings: Settings):
    """clickhouse-connect as `default`, in the test's own database."""
    client = store.connect(settings, ensure_schema=False)
    yield client
    client.close()


def _sid() -> str:
    return f"s-{uuid.uuid4()}"


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    assert "X-ClickHouse-Exception-Code" not in response.headers
    return response


def _fails(response: httpx.Response, code: int, name: str = "") -> httpx.Response:
    assert response.status_code >= 400, response.text
    assert response.headers.get("X-ClickHouse-Exception-Code") == str(code), response.text
    assert response.text.startswith(f"Code: {code}. DB::Exception: "), response.text
    assert name in response.text
    return response


def _exists(http: httpx.Client, table: str) -> bool:
    return _ok(http.post("/", content=f"EXISTS TABLE {table}")).text == "1\n"


# ---- sessions ----------------------------------------------------------------------------------


def test_temporary_table_lives_in_its_session_only(http):
    session = _sid()
    _ok(http.post("/", params={"session_id": session}, content="CREATE TEMPORARY TABLE tmp (x UInt32)"))
    _ok(http.post("/", params={"session_id": session}, content="INSERT INTO tmp VALUES (1), (2)"))
    assert _ok(http.post("/", params={"session_id": session}, content="SELECT sum(x) FROM tmp")).text == "3\n"

    for params in ({"session_id": _sid()}, {}):
        _fails(http.post("/", params=params, content="SELECT sum(x) FROM tmp"), 60, "UNKNOWN_TABLE")
    assert _ok(http.post("/", params={"session_id": session}, content="SELECT count() FROM tmp")).text == "2\n"


def test_set_persists_in_the_session_and_url_settings_last_one_request(http):
    fresh = _ok(http.post("/", content=MAX_THREADS)).text
    assert fresh.endswith("\t0\n")  # the engine default, not changed
    session = {"session_id": _sid()}
    _ok(http.post("/", params=session, content="SET max_threads = 1"))
    assert _ok(http.post("/", params=session, content=MAX_THREADS)).text == "1\t1\n"
    assert _ok(http.post("/", params={**session, "max_threads": "3"}, content=MAX_THREADS)).text == "3\t1\n"
    assert _ok(http.post("/", params=session, content=MAX_THREADS)).text == "1\t1\n"
    assert _ok(http.post("/", params={"session_id": _sid()}, content=MAX_THREADS)).text == fresh


def test_get_in_a_session_does_not_make_the_session_read_only(http):
    """ClickHouse puts a GET (and a URL `readonly=1`) in read-only mode for that query, not for its session."""
    session = {"session_id": _sid()}
    _fails(http.get("/", params={**session, "query": "CREATE TABLE by_get (a UInt8) ENGINE = Memory"}), 164, "READONLY")
    assert _ok(http.get("/", params={**session, "query": "SELECT 1"})).text == "1\n"
    assert _ok(http.post("/", params=session, content="SELECT getSetting('readonly')")).text == "0\n"
    _ok(http.post("/", params=session, content="CREATE TABLE after_get (a UInt8) ENGINE = Memory"))

    session = {"session_id": _sid()}
    _ok(http.post("/", params={**session, "readonly": "1"}, content="SELECT 1"))
    _ok(http.post("/", params=session, content="CREATE TABLE after_readonly (a UInt8) ENGINE = Memory"))
    assert _exists(http, "after_get") and _exists(http, "after_readonly")


def test_set_in_a_session_outlasts_the_same_url_setting(http):
    """`SET` changes the session even when the request also gave that setting in the URL (as in ClickHouse)."""
    session = {"session_id": _sid()}
    _ok(http.post("/", params={**session, "max_threads": "3"}, content="SET max_threads = 5"))
    assert _ok(http.post("/", params=session, content=MAX_THREADS)).text == "5\t1\n"


def test_use_in_a_session_outlasts_the_database_parameter(http):
    """`USE` changes the session's database; a request's `database` parameter is for that request only."""
    session = {"session_id": _sid()}
    _ok(http.post("/", params=session, content="USE system"))  # the request also carries `database`
    assert _ok(http.post("/", params={**session, "database": ""}, content="SELECT currentDatabase()")).text \
        == "system\n"


def test_session_parameters_are_checked(http):
    session = _sid()
    _fails(http.post("/", params={"session_id": session, "session_check": "1"}, content="SELECT 1"),
           372, "SESSION_NOT_FOUND")
    for timeout in ("abc", "999999"):
        _fails(http.post("/", params={"session_id": session, "session_timeout": timeout},
                         content="CREATE TABLE made (a UInt8) ENGINE = Memory"), 374, "INVALID_SESSION_TIMEOUT")
    assert not _exists(http, "made")

    response = _ok(http.post("/", params={"session_id": session, "session_timeout": "30"}, content="SELECT 1"))
    assert response.headers["X-ClickHouse-Session-Id"] == session
    response = _ok(http.post("/", params={"session_id": session, "session_check": "1"}, content="SELECT 2"))
    assert response.headers["X-ClickHouse-Session-Id"] == session and response.text == "2\n"
    assert "X-ClickHouse-Session-Id" not in _ok(http.post("/", content="SELECT 1")).headers


def test_a_busy_session_refuses_a_second_request(http, settings):
    """One session runs one query at a time: a concurrent request gets SESSION_IS_LOCKED, and is not queued."""
    session = {"session_id": _sid()}
    _ok(http.post("/", params=session, content="SELECT 1"))
    marker = uuid.uuid4().hex
    slow = f"SELECT sleep(2) AS m_{marker}"
    first: list[httpx.Response] = []
    with _http(settings) as other:
        thread = threading.Thread(target=lambda: first.append(other.post("/", params=session, content=slow)))
        thread.start()
        try:
            # The statement itself, not the store's parse of it (system.processes shows parameters substituted).
            wait_until(lambda: _ok(http.post("/", params={"param_m": marker}, content=(
                "SELECT count() FROM system.processes WHERE position(query, {m:String}) > 0 "
                "AND startsWith(query, 'SELECT sleep(2)') AND query_id != queryID()"))).text != "0\n",
                5, 0.02, "the slow query to start")
            started = time.monotonic()
            _fails(http.post("/", params=session, content="SELECT 1"), 373, "SESSION_IS_LOCKED")
            assert time.monotonic() - started < 1, "the second request waited for the first"
        finally:
            thread.join(10)
    assert _ok(first[0]).text == "0\n"
    assert _ok(http.post("/", params=session, content="SELECT 3")).text == "3\n"


def test_sessions_belong_to_their_user(http, reader):
    session = _sid()
    _ok(http.post("/", params={"session_id": session}, content="CREATE TEMPORARY TABLE mine (x UInt8)"))
    _fails(reader.post("/", params={"session_id": session, "session_check": "1"}, content="SELECT 1"), 372)
    _fails(reader.post("/", params={"session_id": session}, content="SELECT * FROM mine"), 60, "UNKNOWN_TABLE")
    assert _ok(http.post("/", params={"session_id": session}, content="SELECT count() FROM mine")).text == "0\n"


def test_an_idle_session_expires_after_its_timeout(http):
    """Expired sessions are dropped when a session is next looked up; this `session_check` request is one."""
    session, lasting = _sid(), _sid()
    _ok(http.post("/", params={"session_id": session, "session_timeout": "1"},
                  content="CREATE TEMPORARY TABLE short (x UInt8)"))
    _ok(http.post("/", params={"session_id": lasting, "session_timeout": "60"},
                  content="CREATE TEMPORARY TABLE long (x UInt8)"))
    _ok(http.post("/", params={"session_id": session, "session_check": "1", "session_timeout": "1"},
                  content="SELECT count() FROM short"))
    time.sleep(2.5)
    _fails(http.post("/", params={"session_id": session, "session_check": "1"}, content="SELECT 1"),
           372, "SESSION_NOT_FOUND")
    assert _ok(http.post("/", params={"session_id": lasting, "session_check": "1"},
                         content="SELECT count() FROM long")).text == "0\n"
    # The same id without session_check starts a new, empty session.
    _fails(http.post("/", params={"session_id": session}, content="SELECT count() FROM short"), 60)


def test_reader_has_temporary_tables_in_its_session_but_creates_no_table(http, reader):
    """`readonly = 2`, as in ClickHouse, allows temporary tables (and writes to them) but no other DDL."""
    session = {"session_id": _sid()}
    _ok(reader.post("/", params=session, content="CREATE TEMPORARY TABLE scratch (x UInt8)"))
    _ok(reader.post("/", params=session, content="INSERT INTO scratch VALUES (5), (6)"))
    assert _ok(reader.post("/", params=session, content="SELECT x FROM scratch ORDER BY x")).text == "5\n6\n"
    _fails(reader.post("/", params=session, content="CREATE TABLE kept (x UInt8) ENGINE = Memory"), 164, "READONLY")
    _fails(reader.post("/", content="CREATE TABLE kept (x UInt8) ENGINE = Memory"), 164, "READONLY")
    assert not _exists(http, "kept")


# ---- external data -----------------------------------------------------------------------------

JOIN = "SELECT p.name, s._2 FROM people AS p INNER JOIN scores AS s ON p.id = s._1 ORDER BY p.id"


def test_external_data_from_clickhouse_connect(client):
    data = ExternalData(file_name="people.csv", data=b'1,alice\n2,"bob, jr"\n3,carol\n', fmt="CSV",
                        structure=["id UInt32", "name String"])
    data.add_file(file_name="scores", data=b"1\t10.5\n3\t-7.25\n4\t1\n", fmt="TabSeparated",
                  types=["UInt32", "Float64"])
    assert client.query(JOIN, external_data=data).result_rows == [("alice", 10.5), ("carol", -7.25)]


def test_external_data_types_with_parameters(client):
    """`<name>_types` is a list of types, and a type may have commas of its own (ClickHouse parses the list)."""
    data = ExternalData(file_name="prices", data=b"1\t2.50\t{'a':1}\n", fmt="TabSeparated",
                        types=["UInt32", "Decimal(9, 2)", "Map(String, UInt8)"])
    result = client.query("SELECT _1, toString(_2), _3, toTypeName(_2) FROM prices", external_data=data)
    assert result.result_rows == [(1, "2.5", {"a": 1}, "Decimal(9, 2)")]


def test_external_data_as_a_raw_multipart_request(http):
    params = {"query": "SELECT sum(x), any(s) FROM t", "t_structure": "x UInt32, s String", "t_format": "CSV"}
    response = _ok(http.post("/", params=params, files={"t": ("t", b"1,a\n2,a\n39,a\n")}))
    assert response.text == "42\ta\n"

    # The same table described by form fields instead of URL parameters.
    response = _ok(http.post("/", params={"query": "SELECT count() FROM t"}, data={"t_types": "String"},
                             files={"t": ("t", b"x\ny\n")}))
    assert response.text == "2\n"

    _fails(http.post("/", params={"query": "SELECT count() FROM t"}, files={"t": ("t", b"1\n")}), 36, "BAD_ARGUMENTS")

    # In a session too, an external table is for its one query: the session does not keep it.
    session = {"session_id": _sid()}
    _ok(http.post("/", params={**session, **params}, files={"t": ("t", b"5,b\n")}))
    _fails(http.post("/", params=session, content="SELECT count() FROM t"), 60, "UNKNOWN_TABLE")


# ---- the request envelope -----------------------------------------------------------------------

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_form_encoded_body_is_the_query(http, settings):
    """`curl --data-binary` and urllib send the body form-encoded; ClickHouse reads it as is, never decoded."""
    target = settings.clickhouse_target()
    request = urllib.request.Request(
        f"http://{target['host']}:{target['port']}/?database={settings.database}", data=b"SELECT 7",
        headers={"Authorization": "Basic " + b64encode(f"{target['username']}:{target['password']}".encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.read() == b"7\n"
    assert request.get_header("Content-type") == FORM["Content-Type"]

    _ok(http.post("/", content="CREATE TABLE f (a UInt32, s String) ENGINE = Memory"))
    response = _ok(http.post("/", headers=FORM, content=b"INSERT INTO f FORMAT CSV\n1,a+b&c=d\n2,%41 x\n"))
    assert json.loads(response.headers["X-ClickHouse-Summary"])["written_rows"] == "2"
    assert _ok(http.post("/", headers=FORM, content="SELECT * FROM f ORDER BY a")).text == "1\ta+b&c=d\n2\t%41 x\n"


ROWS_WITH_BREAKS = "SELECT number, concat('a\\tb\\nc,', toString(number)) AS s FROM numbers(5) FORMAT {fmt}"


@pytest.mark.parametrize("fmt", ["TabSeparated", "TabSeparatedWithNames", "JSONEachRow", "JSON", "CSV"])
def test_summary_counts_result_rows(http, fmt):
    """`result_rows` is the number of rows, whatever the format (here values hold tabs, line breaks, commas).

    As in ClickHouse, the summary is final when the client waits for the end of the query; a streamed
    response sends its headers before the rows exist.
    """
    response = _ok(http.post("/", content=ROWS_WITH_BREAKS.format(fmt=fmt), params={"wait_end_of_query": "1"}))
    assert response.headers["X-ClickHouse-Format"] == fmt
    summary = json.loads(response.headers["X-ClickHouse-Summary"])
    assert summary["result_rows"] == "5"
    assert summary["result_bytes"] == str(len(response.content))


def test_summary_of_an_insert_and_the_query_id(http):
    _ok(http.post("/", content="CREATE TABLE w (a UInt32) ENGINE = Memory"))
    response = _ok(http.post("/", params={"query_id": "my-insert-1"}, content=b"INSERT INTO w FORMAT TSV\n1\n2\n3\n"))
    summary = json.loads(response.headers["X-ClickHouse-Summary"])
    assert (summary["written_rows"], summary["result_rows"]) == ("3", "0")
    assert response.headers["X-ClickHouse-Query-Id"] == "my-insert-1"

    ids = [_ok(http.post("/", content="SELECT 1")).headers["X-ClickHouse-Query-Id"] for _ in range(2)]
    assert ids[0] != ids[1]
    assert all(uuid.UUID(query_id).version == 4 for query_id in ids)


@pytest.mark.parametrize("name, value, code", [
    ("wait_end_of_query", "maybe", 36),
    ("http_zlib_compression_level", "0", 36),
    ("buffer_size", "-1", 36),
    ("role", "admin", 511),
])
def test_bad_transport_parameter_refuses_the_request(http, name, value, code):
    """A parameter of the HTTP layer with a value ClickHouse refuses stops the request before the query runs."""
    _fails(http.post("/", params={name: value}, content="CREATE TABLE made (a UInt8) ENGINE = Memory"), code)
    assert not _exists(http, "made")

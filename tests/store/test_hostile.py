"""Hostile requests against a running store: each refused, and nothing touched on the host.

A table of constructs that would read or write host files, reach a local server, run programs or
step out of a user's lane, each in generated disguises (comments, nested comments, heredocs, quoted
and re-cased names, escapes in strings, odd whitespace), sent as POST bodies, GET queries, form
bodies, multipart forms and session statements, by both users. Every answer must be a ClickHouse
error, and afterwards the secret is in no answer, no file was written, the local listener saw no
connection and the store still answers.
"""

from __future__ import annotations

import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tracetune.base.settings import Settings

# {s}: a secret file, {w}: a file that must never appear, {d}: a folder that must never appear,
# {port}: a local listener that must never be reached. `users`: who the construct is hostile for.
CONSTRUCTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "file table function": ("SELECT * FROM file('{s}', 'LineAsString')", ("default", "reader")),
    "file function": ("SELECT file('{s}')", ("default", "reader")),
    "nested comment": ("SELECT 1 /* /* */ ' */, * FROM file('{s}', 'LineAsString') -- '", ("default", "reader")),
    "heredoc": ("SELECT $$'$$, * FROM file('{s}', 'LineAsString') -- '", ("default", "reader")),
    "insert into file": ("INSERT INTO FUNCTION file('{w}', 'LineAsString') SELECT 'pwned'", ("default", "reader")),
    "into outfile": ("SELECT 'pwned' INTO OUTFILE '{w}'", ("default", "reader")),
    "url": ("SELECT * FROM url('http://127.0.0.1:{port}/', 'LineAsString', 'l String')", ("default", "reader")),
    "url in a join": ("SELECT * FROM numbers(1) AS n JOIN url('http://127.0.0.1:{port}/', 'LineAsString', "
                      "'l String') AS u ON 1", ("default", "reader")),
    "describe file": ("DESCRIBE TABLE file('{s}', 'LineAsString')", ("default", "reader")),
    "describe url": ("DESCRIBE TABLE url('http://127.0.0.1:{port}/', 'LineAsString')", ("default", "reader")),
    "explain file": ("EXPLAIN SELECT * FROM file('{s}', 'LineAsString')", ("default", "reader")),
    "view of file": ("SELECT * FROM view(SELECT * FROM file('{s}', 'LineAsString'))", ("default", "reader")),
    "cte of file": ("WITH x AS (SELECT * FROM file('{s}', 'LineAsString')) SELECT * FROM x", ("default", "reader")),
    "scalar subquery": ("SELECT (SELECT any(line) FROM file('{s}', 'LineAsString', 'line String'))",
                        ("default", "reader")),
    "template row": ("SELECT 1 FORMAT Template SETTINGS format_template_row = '{s}'", ("default", "reader")),
    "template resultset": ("SELECT 1 SETTINGS format_template_resultset = '{s}'", ("default", "reader")),
    "output schema": ("SELECT 1 AS x FORMAT CapnProto SETTINGS format_schema = 'x:X', output_format_schema = '{w}'",
                      ("default", "reader")),
    "avro registry": ("SELECT 1 SETTINGS format_avro_schema_registry_url = 'http://127.0.0.1:{port}/'",
                      ("default", "reader")),
    "set template": ("SET format_template_row = '{s}'", ("default", "reader")),
    "rocksdb path": ("CREATE TABLE rocks (k UInt64, v String) ENGINE = EmbeddedRocksDB(0, '{d}') PRIMARY KEY k",
                     ("default", "reader")),
    "file engine": ("CREATE TABLE leak (line String) ENGINE = File(LineAsString, '{s}')", ("default", "reader")),
    "disk setting": ("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = local, "
                     "path = '{d}/')", ("default", "reader")),
    "storage policy": ("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a SETTINGS storage_policy = 'x'",
                       ("default", "reader")),
    "filesystem database": ("CREATE DATABASE host_root ENGINE = Filesystem('/')", ("default", "reader")),
    "create as file": ("CREATE TABLE copied AS file('{s}', 'LineAsString')", ("default", "reader")),
    "view over file": ("CREATE VIEW v AS SELECT * FROM file('{s}', 'LineAsString')", ("default", "reader")),
    "insert select file": ("INSERT INTO t SELECT * FROM file('{s}', 'LineAsString')", ("default", "reader")),
    "executable": ("SELECT * FROM executable('touch {w}', 'LineAsString', 'l String')", ("default", "reader")),
    "executable dictionary": ("CREATE DICTIONARY run (k UInt64, v String) PRIMARY KEY k SOURCE(EXECUTABLE("
                              "COMMAND 'touch {w}' FORMAT 'TSV')) LAYOUT(FLAT()) LIFETIME(0)", ("default", "reader")),
    "file dictionary": ("CREATE DICTIONARY leak (k UInt64, v String) PRIMARY KEY k SOURCE(FILE(path '{s}' format "
                        "'TSV')) LAYOUT(FLAT()) LIFETIME(0)", ("default", "reader")),
    "remote dictionary": ("CREATE DICTIONARY far (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(HOST '127.0.0.1' PORT "
                          "{port} TABLE 't')) LAYOUT(FLAT()) LIFETIME(0)", ("default", "reader")),
    "query dictionary": ("CREATE DICTIONARY q (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(QUERY 'SELECT * FROM "
                         "file(\\'{s}\\')')) LAYOUT(FLAT()) LIFETIME(0)", ("default", "reader")),
    "ssd cache layout": ("CREATE DICTIONARY c (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(TABLE 't')) "
                         "LAYOUT(SSD_CACHE(PATH '{d}')) LIFETIME(0)", ("default", "reader")),
    "backup": ("BACKUP DATABASE default TO File('{w}')", ("default", "reader")),
    "attach from path": ("ATTACH TABLE att FROM '{d}' (a UInt8) ENGINE = Log", ("default", "reader")),
    "s3": ("SELECT * FROM s3('http://127.0.0.1:{port}/bucket/key', 'CSV')", ("default", "reader")),
    "remote": ("SELECT * FROM remote('127.0.0.1:{port}', system.one)", ("default", "reader")),
    "shutdown": ("SYSTEM SHUTDOWN", ("default", "reader")),
    "second statement": ("SELECT 1; SYSTEM SHUTDOWN", ("default", "reader")),
    "freeze": ("ALTER TABLE t FREEZE", ("default", "reader")),
    "create function": ("CREATE FUNCTION pwn AS x -> x", ("default", "reader")),
    "kill": ("KILL QUERY WHERE user != '' ASYNC", ("reader",)),
    "stop merges": ("SYSTEM STOP MERGES", ("reader",)),
    "drop": ("DROP TABLE IF EXISTS otel_traces", ("reader",)),
    "introspection": ("SELECT 1 SETTINGS allow_introspection_functions = 1", ("default", "reader")),
}


def _literals_as_heredocs(text: str) -> str:
    return re.sub(r"'([^'\\]*)'", r"$$\1$$", text)


def _escaped_slashes(text: str) -> str:
    return re.sub(r"'([^']*)'", lambda m: "'" + m.group(1).replace("/", "\\x2F") + "'", text)


def _name_variant(text: str, how) -> str:
    """Apply `how` to each function or engine name written before `(`."""
    return re.sub(r"\b(file|url|s3|remote|executable|view|EmbeddedRocksDB|File|Filesystem|disk|EXECUTABLE|FILE)"
                  r"(\s*)\(", lambda m: how(m.group(1)) + m.group(2) + "(", text)


VARIANTS = {
    "as is": lambda t: t,
    "comment before the parenthesis": lambda t: _name_variant(t, lambda n: n + " /* ( */ "),
    "nested comment in front": lambda t: "/* /* */ SELECT 1 -- */ " + t,
    "line comment and new line": lambda t: "-- SELECT 1\n" + t.replace(" ", "\n\t ", 2),
    "heredoc literals": _literals_as_heredocs,
    "quoted names": lambda t: _name_variant(t, lambda n: f"`{n}`"),
    "double-quoted names": lambda t: _name_variant(t, lambda n: f'"{n}"'),
    "mixed case": lambda t: _name_variant(t, lambda n: n[:1].upper() + n[1:].lower()).replace("SELECT", "sElEcT"),
    "escaped slashes": _escaped_slashes,
    "unicode whitespace": lambda t: t.replace(" ", "\u00a0 ", 1) if t.startswith("SELECT") else "\u3000" + t,
}


@dataclass(frozen=True)
class Hostile:
    construct: str
    variant: str
    text: str


def _table() -> list[Hostile]:
    rows = []
    for construct, (text, _) in CONSTRUCTS.items():
        seen = set()
        for variant, transform in VARIANTS.items():
            disguised = transform(text)
            if disguised not in seen:
                seen.add(disguised)
                rows.append(Hostile(construct, variant, disguised))
    return rows


TABLE = _table()


class Listener:
    """A local TCP server that records every connection (none may arrive)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def db_settings(store_settings: Settings) -> Settings:
    """One database for the module (a fresh one per test would apply the schema hundreds of times)."""
    from tracetune import store

    settings = store_settings.replace(database=f"hostile_{uuid.uuid4().hex[:12]}")
    store.ensure_database(settings)
    return settings


@pytest.fixture
def host(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "secret.token"
    secret.write_text("the-secret-line\n")
    return {"s": str(secret), "w": str(tmp_path / "written.txt"), "d": str(tmp_path / "made")}


def _clients(settings: Settings) -> dict[str, httpx.Client]:
    target = settings.clickhouse_target()
    base = f"http://{target['host']}:{target['port']}"
    return {user: httpx.Client(base_url=base, auth=settings.store_credentials(readonly=user == "reader"),
                               params={"database": settings.database}, timeout=60)
            for user in ("default", "reader")}


def _send(client: httpx.Client, transport: str, text: str) -> list[httpx.Response]:
    if transport == "post":
        return [client.post("/", content=text.encode())]
    if transport == "get":
        return [client.get("/", params={"query": text})]
    if transport == "form":
        return [client.post("/", content=text.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})]
    if transport == "multipart":
        return [client.post("/", data={"query": text}, files={"ext": ("ext", b"1\n")},
                            params={"ext_structure": "a UInt8"})]
    session = {"session_id": uuid.uuid4().hex}
    return [client.post("/", params=session, content=text.encode()),
            client.post("/", params=session, content=b"SELECT 1 FORMAT TSV")]


def _assert_untouched(responses: list[httpx.Response], host: dict[str, str], listener: Listener, what: str) -> None:
    for response in responses:
        assert "the-secret-line" not in response.text, what
    assert not Path(host["w"]).exists(), what
    assert not Path(host["d"]).exists(), what
    assert listener.connections == 0, what


@pytest.mark.parametrize("construct", list(CONSTRUCTS))
def test_each_disguise_is_refused_for_each_user(db_settings, host, listener, construct):
    clients = _clients(db_settings)
    try:
        for row in (r for r in TABLE if r.construct == construct):
            text = row.text.format(**host, port=listener.port)
            for user in CONSTRUCTS[row.construct][1]:
                response = clients[user].post("/", content=text.encode())
                assert response.status_code != 200 and response.headers.get("X-ClickHouse-Exception-Code"), \
                    (row.variant, user, text, response.text)
                _assert_untouched([response], host, listener, f"{row.variant} {user}: {text}")
        assert clients["default"].get("/ping").text == "Ok.\n"
    finally:
        for client in clients.values():
            client.close()


@pytest.mark.parametrize("construct", list(CONSTRUCTS))
def test_each_construct_is_refused_by_every_transport(db_settings, host, listener, construct):
    text, users = CONSTRUCTS[construct]
    text = text.format(**host, port=listener.port)
    clients = _clients(db_settings)
    try:
        for user in users:
            for transport in ("post", "get", "form", "multipart", "session"):
                responses = _send(clients[user], transport, text)
                first = responses[0]
                assert first.status_code != 200 and first.headers.get("X-ClickHouse-Exception-Code"), \
                    (user, transport, text, first.text)
                _assert_untouched(responses, host, listener, f"{user} {transport}: {text}")
        assert clients["default"].get("/ping").text == "Ok.\n"
    finally:
        for client in clients.values():
            client.close()


@pytest.mark.parametrize("name, value", [
    ("format_template_row", "{s}"), ("format_template_resultset", "{s}"), ("output_format_schema", "{w}"),
    ("format_avro_schema_registry_url", "http://127.0.0.1:{port}/"), ("format_schema", "{s}:X"),
    ("input_format_record_errors_file_path", "{w}"), ("additional_table_filters", "{{'t': 'x'}}"),
    ("allow_introspection_functions", "1"), ("readonly", "0"),
])
@pytest.mark.parametrize("user", ["default", "reader"])
def test_settings_off_the_list_are_refused_as_url_parameters_and_insert_settings(db_settings, host, listener, name,
                                                                                   value, user):
    value = value.format(**host, port=listener.port)
    clients = _clients(db_settings)
    try:
        client = clients[user]
        answers = [client.post("/", params={name: value}, content=b"SELECT 1 FORMAT Template")]
        if user == "default":
            client.post("/", content=b"CREATE TABLE IF NOT EXISTS sink (a UInt8) ENGINE = Memory").raise_for_status()
        escaped = value.replace("'", "\\'")
        answers.append(client.post("/", params={"query": f"INSERT INTO sink SETTINGS {name} = '{escaped}' FORMAT CSV"},
                                   content=b"1\n"))
        for response in answers:
            if name == "readonly" and user == "default":
                continue  # the writer may ask for readonly = 0: it is its own level
            assert response.status_code != 200 and response.headers.get("X-ClickHouse-Exception-Code"), \
                (name, response.text)
        _assert_untouched(answers, host, listener, name)
    finally:
        for client in clients.values():
            client.close()


def test_an_external_data_structure_is_plain_columns(db_settings, host, listener):
    clients = _clients(db_settings)
    try:
        for user, client in clients.items():
            for structure in (f"y String DEFAULT file('{host['s']}')", f"y String MATERIALIZED file('{host['s']}')",
                              f"y String) ENGINE = Memory AS SELECT * FROM file('{host['s']}') --",
                              "y String CODEC(ZSTD)"):
                response = client.post("/", params={"query": "SELECT * FROM ext", "ext_structure": structure},
                                       files={"ext": ("ext", b"x\n")})
                assert response.status_code != 200, (user, structure, response.text)
                _assert_untouched([response], host, listener, structure)
            ok = client.post("/", params={"query": "SELECT * FROM ext", "ext_structure": "y String"},
                             files={"ext": ("ext", b"x\n")})
            assert ok.text == "x\n", ok.text
    finally:
        for client in clients.values():
            client.close()


def test_the_table_is_large_enough():
    assert len(TABLE) >= 60 and len({row.construct for row in TABLE}) == len(CONSTRUCTS)

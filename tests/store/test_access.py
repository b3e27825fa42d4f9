"""Who may use the store: credentials, origins, the read-only user, and what no user may do."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from tracetune import store
from tracetune.base.settings import Settings


@pytest.fixture
def base(db_settings: Settings) -> Iterator[httpx.Client]:
    """HTTP to the store with no credentials at all."""
    target = db_settings.clickhouse_target()
    with httpx.Client(base_url=f"http://{target['host']}:{target['port']}", params={"database": db_settings.database},
                      timeout=30) as client:
        yield client


def _code(response: httpx.Response) -> str:
    return response.headers.get("X-ClickHouse-Exception-Code", "")


def _table_exists(db_settings: Settings, name: str) -> bool:
    client = store.connect(db_settings, ensure_schema=False)
    query = "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {n:String}"
    return bool(client.query(query, parameters={"n": name}).first_row[0])


def test_requests_without_the_right_credentials_are_refused(base, db_settings):
    user, password = db_settings.store_credentials()
    wrong = password + "x"
    refused = [
        base.post("/", content="SELECT 1"),
        base.post("/", content="SELECT 1", auth=(user, wrong)),
        base.post("/", content="SELECT 1", auth=("nobody", password)),
        base.post("/", content="SELECT 1", headers={"X-ClickHouse-User": user, "X-ClickHouse-Key": wrong}),
        base.post("/", content="SELECT 1", params={"user": user, "password": wrong}),
        base.get("/", params={"query": "SELECT 1"}),
        base.post("/", content="SELECT 1", headers={"Authorization": "Bearer " + password}),
    ]
    for response in refused:
        assert response.status_code == 401 and _code(response) == "516", response.text
        assert "Authentication failed" in response.text or "authentication" in response.text.lower()
        assert response.headers["WWW-Authenticate"].startswith("Basic")

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    accepted = [
        base.post("/", content="SELECT 1", auth=(user, password)),
        base.post("/", content="SELECT 1", headers={"Authorization": "Basic " + token}),
        base.post("/", content="SELECT 1", headers={"X-ClickHouse-User": user, "X-ClickHouse-Key": password}),
        base.post("/", content="SELECT 1", params={"user": user, "password": password}),
    ]
    assert [r.text for r in accepted] == ["1\n"] * 4

    mixed = base.post("/", content="SELECT 1", auth=(user, password), params={"user": user, "password": password})
    assert mixed.status_code == 401 and _code(mixed) == "516"
    # /ping answers anyone, as ClickHouse's does: health checks need no password.
    assert base.get("/ping").text == "Ok.\n"


def test_a_drop_without_credentials_changes_nothing(base, db_settings):
    response = base.post("/", content="DROP TABLE otel_traces")
    assert response.status_code == 401
    assert _table_exists(db_settings, "otel_traces")


@pytest.mark.parametrize("headers", [
    {"Host": "attacker.example"},  # a rebound DNS name pointing at 127.0.0.1
    {"Host": "attacker.example:8123"},
    {"Origin": "https://attacker.example"},
    {"Origin": "null"},  # sandboxed iframes and file:// pages
    {"Sec-Fetch-Site": "cross-site"},
])
def test_foreign_hosts_and_browser_origins_are_refused_even_with_credentials(base, db_settings, headers):
    user, password = db_settings.store_credentials()
    response = base.post("/", content="CREATE TABLE from_the_web (a UInt8) ENGINE = Memory", headers=headers,
                         auth=(user, password))
    assert response.status_code == 403 and _code(response) == "497", response.text
    assert "allowed_hosts" not in response.text  # the store answers to its bind address only
    assert not _table_exists(db_settings, "from_the_web")


def test_a_link_in_a_foreign_page_runs_nothing(base, db_settings):
    """A top-level navigation the APIs let through (a link to /docs) is refused by the store: its URL is a query."""
    user, password = db_settings.store_credentials()
    response = base.get("/", params={"query": "SELECT 1"}, auth=(user, password),
                        headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert response.status_code == 403 and _code(response) == "497", response.text


def test_a_cross_site_html_form_post_creates_nothing(base, db_settings):
    """What a page the user visits can send: a form-encoded POST with the page's Origin and no credentials."""
    response = base.post("/", content=b"CREATE TABLE formed (a UInt8) ENGINE = Memory",
                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                  "Origin": "http://attacker.example", "Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403
    assert not _table_exists(db_settings, "formed")


def test_the_stores_own_origin_and_loopback_names_are_accepted(base, db_settings):
    target = db_settings.clickhouse_target()
    auth = (target["username"], target["password"])
    for host in (f"127.0.0.1:{target['port']}", f"localhost:{target['port']}", "localhost"):
        response = base.post("/", content="SELECT 1", auth=auth,
                             headers={"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
        assert response.status_code == 200, (host, response.text)


def test_the_reader_reads_but_cannot_write(db_settings):
    writer = store.connect(db_settings, ensure_schema=False)
    writer.command("CREATE TABLE notes (id UInt32, text String) ENGINE = MergeTree ORDER BY id")
    writer.insert("notes", [[1, "kept"]], column_names=["id", "text"])

    reader = store.connect(db_settings, readonly=True)
    assert reader.query("SELECT currentDatabase(), text FROM notes").result_rows == [(db_settings.database, "kept")]
    for statement in ("INSERT INTO notes VALUES (2, 'no')", "DROP TABLE notes", "ALTER TABLE notes DELETE WHERE 1",
                      "CREATE TABLE other (a UInt8) ENGINE = Memory", "TRUNCATE TABLE notes"):
        with pytest.raises(DatabaseError) as err:
            reader.command(statement)
        assert err.value.code == 164, statement
    with pytest.raises(DatabaseError):
        reader.insert("notes", [[3, "no"]], column_names=["id", "text"])
    with pytest.raises(DatabaseError) as err:  # it cannot lift its own limit
        reader.command("SET readonly = 0")
    assert err.value.code == 164
    assert writer.query("SELECT count() FROM notes").first_row[0] == 1


def test_the_reader_cannot_lift_readonly_from_the_url(base, db_settings):
    user, password = db_settings.store_credentials(readonly=True)
    response = base.post("/", content="CREATE TABLE lifted (a UInt8) ENGINE = Memory", auth=(user, password),
                         params={"readonly": "0"})
    assert _code(response) == "164"
    assert not _table_exists(db_settings, "lifted")


HOST_TOUCHING = [
    "SELECT * FROM file('{secret}', 'LineAsString')",
    "SELECT file('{secret}')",
    "SELECT * FROM `file`('{secret}', 'LineAsString')",
    "select * from FILE /* comment */ ('{secret}', 'LineAsString')",
    "INSERT INTO FUNCTION file('{written}', 'LineAsString') SELECT 'pwned'",
    "SELECT 'pwned' INTO OUTFILE '{written}'",
    "CREATE TABLE leak (line String) ENGINE = File(LineAsString, '{secret}')",
    "CREATE DICTIONARY leak (k UInt64, v String) PRIMARY KEY k SOURCE(FILE(path '{secret}' format 'TSV')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "SELECT * FROM s3('http://127.0.0.1:1/bucket/key', 'CSV')",
    "SELECT * FROM executable('cat {secret}', 'LineAsString', 'line String')",
    "SELECT * FROM remote('127.0.0.1:9000', system.one)",
    "SELECT * FROM sqlite('{secret}', 't')",
    "CREATE DATABASE host_root ENGINE = Filesystem('/')",
    "CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = local, path = '/tmp/x/')",
    "BACKUP DATABASE default TO File('{written}')",
    "SYSTEM SHUTDOWN",
]


@pytest.mark.parametrize("readonly", [False, True], ids=["default", "reader"])
@pytest.mark.parametrize("statement", HOST_TOUCHING)
def test_host_files_programs_and_network_are_refused_for_every_user(base, db_settings, tmp_path, statement, readonly):
    secret = tmp_path / "secret.token"
    secret.write_text("the secret")
    os.chmod(secret, 0o600)
    written = tmp_path / "written.txt"
    user, password = db_settings.store_credentials(readonly=readonly)
    response = base.post("/", content=statement.format(secret=secret, written=written), auth=(user, password))
    # ACCESS_DENIED for what no one may do; READONLY where the reader tried a write it may never do anyway;
    # SETTING_CONSTRAINT_VIOLATION for a setting off the list.
    # ClickHouse's statuses for them: 403, 500 and 500 (READONLY and the constraint are not in its status table).
    assert _code(response) in ("497", "164", "452"), response.text
    assert response.status_code == {"497": 403, "164": 500, "452": 500}[_code(response)]
    assert "the secret" not in response.text
    assert not written.exists()
    assert base.get("/ping").text == "Ok.\n"  # SYSTEM SHUTDOWN did not stop it


@pytest.mark.parametrize("statement", [
    "SELECT 'file(' AS text, url FROM (SELECT 'x' AS url)",
    "CREATE TABLE IF NOT EXISTS http (url String, file String) ENGINE = Memory",
    "CREATE TABLE IF NOT EXISTS url (a UInt8) ENGINE = Memory",
    "INSERT INTO http (url) VALUES ('x')",
    "SELECT count(file) FROM http -- file('/etc/passwd')",
    "SYSTEM FLUSH LOGS",
])
def test_names_that_only_look_host_touching_pass(base, db_settings, statement):
    auth = db_settings.store_credentials()
    base.post("/", content="CREATE TABLE IF NOT EXISTS http (url String, file String) ENGINE = Memory", auth=auth)
    response = base.post("/", content=statement, auth=auth)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("statement", [
    "SELECT \"url\"('http://x')", "SELECT * FROM S3Cluster('c', 'http://x')", "ATTACH TABLE t FROM '/tmp/t' (a UInt8)",
    "SELECT * FROM numbers(1) INTO OUTFILE 'x' FORMAT CSV", "RESTORE TABLE t FROM Disk('backups', 'x')",
])
def test_each_host_touching_form_is_recognised(base, db_settings, statement):
    response = base.post("/", content=statement, auth=db_settings.store_credentials())
    assert response.status_code == 403 and _code(response) == "497", response.text

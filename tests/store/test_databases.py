"""The per-test databases of tests/conftest.py (Databases): a database handed back goes to the next test as
empty as a new one, its views' targets and its insert deduplication tokens included, without the tables a
test added; one whose schema a test changed is never handed out again."""

from __future__ import annotations

from tests.conftest import Databases
from tests.store.test_inserts import counts, insert, spans
from tracetune import store


def test_a_database_handed_back_comes_back_empty_and_forgets_its_insert_tokens(store_settings):
    databases = Databases(store_settings)
    settings = databases.take()
    client = store.connect(settings, ensure_schema=False)
    insert(client, spans(3), insert_deduplication_token="batch-1")
    client.command("INSERT INTO tracetune_prices (version, hash, body) VALUES ('v1', 'h', '{}')")
    assert counts(client) == (3, 3, 3)
    insert(client, spans(3), insert_deduplication_token="batch-1")
    assert counts(client) == (3, 3, 3)  # the token is remembered: the retry counted once

    databases.give_back(settings)
    assert databases.take().database == settings.database  # the same database, emptied
    assert counts(client) == (0, 0, 0)
    assert client.query("SELECT count() FROM tracetune_prices").result_rows == [(0,)]
    insert(client, spans(3), insert_deduplication_token="batch-1")
    assert counts(client) == (3, 3, 3)  # the token was forgotten with the rows
    assert tuple(row[0] for row in client.query("SELECT version FROM tracetune_schema_migrations").result_rows) \
        == databases.shapes[settings.database][1]  # the applied migrations kept


def test_tables_views_and_dictionaries_a_test_added_are_dropped(store_settings):
    databases = Databases(store_settings)
    settings = databases.take()
    client = store.connect(settings, ensure_schema=False)
    tables = {row[0] for row in client.query("SHOW TABLES").result_rows}
    client.command("CREATE TABLE notes (id UInt64, text String) ENGINE = MergeTree ORDER BY id")
    client.command("CREATE MATERIALIZED VIEW notes_mv TO notes AS SELECT cityHash64(TraceId) AS id, "
                   "SpanName AS text FROM otel_traces")
    client.command("CREATE VIEW names AS SELECT DISTINCT SpanName FROM otel_traces")
    client.command("CREATE DICTIONARY texts (id UInt64, text String) PRIMARY KEY id "
                   "SOURCE(CLICKHOUSE(TABLE 'notes')) LAYOUT(FLAT()) LIFETIME(0)")
    insert(client, spans(2))
    assert client.query("SELECT count() FROM notes").result_rows == [(2,)]

    databases.give_back(settings)
    assert databases.take().database == settings.database
    assert {row[0] for row in client.query("SHOW TABLES").result_rows} == tables
    insert(client, spans(2))  # no view left behind to write anywhere
    assert counts(client) == (2, 2, 2)


def test_a_database_whose_schema_a_test_changed_is_not_handed_out_again(store_settings):
    databases = Databases(store_settings)
    settings = databases.take()
    client = store.connect(settings, ensure_schema=False)
    client.command("CREATE TABLE notes (x UInt8) ENGINE = Memory")
    client.command("ALTER TABLE tracetune_prices ADD COLUMN note String")
    databases.give_back(settings)
    assert databases.take().database != settings.database

"""The per-test databases of tests/conftest.py (Databases): a database handed back goes to the next test as
empty as a new one, its views' targets and its insert deduplication tokens included, and one a test changed
the shape of is never handed out again."""

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
    again = databases.take()
    assert again.database == settings.database  # the same database, emptied
    assert counts(client) == (0, 0, 0)
    assert client.query("SELECT count() FROM tracetune_prices").result_rows == [(0,)]
    insert(client, spans(3), insert_deduplication_token="batch-1")
    assert counts(client) == (3, 3, 3)  # the token was forgotten with the rows
    assert [row[0] for row in client.query("SELECT version FROM tracetune_schema_migrations").result_rows] \
        == list(databases.shapes[settings.database][1])  # the applied migrations kept


def test_a_database_whose_tables_a_test_changed_is_not_handed_out_again(store_settings):
    databases = Databases(store_settings)
    settings = databases.take()
    store.connect(settings, ensure_schema=False).command("CREATE TABLE notes (x UInt8) ENGINE = Memory")
    databases.give_back(settings)
    assert databases.take().database != settings.database

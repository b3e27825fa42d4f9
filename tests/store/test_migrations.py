"""Schema migrations against the real embedded store: twice, at once, from an older data folder, by CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.servers import start_process, stop_process
from tests.spans import COLUMNS, span_row
from tracetune import store
from tracetune.store import migrations as migrations_mod
from tracetune.store.migrations import Migration, MigrationError

PREVIOUS_RELEASE = Path(__file__).parent / "previous_release"  # store/sql/*.sql as the release before migrations


def _fresh(settings):
    return settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")


def _records(client) -> list[tuple[int, str]]:
    return client.query(f"SELECT version, checksum FROM {migrations_mod.TABLE} ORDER BY version").result_rows


def _schema(client) -> dict[str, tuple[str, str]]:
    """Every table of the client's database: (engine, its CREATE statement without the database name)."""
    rows = client.query("SELECT name, engine, create_table_query FROM system.tables "
                        "WHERE database = currentDatabase() AND name != {t:String}",
                        parameters={"t": migrations_mod.TABLE}).result_rows
    qualified = re.compile(rf"(?<=[\s(])`?{client.database}`?\.")  # not inside 'tracetune.step'

    def same_settings_any_order(query: str) -> str:
        head, _, settings = query.partition(" SETTINGS ")
        return head + (" SETTINGS " + ", ".join(sorted(settings.split(", "))) if settings else "")

    return {name: (engine, same_settings_any_order(qualified.sub("", query))) for name, engine, query in rows}


def test_the_files_are_one_migration_each_in_order():
    found = migrations_mod.shipped()
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert found[0].label == "001 otel_traces" and all(m.statements for m in found)
    assert [(f"{m.version:03d}_{m.name}.sql", s) for m in found for s in m.statements] == store.schema_statements()


def test_a_bad_sequence_of_files_is_refused_with_the_file_named():
    with pytest.raises(MigrationError, match="version 7 is also 007_a.sql"):
        migrations_mod.parse([("007_a.sql", "SELECT 1"), ("007_b.sql", "SELECT 2")])
    with pytest.raises(MigrationError, match="store/sql/leases.sql: a migration is named NNN_name.sql"):
        migrations_mod.parse([("leases.sql", "SELECT 1")])


def test_the_checksum_ignores_comments_and_layout_but_not_sql():
    base = Migration(1, "t", ("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a",))
    same = Migration(1, "t", ("-- why\nCREATE TABLE t (\n    a UInt8 -- the a\n) ENGINE = MergeTree\nORDER BY a",))
    other = Migration(1, "t", ("CREATE TABLE t (a UInt16) ENGINE = MergeTree ORDER BY a",))
    assert base.checksum == same.checksum != other.checksum


def test_migrating_twice_applies_nothing_the_second_time(db_settings):
    client = store.connect(db_settings, ensure_schema=False)  # db_settings: connect() migrated it once
    before = _records(client)
    assert [v for v, _ in before] == [m.version for m in migrations_mod.shipped()]
    started = time.perf_counter()
    result = store.migrate(client)
    assert result.applied == [] and result.changed == []
    assert time.perf_counter() - started < 2  # one query
    assert _records(client) == before
    assert {s.state for s in store.migration_status(client)} == {"applied"}


def test_migrations_at_once_from_many_clients_all_succeed_and_are_recorded_once(store_settings):
    settings = _fresh(store_settings)
    store.ensure_database(settings)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def start_a_component() -> None:
        client = store.connect(settings, ensure_schema=False)
        barrier.wait()
        try:
            store.migrate(client)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start_a_component) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    client = store.connect(settings, ensure_schema=False)
    records = _records(client)
    assert [v for v, _ in records] == [m.version for m in migrations_mod.shipped()]  # each once
    assert set(_schema(client)) >= {"otel_traces", "tracetune_spans_1m_mv", "tracetune_alert_silences"}


def test_a_new_migration_is_applied_alone_and_a_changed_one_is_reported_not_rerun(db_settings):
    client = store.connect(db_settings, ensure_schema=False)
    shipped = migrations_mod.shipped()
    edited = Migration(shipped[-1].version, shipped[-1].name, ("SELECT throwIf(1, 'a changed file was run again')",))
    added = Migration(9990, "extra", ("CREATE TABLE IF NOT EXISTS t_extra (a UInt8) ENGINE = MergeTree ORDER BY a",))
    available = [*shipped[:-1], edited, added]
    states = {s.version: s.state for s in store.migration_status(client, available)}
    assert (states[edited.version], states[9990], states[shipped[0].version]) == ("changed", "pending", "applied")
    result = store.migrate(client, available=available)
    assert [m.version for m in result.applied] == [9990]
    assert [(s.version, s.state) for s in result.changed] == [(edited.version, "changed")]
    assert client.query("EXISTS TABLE t_extra").result_rows == [(1,)]
    # A record with no file (a newer tracetune applied it) is shown, and left alone.
    states = {s.version: s.state for s in store.migration_status(client, shipped)}
    assert states[9990] == "unknown" and states[shipped[-1].version] == "applied"
    assert store.migrate(client, available=shipped).applied == []


def test_a_data_folder_of_the_previous_release_is_upgraded_with_its_rows(tmp_path):
    """A store process builds a data folder with the previous release's DDL and rows, and stops; the
    current code starts on the same folder: the rows are there, every migration is recorded, and the
    schema is the one a fresh database gets."""
    settings = make_settings(tmp_path / "home")
    old = migrations_mod.parse([(p.name, p.read_text()) for p in PREVIOUS_RELEASE.glob("*.sql")])
    now = time.time_ns()
    spans = [span_row(now - 60_000_000_000 + i, trace_id=f"{i:032x}", attrs={"tracetune.pipeline": "p"},
                      duration=1_000_000 * (i + 1)) for i in range(20)]
    proc = start_process(["store"], settings, tmp_path / "store-1.log")
    try:
        store.wait_ready(settings, 60)
        store.ensure_database(settings)
        client = store.connect(settings, ensure_schema=False)
        for migration in old:  # what the previous release's apply_schema ran: no record table
            for statement in migration.statements:
                client.command(statement)
        # and a table as a release before 080_dedup_windows left it, without the deduplication window
        client.command("ALTER TABLE tracetune_spans_1m RESET SETTING non_replicated_deduplication_window")
        client.insert("otel_traces", spans, column_names=COLUMNS)
        client.insert("tracetune_slos", [["p", 1, '{"p95_ms": 100}', "test"]],
                      column_names=["pipeline", "version", "slo", "author"])
    finally:
        stop_process(proc)

    proc = start_process(["store"], settings, tmp_path / "store-2.log")
    try:
        store.wait_ready(settings, 60)
        client = store.connect(settings)  # what every component does at start
        assert client.query("SELECT count() FROM otel_traces").result_rows == [(20,)]
        assert client.query("SELECT sum(requests) FROM tracetune_spans_1m WHERE pipeline = 'p'").result_rows == [(20,)]
        assert client.query("SELECT slo FROM tracetune_slos").result_rows == [('{"p95_ms": 100}',)]
        states = store.migration_status(client)
        assert {s.state for s in states} == {"applied"}
        assert [s.version for s in states] == [m.version for m in migrations_mod.shipped()]
        fresh = store.connect(_fresh(settings))
        assert _schema(client) == _schema(fresh)
        assert "non_replicated_deduplication_window = 10000" in _schema(client)["tracetune_spans_1m"][1]
    finally:
        stop_process(proc)


def _cli(args: list[str], settings) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    return subprocess.run([sys.executable, "-m", "tracetune", *args], env={**env, **settings.as_env()},
                          capture_output=True, text=True, timeout=120)


def test_the_store_commands_migrate_at_once_and_show_the_state(store_settings):
    """Two `tracetune store migrate` processes at once on a new database: both succeed, each migration is
    recorded once; a third has nothing to do; `status` shows the table and JSON."""
    settings = _fresh(store_settings)
    before = _cli(["store", "status", "--json"], settings)
    assert before.returncode == 0, before.stderr
    assert {s["state"] for s in json.loads(before.stdout)} == {"pending"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}, **settings.as_env()}
    both = [subprocess.Popen([sys.executable, "-m", "tracetune", "store", "migrate"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    answers = [(proc.communicate(timeout=120), proc.returncode) for proc in both]
    last = migrations_mod.shipped()[-1]
    for (out, err), code in answers:
        assert code == 0, err
        lines = out.splitlines()
        assert lines[-1] == (f"{len(lines) - 1} applied" if len(lines) > 1 else "nothing to apply") + \
            f"; database {settings.database} is at version {last.version:03d}"
    assert "applied 001 otel_traces" in answers[0][0][0] + answers[1][0][0]
    client = store.connect(settings, ensure_schema=False)
    assert [v for v, _ in _records(client)] == [m.version for m in migrations_mod.shipped()]
    again = _cli(["store", "migrate"], settings)
    assert again.stdout.strip() == f"nothing to apply; database {settings.database} is at version {last.version:03d}"
    table = _cli(["store", "status"], settings).stdout.splitlines()
    assert table[0].split()[:3] == ["version", "name", "state"]
    assert table[1].split()[:3] == ["001", "otel_traces", "applied"]
    assert "(tracetune store migrate)" in table[1]


def test_a_failing_migration_stops_the_run_and_those_before_it_stay_recorded(store_settings):
    settings = _fresh(store_settings)
    store.ensure_database(settings)
    client = store.connect(settings, ensure_schema=False)
    client.command("CREATE TABLE tracetune_spans_1m (a UInt8) ENGINE = MergeTree ORDER BY a")  # not the rollup
    with pytest.raises(Exception, match="THERE_IS_NO_COLUMN"):  # its view cannot write there
        store.migrate(client)
    states = {s.name: s.state for s in store.migration_status(client)}
    assert states["tracetune_spans_1m"] == "applied" and states["tracetune_spans_1m_mv"] == "pending"
    assert states["tracetune_alerts"] == "pending"

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

import pytest

from tests.conftest import make_settings
from tests.servers import start_process, stop_process
from tests.spans import COLUMNS, llm_traces, span_row
from tracetune import store
from tracetune.store import migrations as migrations_mod
from tracetune.store.migrations import Migration, MigrationError

# The DDL of the release before migrations: these migrations with these checksums (of their SQL, not
# comments). They are still shipped unchanged, so the test runs the shipped files; should one of them ever
# change, the test says so, and that file's previous text must be kept beside this test instead.
PREVIOUS_RELEASE = {
    1: "986e99e691c965df9561ddebf5820271ea6419e2cfaa4b54b7fa7b683e4c4458",  # otel_traces
    2: "89251e7a90374e74409048d9159ee395af3bba11044c970fb5ab190c085d9d18",  # otel_traces_trace_id_ts
    3: "a72ab21177d69ebb3b02865dd0e84ebf2d5a427ad90fc8b486a6a5b55ce8fca6",  # otel_traces_trace_id_ts_mv
    10: "743a3d29ea0a33e237a815ef872ec60462312233170861e50406cef080bd01af",  # tracetune_config_versions
    11: "d13ecffeaa40305b841a878f44b1055564ff3acae666143285c58f0234be48af",  # tracetune_pipeline_specs
    12: "e8dac09b318806c205b380ec743e9b978a9ba52df90a69b22ed0e3e4953431bc",  # tracetune_decisions
    13: "411288ad518b0a150ec2a9fa14560fbd1146bab2c83d5cede44a0e47d071842d",  # tracetune_tuner_state
    14: "ae16d4a315a3959e74395c67f296d97abe7dca381f4caf878ba9b3ce35d0b646",  # tracetune_feedback
    15: "70c4c53509e61f2d2f263e1c958022b42099e981f203270f29380b544e359873",  # tracetune_canaries
    20: "51c44ae93f9126f91c0ef17440051bbf1f22990cb1dcc523c75dc5b4b7c21d79",  # tracetune_spans_1m
    21: "f81294ee5b7b002dc0a7aa3217b26e165a5d3a5b8eb989d1039d2e4ed5071e20",  # tracetune_spans_1m_mv
    22: "34a93a89e11fc5bcf08e53ce46799795c6ddebcbc51981b2ac3f21895369315c",  # tracetune_spans_1h
    23: "eb4fe6c4a3437d7d8e6b8bf9d0af81fd6e4e01ee9e47ac2c89267363b89f7046",  # tracetune_spans_1h_mv
    30: "e7e790c9a7d721024fc18f62ae657eea2539498b29065cf83131bf6737ea37a0",  # tracetune_dead_letters
    40: "4deefa7ad221e04af98d1ec4db88daebd191505943ac1d5b2a52c524edc33b56",  # tracetune_drift
    41: "a890e8fb50e63f74c7d2363dbc5c0a5f233148f948ebe5f3b1e33a6ded16a758",  # tracetune_slos
    42: "a2e6d25246c59419cfae00940f792af1e8d51477c4286a6027af98e4e79af5b2",  # tracetune_slo_status
    43: "5a12dcb4bc3e7949f399410b6943ade26025c42b550d52f9c23493725918feb4",  # tracetune_drift_baselines
    44: "31e75dbadd4c4fb39ed3f1446d253ff9f034c60aa799adb5671989de51828cb1",  # tracetune_alert_outbox
    45: "27e9d9735d26150fbd3dc72bb474bc19341e09d370186d43ac4a73984d0837a2",  # tracetune_task_errors_1m
    46: "4d7fe9af61ff946e0e466da3b2f8ef14e9d54d2f2eac49359670c72dbd332dd3",  # tracetune_task_errors_1m_mv
    50: "69aefad898c9a05c3d6d1bc993d0c1ce2ba84cbabae3e201ec59a2d631cc590d",  # tracetune_prices
    60: "d8a81a2bbe0587cf6a658886a6d0a2047e1de9722fe6021587d3fdd2813b7eb5",  # tracetune_ground_truth
    70: "ee0f84fd2ad1c5735c219471b90b10e04adec600542c30f2eae037004adc97c6",  # tracetune_quarantine
    80: "463c0e72857b9683861fa0a7a967cc0f33a257ed8825cfdf019554d299ac851f",  # dedup_windows
    90: "b14332d93e7388c5b00132dcc5322b9ab8a16a93a3a9f3088b861cd0107aaabb",  # tracetune_alerts
}


def previous_release() -> list:
    shipped = {migration.version: migration for migration in migrations_mod.shipped()}
    for version, checksum in PREVIOUS_RELEASE.items():
        assert shipped[version].checksum == checksum, (
            f"migration {version:03d} changed since the previous release: keep its old text for this test")
    return [shipped[version] for version in PREVIOUS_RELEASE]


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
    old = previous_release()
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


def test_the_rollup_view_changed_in_place_counts_each_llm_call_once(store_settings):
    """A database before 170 (the view of 021): an older executor's trace, whose step span and `chat {model}`
    CLIENT span both carry the call's gen_ai.usage.*, is counted once (the CLIENT span is no row of the
    rollup), and this executor's spans (the step's count under tracetune.llm.*) count no tokens. 170 swaps the
    view's SELECT in place: what was rolled up keeps its counts, and spans inserted after count once."""
    settings = _fresh(store_settings)
    store.ensure_database(settings)
    client = store.connect(settings, ensure_schema=False)
    store.migrate(client, available=[m for m in migrations_mod.shipped() if m.version < 170])
    tokens_sql = "SELECT (sum(input_tokens), sum(output_tokens)) FROM tracetune_spans_1m WHERE pipeline = 'answers'"
    older, older_tokens = llm_traces(["I was charged twice", "my parcel is lost"], "older_executor")
    client.insert("otel_traces", older, column_names=COLUMNS)
    assert client.query(tokens_sql).result_rows == [(older_tokens,)]
    unseen, _ = llm_traces(["I cannot log in"], "executor")
    client.insert("otel_traces", unseen, column_names=COLUMNS)
    assert client.query(tokens_sql).result_rows == [(older_tokens,)]

    assert [m.version for m in store.migrate(client).applied][:1] == [170]
    view = client.query("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() "
                        "AND name = 'tracetune_spans_1m_mv'").result_rows[0][0]
    assert "tracetune.llm.input_tokens" in view and "tracetune.llm.output_tokens" in view
    assert client.query(tokens_sql).result_rows == [(older_tokens,)]
    newer, newer_tokens = llm_traces(["please cancel my plan", "the app crashes"], "executor")
    client.insert("otel_traces", newer, column_names=COLUMNS)
    assert client.query(tokens_sql).result_rows == [(tuple(a + b for a, b in zip(older_tokens, newer_tokens,
                                                                                  strict=True)),)]

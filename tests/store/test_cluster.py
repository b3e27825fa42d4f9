"""The cluster form of the schema, checked by the ClickHouse engine itself (chDB, in a child process).

Every statement is parsed and formatted by ClickHouse (`formatQuery`), and then created for real in a
two-shard cluster on one node: chDB with a `remote_servers` cluster, macros and ClickHouse's in-memory test
Keeper, so Replicated tables, Distributed tables and views over `_local` tables are checked by the
engine (engine arguments, macros, settings, a view's columns against its target). `ON CLUSTER` is
the one part left to `formatQuery`: chDB runs no distributed DDL queue. The analyzer's and tuner's
queries then run unchanged on the Distributed tables.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tracetune import store
from tracetune.store import cluster
from tracetune.store.migrations import Migration, shipped

CLUSTER, DATABASE = "tracetune_cluster", "tt"

# The child: chDB with a two-shard cluster (both shards this node: enough for the engine to plan distributed
# queries), macros and the in-memory test Keeper. It reads {"format": [...], "create": [...], "queries":
# {name: [sql, params]}, "settings": {...}} on stdin and prints what the engine said for each.
# os._exit: chDB's test Keeper does not shut down cleanly.
_CHILD = r"""
import json, os, sys, chdb
job = json.load(sys.stdin)
home = job["home"]
with open(os.path.join(home, "config.xml"), "w") as f:
    f.write('''<clickhouse><tcp_port>9000</tcp_port>
<remote_servers><CLUSTER><shard><internal_replication>true</internal_replication>
<replica><host>127.0.0.1</host><port>9000</port></replica></shard>
<shard><internal_replication>true</internal_replication><replica><host>127.0.0.1</host><port>9000</port></replica></shard></CLUSTER></remote_servers>
<zookeeper><implementation>testkeeper</implementation></zookeeper>
<macros><shard>01</shard><replica>replica-1</replica></macros></clickhouse>'''.replace("CLUSTER", job["cluster"]))
conn = chdb.connect(os.path.join(home, "data") + "?config-file=" + os.path.join(home, "config.xml"))
def run(sql, params=None):
    try:
        return [True, conn.query(sql, "JSONCompact", params=params or {}).bytes().decode()]
    except Exception as exc:
        return [False, str(exc).splitlines()[0][:600]]
def literal(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
out = {"format": [run("SELECT formatQuery(" + literal(q) + ")") for q in job["format"]]}
run("CREATE DATABASE IF NOT EXISTS " + job["database"])
conn.query("USE " + job["database"])
out["create"] = [run(q) for q in job["create"]]
out["tables"] = run("SELECT name, engine, engine_full FROM system.tables WHERE database = currentDatabase()")
out["without_settings"] = {name: run(sql, params) for name, (sql, params) in job["queries"].items()}
conn.query("SET " + ", ".join(f"{k} = '{v}'" for k, v in job["settings"].items()))
out["cluster"] = {name: run(sql, params) for name, (sql, params) in job["queries"].items()}
print(json.dumps(out), flush=True)
os._exit(0)
"""


def _cluster_form() -> list[tuple[Migration, str]]:
    return [(m, statement) for m in shipped() for statement in m.sql(CLUSTER, DATABASE)]


def _engine(job: dict, tmp_path: Path) -> dict:
    job = {"home": str(tmp_path), "cluster": CLUSTER, "database": DATABASE, "format": [], "create": [],
           "queries": {}, "settings": dict(store.CLUSTER_QUERY_SETTINGS), **job}
    done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _formatted(answer: list) -> str:
    ok, text = answer
    assert ok, text
    return json.loads(text)["data"][0][0]


def test_every_cluster_statement_is_parsed_and_formatted_by_clickhouse(tmp_path):
    """Each statement's cluster form, formatted by ClickHouse, is the original statement with only the
    cluster changes: ON CLUSTER, the Replicated engine and its Keeper path, `_local` names, the window."""
    pairs = _cluster_form()
    originals = [s for m in shipped() for s in m.statements]
    answer = _engine({"format": [s for _, s in pairs] + originals}, tmp_path)
    formatted = [_formatted(a) for a in answer["format"][:len(pairs)]]
    plain = {_formatted(a) for a in answer["format"][len(pairs):]}
    by_table: dict[str, list[str]] = {}
    for (migration, _), text in zip(pairs, formatted, strict=True):
        assert f" ON CLUSTER {CLUSTER}" in text, text
        by_table.setdefault(migration.label, []).append(text)
        if text.startswith("CREATE TABLE"):
            engine = re.search(r"ENGINE = (\w+)\(", text).group(1)
            assert engine.startswith("Replicated") or engine == "Distributed", text
        undone = _undo(text)
        if undone is not None:
            assert _bare(undone) in {_bare(p) for p in plain}, \
                f"{migration.label}: the cluster form changed more than the cluster parts:\n{text}"
    for table, key in cluster.SHARDED.items():
        local = next(t for texts in by_table.values() for t in texts if t.startswith(f"CREATE TABLE IF NOT EXISTS "
                                                                                      f"{table}_local ON CLUSTER"))
        assert "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in local
        distributed = next(t for texts in by_table.values() for t in texts
                           if t.startswith(f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER"))
        engine = f"ENGINE = Distributed('{CLUSTER}', '{DATABASE}', '{table}_local', {key})"
        assert f"AS {table}_local\n{engine}" in distributed
    views = [t for texts in by_table.values() for t in texts if t.startswith("CREATE MATERIALIZED VIEW")]
    assert len(views) == 5
    for view in views:  # every view reads and writes the shard's own tables
        target, source = re.search(r" TO (\w+)", view).group(1), re.search(r"FROM (\w+)", view).group(1)
        assert target.endswith("_local") and source.endswith("_local"), view
    queries = [t for texts in by_table.values() for t in texts if "(MODIFY QUERY" in t]
    assert queries
    for query in queries:  # and so does every view's replaced SELECT
        assert re.search(r"FROM (\w+)", query).group(1).endswith("_local"), query


def _bare(text: str) -> str:
    """`ENGINE = MergeTree()` and `ENGINE = MergeTree` are the same."""
    return re.sub(r"(ENGINE = \w+)\(\)", r"\1", text)


def _undo(text: str) -> str | None:
    """A formatted CREATE TABLE / ALTER with its cluster changes taken back (None for the Distributed table)."""
    if "ENGINE = Distributed(" in text:
        return None
    text = text.replace(f" ON CLUSTER {CLUSTER}", "")
    text = re.sub(r"\b(\w+)_local\b", r"\1", text)
    text = re.sub(r"ENGINE = Replicated(\w+)\('[^']*', '[^']*'(?:, )?", r"ENGINE = \1(", text)
    text = text.replace(f", replicated_deduplication_window_seconds = {cluster.DEDUP_WINDOW_SECONDS}", "")
    return text.replace("replicated_deduplication_window", "non_replicated_deduplication_window")


def _queries() -> dict[str, tuple[str, dict[str, str]]]:
    """The analyzer's and tuner's public SQL constants that are whole statements, with a value per parameter."""
    import tracetune.analyzer.alerts
    import tracetune.analyzer.cost
    import tracetune.analyzer.drift
    import tracetune.analyzer.errors
    import tracetune.analyzer.slo
    import tracetune.analyzer.traces
    import tracetune.tuner.canary
    import tracetune.tuner.decisions
    import tracetune.tuner.observe

    values = {"String": "p", "Array(String)": "['a']", "Bool": "1"}
    found = {}
    for module in (tracetune.analyzer.alerts, tracetune.analyzer.cost, tracetune.analyzer.drift,
                   tracetune.analyzer.errors, tracetune.analyzer.slo, tracetune.analyzer.traces,
                   tracetune.tuner.canary, tracetune.tuner.decisions, tracetune.tuner.observe):
        for name, sql in vars(module).items():
            if not (name.endswith("SQL") and not name.startswith("_") and isinstance(sql, str)
                    and sql.lstrip().upper().startswith(("SELECT", "WITH"))):
                continue
            params = dict(re.findall(r"\{(\w+):([^}]+)\}", sql))
            if re.search(r"\{(?!\w+:)[^}]*\}", sql):
                continue  # a template with fragments filled in by its module
            found[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = (
                sql, {p: values.get(t, "2026-01-01 00:00:00" if t.startswith("DateTime") else
                                    "[1]" if t.startswith("Array") else "1") for p, t in params.items()})
    return found


def test_the_cluster_schema_is_created_by_the_engine_and_the_queries_run_on_it_unchanged(tmp_path):
    # chDB runs no distributed DDL queue, and its test Keeper leaves replicas read-only: so no ON CLUSTER
    # and no ALTER of a table (formatQuery checks those above); every CREATE runs, and every view's MODIFY
    # QUERY (a view holds no replicated data), which the engine checks against the view's `_local` target.
    chosen = [s for _, s in _cluster_form() if s.startswith("CREATE") or _modify_query(s)]
    assert any(_modify_query(s) for s in chosen)
    statements = [s.replace(f" ON CLUSTER {CLUSTER}", "") for s in chosen]
    queries = _queries()
    assert {"cost.COST_PER_REQUEST_SQL", "traces.STEP_BREAKDOWN_SQL", "observe.LABELLED_SQL"} <= set(queries)
    answer = _engine({"create": statements, "queries": queries}, tmp_path)
    failed = [(s.split("\n")[0], text) for s, (ok, text) in zip(statements, answer["create"], strict=True) if not ok]
    assert failed == []
    ok, tables = answer["tables"]
    engines = {name: engine for name, engine, _ in json.loads(tables)["data"]}
    for table in cluster.SHARDED:
        assert engines[table] == "Distributed" and engines[f"{table}_local"].startswith("Replicated"), table
    assert engines["tracetune_slos"] == "ReplicatedMergeTree" and "tracetune_slos_local" not in engines
    assert engines["tracetune_prices"] == "ReplicatedReplacingMergeTree"
    refused = {name: text for name, (ok, text) in answer["cluster"].items() if not ok}
    assert refused == {}, "queries that fail on the Distributed tables with the cluster client settings"
    # Without the client settings the spans' IN (SELECT ... FROM otel_traces) is refused: they are needed.
    assert "DISTRIBUTED_IN_JOIN_SUBQUERY_DENIED" in answer["without_settings"]["cost.COST_PER_REQUEST_SQL"][1]


def _modify_query(statement: str) -> bool:
    return re.match(rf"ALTER TABLE \w+_mv ON CLUSTER {CLUSTER} MODIFY QUERY\b", statement) is not None


def test_statements_without_a_cluster_form_are_refused_not_guessed():
    with pytest.raises(cluster.ClusterFormError, match="no cluster form"):
        cluster.cluster_statements("INSERT INTO otel_traces SELECT * FROM otel_traces", CLUSTER, DATABASE)
    with pytest.raises(cluster.ClusterFormError, match="only the `TO <table>` form"):
        cluster.cluster_statements("CREATE MATERIALIZED VIEW v ENGINE = MergeTree ORDER BY a AS SELECT 1 AS a",
                                   CLUSTER, DATABASE)
    with pytest.raises(cluster.ClusterFormError, match="separate statements"):
        cluster.cluster_statements("ALTER TABLE otel_traces ADD COLUMN x UInt8, MODIFY SETTING index_granularity = 1",
                                   CLUSTER, DATABASE)


def test_alters_reach_the_tables_that_hold_what_they_change():
    column = cluster.cluster_statements("ALTER TABLE otel_traces ADD COLUMN IF NOT EXISTS x UInt8", CLUSTER, DATABASE)
    assert column == [f"ALTER TABLE otel_traces_local ON CLUSTER {CLUSTER} ADD COLUMN IF NOT EXISTS x UInt8",
                      f"ALTER TABLE otel_traces ON CLUSTER {CLUSTER} ADD COLUMN IF NOT EXISTS x UInt8"]
    setting = cluster.cluster_statements("ALTER TABLE tracetune_slos MODIFY SETTING non_replicated_deduplication_window"
                                         " = 5", CLUSTER, DATABASE)
    assert setting == [f"ALTER TABLE tracetune_slos ON CLUSTER {CLUSTER} MODIFY SETTING replicated_deduplication_window"
                       f" = 5, replicated_deduplication_window_seconds = {cluster.DEDUP_WINDOW_SECONDS}"]
    view = cluster.cluster_statements("ALTER TABLE tracetune_spans_1m_mv MODIFY QUERY SELECT a FROM otel_traces "
                                      "JOIN tracetune_slos USING (a) WHERE a IN (SELECT a FROM `otel_traces`)",
                                      CLUSTER, DATABASE)
    assert view == [f"ALTER TABLE tracetune_spans_1m_mv ON CLUSTER {CLUSTER} MODIFY QUERY SELECT a FROM "
                    "otel_traces_local JOIN tracetune_slos USING (a) WHERE a IN (SELECT a FROM otel_traces_local)"]
    with pytest.raises(cluster.ClusterFormError, match="is a table, not a materialized view"):
        cluster.cluster_statements("ALTER TABLE otel_traces MODIFY QUERY SELECT 1", CLUSTER, DATABASE)
    assert cluster.cluster_statements("DROP TABLE IF EXISTS otel_traces SYNC", CLUSTER, DATABASE) == [
        f"DROP TABLE IF EXISTS otel_traces ON CLUSTER {CLUSTER} SYNC",
        f"DROP TABLE IF EXISTS otel_traces_local ON CLUSTER {CLUSTER} SYNC"]

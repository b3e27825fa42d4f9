"""ClickHouse for every component: schema, the one client path, and the embedded server."""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from tracetune.base.settings import Settings, SettingsError
from tracetune.store.cluster import ClusterFormError, cluster_statements
from tracetune.store.migrations import Migration, MigrationError, State, migrate, shipped
from tracetune.store.migrations import status as migration_status

__all__ = ["connect", "ensure_database", "apply_schema", "schema_statements", "migrate", "migration_status",
           "Migration", "MigrationError", "State", "cluster_statements", "ClusterFormError", "CLUSTER_QUERY_SETTINGS",
           "wait_ready", "serve", "next_seq", "Client"]

CLUSTER_QUERY_SETTINGS: Final = {"distributed_product_mode": "global"}
"""Client settings in cluster mode. The analyzer's queries filter spans with `TraceId IN (SELECT ... FROM
otel_traces)`; on Distributed tables ClickHouse refuses such a subquery unless told how to run it.
`global` runs it once over the cluster and sends its result to every shard: the same answer as on one
server, whatever the query."""

_seq_lock = threading.Lock()
_last_seq = 0


def next_seq() -> int:
    """A number larger than every one this process handed out before (nanoseconds since the epoch, or +1).

    Append-only tables order rows by (time, seq): rows written in the same microsecond keep their order."""
    global _last_seq
    with _seq_lock:
        _last_seq = max(_last_seq + 1, time.time_ns())
        return _last_seq


def schema_statements() -> list[tuple[str, str]]:
    """(file name, statement) for every migration statement, in order. Every statement is idempotent."""
    return [(f"{m.version:03d}_{m.name}.sql", statement) for m in shipped() for statement in m.statements]


def apply_schema(client: Client, cluster: str = "") -> list[Migration]:
    """Apply the migrations the client's database lacks (store/migrations.py); the ones it applied.

    Safe from any process, any time, several at once; one query when the schema is up to date.
    `cluster` applies their cluster form (store/cluster.py) ON CLUSTER.
    """
    return migrate(client, cluster=cluster).applied


def _client(settings: Settings, database: str | None, timeout: float, readonly: bool = False) -> Client:
    target = settings.clickhouse_target(readonly)
    return clickhouse_connect.get_client(
        host=target["host"], port=target["port"], username=target["username"],
        password=target["password"], secure=target["secure"], database=database or "",
        autogenerate_session_id=False, connect_timeout=timeout, send_receive_timeout=300,
        settings=dict(CLUSTER_QUERY_SETTINGS) if settings.clickhouse_cluster else None,
    )


def _check_cluster(settings: Settings) -> None:
    if settings.clickhouse_cluster and settings.embedded:
        raise SettingsError(f"clickhouse_cluster = {settings.clickhouse_cluster!r} needs clickhouse_url "
                            "(TRACETUNE_CLICKHOUSE_URL, a server of that cluster): the embedded store is one server; "
                            "unset TRACETUNE_CLICKHOUSE_CLUSTER to use it")


def ensure_database(settings: Settings) -> None:
    """Create the settings' database if missing (on every node of the cluster in cluster mode)."""
    _check_cluster(settings)
    database = settings.clickhouse_target()["database"]
    on_cluster = f" ON CLUSTER `{settings.clickhouse_cluster}`" if settings.clickhouse_cluster else ""
    _client(settings, None, 10).command(f"CREATE DATABASE IF NOT EXISTS `{database}`{on_cluster}")


def wait_ready(settings: Settings, timeout: float = 60.0) -> None:
    """Block until ClickHouse answers /ping, or raise TimeoutError naming the address."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    quiet = logging.getLogger("clickhouse_connect")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # "connection refused" is expected while the server starts
    try:
        while time.monotonic() < deadline:
            try:
                if _client(settings, None, 2).ping():
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = exc
            time.sleep(0.2)
    finally:
        quiet.setLevel(level)
    target = settings.clickhouse_target()
    raise TimeoutError(f"ClickHouse at {target['host']}:{target['port']} did not answer in {timeout:.0f}s ({last})")


def connect(settings: Settings, ensure_schema: bool = True, wait: float = 0.0, readonly: bool = False) -> Client:
    """A clickhouse-connect client for the embedded store or TRACETUNE_CLICKHOUSE_URL.

    `readonly` connects as the embedded store's read-only user (dashboards, reports); it cannot
    create the schema, so it implies `ensure_schema=False`.
    """
    _check_cluster(settings)
    if wait:
        wait_ready(settings, wait)
    database = settings.clickhouse_target()["database"]
    ensure_schema = ensure_schema and not readonly
    if ensure_schema:
        ensure_database(settings)
    client = _client(settings, database, 10, readonly)
    if ensure_schema:
        apply_schema(client, settings.clickhouse_cluster)
    return client


def serve(settings: Settings) -> None:
    """Run the embedded store (chDB behind the ClickHouse HTTP interface) until stopped.

    Its files are private (0700 folders, 0600 files); the process confines itself with Landlock before
    the engine starts a thread (store/sandbox.py), once the password files are read."""
    import os
    import sys
    from pathlib import Path

    from tracetune.base.serving import serve as serve_app
    from tracetune.store import sandbox
    from tracetune.store.access import User, Users, allowed_hosts

    os.umask(0o077)
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # a folder of an older release was created 0755
    users = Users([User(*settings.store_credentials(readonly=False), readonly=0),
                   User(*settings.store_credentials(readonly=True), readonly=2)])
    log = logging.getLogger("tracetune.store")
    try:
        confined = sandbox.confine(data_dir, settings.store_port)
        log.info("store confined by Landlock ABI %d to %s and TCP port %d%s", confined.abi, data_dir.resolve(),
                 settings.store_port, "" if confined.network else " (no network rules below ABI 4)")
    except sandbox.SandboxError as exc:
        if settings.store_require_sandbox:  # a user error: one line, exit code 2
            print(f"Error: store_require_sandbox is set but the store cannot confine itself with Landlock: {exc}; "
                  "unset TRACETUNE_STORE_REQUIRE_SANDBOX to run it unconfined", file=sys.stderr)
            raise SystemExit(2) from None
        log.warning("the store runs unconfined (%s): a statement that passes its allow-lists acts with this "
                    "process's rights on the host; set store_require_sandbox to refuse to start instead", exc)
    from tracetune.store.engine import Engine  # chDB starts its threads on import: after the sandbox
    from tracetune.store.server import create_app

    engine = Engine(settings.data_dir)
    try:
        serve_app(create_app(engine, users, allowed_hosts(settings.bind_host)), settings.bind_host,
                  settings.store_port)
    finally:
        engine.close()

"""ClickHouse for every component: schema, the one client path, and the embedded server."""

from __future__ import annotations

import logging
import re
import threading
import time
from importlib import resources

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from tracetune.settings import Settings

__all__ = ["connect", "apply_schema", "schema_statements", "wait_ready", "serve", "next_seq", "Client"]

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
    """(file name, statement) for every DDL file, in order. Every statement is idempotent.

    A file holds one statement, or several separated by a line that is only `;`.
    """
    files = sorted(p for p in resources.files("tracetune.store").joinpath("sql").iterdir() if p.name.endswith(".sql"))
    return [(p.name, part.strip()) for p in files for part in re.split(r"(?m)^;[ \t]*$", p.read_text())
            if part.strip()]


def apply_schema(client: Client) -> None:
    """Create every table in the client's database if missing (safe from any process, any time)."""
    for _, statement in schema_statements():
        client.command(statement)


def _client(settings: Settings, database: str | None, timeout: float, readonly: bool = False) -> Client:
    target = settings.clickhouse_target(readonly)
    return clickhouse_connect.get_client(
        host=target["host"], port=target["port"], username=target["username"],
        password=target["password"], secure=target["secure"], database=database or "",
        autogenerate_session_id=False, connect_timeout=timeout, send_receive_timeout=300,
    )


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
    if wait:
        wait_ready(settings, wait)
    database = settings.clickhouse_target()["database"]
    ensure_schema = ensure_schema and not readonly
    if ensure_schema:
        _client(settings, None, 10).command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    client = _client(settings, database, 10, readonly)
    if ensure_schema:
        apply_schema(client)
    return client


def serve(settings: Settings) -> None:
    """Run the embedded store (chDB behind the ClickHouse HTTP interface) until stopped."""
    from tracetune.serving import serve as serve_app
    from tracetune.store.access import User, Users, allowed_hosts
    from tracetune.store.engine import Engine
    from tracetune.store.server import create_app

    users = Users([User(*settings.store_credentials(readonly=False), readonly=0),
                   User(*settings.store_credentials(readonly=True), readonly=2)])
    engine = Engine(settings.data_dir)
    try:
        serve_app(create_app(engine, users, allowed_hosts(settings.bind_host)), settings.bind_host,
                  settings.store_port)
    finally:
        engine.close()

"""Versioned schema migrations: `store/sql/NNN_name.sql` is migration NNN, applied once and in order.

Which migrations a database has is recorded in `tracetune_schema_migrations` (version, name,
checksum, when, by whom), so a component starting reads one table and applies only what is missing.
Every statement is idempotent (`CREATE ... IF NOT EXISTS`, `ALTER ... MODIFY SETTING`, `ADD COLUMN IF
NOT EXISTS`, a view's `MODIFY QUERY`): two processes migrating at once both run the missing statements,
harmlessly, and the record is written once (its insert carries a deduplication token). A data folder made before this
table existed has every table already; its migrations run as no-ops and are recorded.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata, resources
from typing import Final

from tracetune.store import cluster as cluster_form
from tracetune.store.lexer import tokens

TABLE: Final = "tracetune_schema_migrations"
"""Where applied migrations are recorded (one row per migration; a concurrent duplicate is dropped)."""

CREATE_TABLE_SQL: Final = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    version UInt32,
    name String,
    checksum String,
    statements UInt16,
    applied_at DateTime64(3, 'UTC'),
    applied_by String,
    duration_ms Float64
) ENGINE = MergeTree()
ORDER BY version
SETTINGS non_replicated_deduplication_window = 10000"""

# One row per version: the first record wins if two processes recorded the same migration.
APPLIED_SQL: Final = f"""SELECT version, argMin(name, applied_at), argMin(checksum, applied_at), min(applied_at),
       argMin(applied_by, applied_at)
FROM {TABLE}
GROUP BY version
ORDER BY version"""

_FILE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_SEPARATOR = re.compile(r"(?m)^;[ \t]*$")
_CODE = re.compile(r"Code:? (\d+)")
_UNKNOWN_TABLE, _UNKNOWN_DATABASE = 60, 81


class MigrationError(Exception):
    """The migration files are not a valid sequence (a bad file name, two files with one version)."""


@dataclass(frozen=True)
class Migration:
    """One file of `store/sql`: its version (the number it starts with), name and statements."""

    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        """SHA-256 of the statements' tokens: comments and layout may change, the SQL may not."""
        digest = hashlib.sha256()
        for statement in self.statements:
            for _, token, _, _ in tokens(statement.encode()):
                digest.update(token + b"\x00")
            digest.update(b"\x01")
        return digest.hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:03d} {self.name}"

    def sql(self, cluster: str = "", database: str = "") -> list[str]:
        """The statements to run: as written, or their cluster form (store/cluster.py)."""
        if not cluster:
            return list(self.statements)
        return [out for statement in self.statements
                for out in cluster_form.cluster_statements(statement, cluster, database)]


@dataclass(frozen=True)
class Applied:
    """A migration as recorded in the database."""

    version: int
    name: str
    checksum: str
    applied_at: datetime
    applied_by: str


@dataclass(frozen=True)
class State:
    """A migration's state in one database: `applied`, `pending`, `changed` (its file differs from what
    was applied) or `unknown` (recorded, but no file has that version: a newer tracetune applied it)."""

    version: int
    name: str
    state: str
    applied_at: datetime | None = None
    applied_by: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"version": self.version, "name": self.name, "state": self.state,
                "applied_at": self.applied_at.isoformat() if self.applied_at else None,
                "applied_by": self.applied_by}


@dataclass(frozen=True)
class Result:
    """What `migrate` did: the migrations it applied, and the applied ones whose file has changed since."""

    applied: list[Migration]
    changed: list[State]
    version: int  # the newest version the database has now (0: none)


def parse(files: list[tuple[str, str]]) -> list[Migration]:
    """Migrations from (file name, text) pairs, in version order.

    A file holds one statement, or several separated by a line that is only `;`.
    """
    found: dict[int, Migration] = {}
    for file_name, text in files:
        match = _FILE.match(file_name)
        if not match:
            raise MigrationError(f"store/sql/{file_name}: a migration is named NNN_name.sql "
                                 "(a number, then lowercase letters, digits and _)")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"store/sql/{file_name}: version {version} is also "
                                 f"{found[version].version:03d}_{found[version].name}.sql; give it a new number")
        statements = tuple(part.strip() for part in _SEPARATOR.split(text) if part.strip())
        found[version] = Migration(version, match.group(2), statements)
    return [found[v] for v in sorted(found)]


def shipped() -> list[Migration]:
    """Every migration this tracetune ships, in order."""
    folder = resources.files("tracetune.store").joinpath("sql")
    return parse([(p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".sql")])


def applied(client) -> dict[int, Applied] | None:
    """The recorded migrations of the client's database; None if it has no record table (or no database)."""
    try:
        rows = client.query(APPLIED_SQL).result_rows
    except Exception as exc:  # only "no such table / database" means "nothing recorded"
        if _error_code(exc) in (_UNKNOWN_TABLE, _UNKNOWN_DATABASE):
            return None
        raise
    return {int(v): Applied(int(v), name, checksum, _utc(at), by) for v, name, checksum, at, by in rows}


def status(client, available: list[Migration] | None = None) -> list[State]:
    """Every migration's state in the client's database (None: a database not created yet), in version order."""
    available = shipped() if available is None else available
    done = (applied(client) if client is not None else None) or {}
    states = []
    for migration in available:
        record = done.get(migration.version)
        if record is None:
            states.append(State(migration.version, migration.name, "pending"))
        else:
            state = "applied" if record.checksum == migration.checksum else "changed"
            states.append(State(migration.version, migration.name, state, record.applied_at, record.applied_by))
    known = {m.version for m in available}
    states += [State(r.version, r.name, "unknown", r.applied_at, r.applied_by)
               for r in done.values() if r.version not in known]
    return sorted(states, key=lambda s: s.version)


def migrate(client, cluster: str = "", database: str = "", available: list[Migration] | None = None,
            applied_by: str = "", progress: Callable[[Migration], None] | None = None) -> Result:
    """Apply the migrations the client's database lacks, in order, and record each.

    One query when nothing is missing. `cluster`: run each statement's cluster form (`ON CLUSTER`,
    Replicated and Distributed tables) in `database` (default: the client's). `progress` is called
    after each applied migration.
    """
    available = shipped() if available is None else available
    database = database or getattr(client, "database", "") or ""
    if cluster and not database:
        raise ValueError("the cluster form names its database: pass database= or connect to one")
    done = applied(client)
    if done is None:
        for statement in _statements(CREATE_TABLE_SQL, cluster, database):
            client.command(statement)
        done = {}
    by = applied_by or who()
    newly: list[tuple[Migration, datetime, float]] = []
    try:
        for migration in available:
            if migration.version in done:
                continue
            started = time.perf_counter()
            for statement in migration.sql(cluster, database):
                client.command(statement)
            newly.append((migration, datetime.now(UTC), (time.perf_counter() - started) * 1000))
            if progress is not None:
                progress(migration)
    except BaseException:  # what was applied is recorded, also when a later migration fails
        if newly:
            with contextlib.suppress(Exception):  # the server may be what failed: its error is the one to see
                _record(client, newly, by)
        raise
    if newly:
        _record(client, newly, by)
    changed = [State(m.version, m.name, "changed", r.applied_at, r.applied_by) for m in available
               if (r := done.get(m.version)) is not None and r.checksum != m.checksum]
    version = max([*done, *(m.version for m, _, _ in newly)], default=0)
    return Result([m for m, _, _ in newly], changed, version)


def who() -> str:
    """user@host, process id and tracetune release: who applied a migration."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    try:
        release = f" tracetune {metadata.version('tracetune')}"
    except metadata.PackageNotFoundError:
        release = ""
    return f"{user}@{socket.gethostname()} pid {os.getpid()}{release}"


def _record(client, newly: list[tuple[Migration, datetime, float]], by: str) -> None:
    """One insert for a run (a start must stay fast); the token makes the same record from another
    process migrating at the same moment a no-op."""
    rows = [[m.version, m.name, m.checksum, len(m.statements), at, by, ms] for m, at, ms in newly]
    token = hashlib.sha256(" ".join(f"{m.version}:{m.checksum}" for m, _, _ in newly).encode()).hexdigest()
    client.insert(TABLE, rows, column_names=["version", "name", "checksum", "statements", "applied_at", "applied_by",
                                             "duration_ms"],
                  settings={"insert_deduplication_token": f"migrations-{token}"})


def _statements(statement: str, cluster: str, database: str) -> list[str]:
    return cluster_form.cluster_statements(statement, cluster, database) if cluster else [statement]


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = _CODE.search(str(exc))
    return int(match.group(1)) if match else None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

"""The embedded ClickHouse engine (chDB): one process per data directory, many queries at once.

chDB lets several connections to one data directory run queries concurrently, so each request gets
a connection of its own (they cost ~0.1 ms and keep `SET`, `USE` and temporary tables to
themselves) and a session keeps one connection across requests. Queries show in
`system.processes` and stop on `KILL QUERY`; a request is cancelled by killing the query that runs
on its thread. An insert's data reaches the engine as `INSERT ... FROM INFILE` over an in-memory
file, so the engine reports every error: chDB 4.4's streaming insert (`send_insert`) answers
success when the commit fails and stores nothing, and data inline in the query text ends at the
first blank line (`\\n\\n`, common in binary formats).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import chdb

_CODE = re.compile(r"Code:\s*(\d+)")
_REPEATED_PREFIX = re.compile(r"(Code: \d+\. DB::Exception: )(?:Code: \d+\. DB::Exception: )+")
_KILL = ("KILL QUERY WHERE has(thread_ids, {tid:UInt64}) AND query = {query:String} "
         "AND query_id != queryID() SYNC")


class EngineError(Exception):
    """A ClickHouse error from the engine, with its numeric code."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        match = _CODE.search(message)
        self.code = code if code is not None else int(match.group(1)) if match else 1002  # UNKNOWN_EXCEPTION


@dataclass
class Result:
    data: bytes
    rows_read: int = 0
    bytes_read: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    elapsed: float = 0.0
    timezone: str = ""  # the session time zone the values were rendered in (X-ClickHouse-Timezone)


@dataclass
class ExternalTable:
    """Data sent beside a query (ClickHouse "external data"): a temporary table for that query only."""

    name: str
    structure: str  # `a UInt8, b String`, a ClickHouse table structure
    format: str
    data: bytes


@dataclass
class Request:
    """One statement and its state: settings, query parameters, database, external tables."""

    query: str
    output_format: str = "TabSeparated"
    database: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    insert_format: str = ""  # set for INSERT ... FORMAT X with a data body; `query` is then `INSERT INTO t (cols)`
    insert_settings: str = ""  # the INSERT's own `SETTINGS ...` clause, if any (it follows FROM INFILE)
    data: bytes = b""
    external: list[ExternalTable] = field(default_factory=list)
    query_id: str = ""
    readonly: int = 0  # ClickHouse `readonly` for this request: the user's, a GET's or the URL's (strictest)
    user_readonly: int = 0  # the user's own level: a session of a read-only user stays read-only


class Session:
    """A connection kept across requests with the same `session_id` (and user), as ClickHouse keeps one."""

    def __init__(self, conn: chdb.state.sqlitelike.Connection, timeout: float):
        self.conn = conn
        self.timeout = timeout
        self.expires = time.monotonic() + timeout
        self.lock = threading.Lock()

    def touch(self) -> None:
        self.expires = time.monotonic() + self.timeout


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class Engine:
    """Owns the chDB data directory for this process; runs requests concurrently."""

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The first connection starts the engine, with a users file that lets its internal user answer
        # `SHOW POLICIES` / `SHOW USERS` (access management); later connections join that engine.
        self._base = chdb.connect(f"{self.data_dir}?config-file={_engine_config(self.data_dir)}")
        # The engine's own zone follows TZ of this process; clients need it to read DateTime values.
        self.timezone = self._base.query("SELECT timezone()", "TabSeparatedRaw").bytes().decode().strip()
        self._sessions: dict[tuple[str, str], Session] = {}
        self._running: dict[str, tuple[int, str]] = {}  # query_id -> (thread id, statement text)
        self._guard = threading.Lock()  # protects the two maps above, never held while a query runs

    # ---- sessions ---------------------------------------------------------------------------
    def session(self, user: str, session_id: str, timeout: float, check: bool) -> Session:
        """The session `session_id` of `user`, created unless `check`; refreshes its timeout."""
        now = time.monotonic()
        with self._guard:
            expired = [key for key, s in self._sessions.items() if s.expires < now and not s.lock.locked()]
            stale = [self._sessions.pop(key) for key in expired]
            session = self._sessions.get((user, session_id))
            if session is None:
                if check:
                    raise EngineError(f"Code: 372. DB::Exception: Session {session_id} not found. (SESSION_NOT_FOUND)")
                session = Session(chdb.connect(str(self.data_dir)), timeout)
                self._sessions[(user, session_id)] = session
            session.timeout = timeout
            session.expires = now + timeout
        for old in stale:
            old.conn.close()
        return session

    # ---- queries ----------------------------------------------------------------------------
    def execute(self, request: Request, session: Session | None = None) -> Result:
        """Run one request on a connection of its own, or on its session's connection."""
        timezone = request.settings.get("session_timezone") or self.timezone
        with self._prepared(request, session) as (conn, statement, output_format):
            res = conn.query(statement, output_format, params=request.params)
            return Result(res.bytes(), rows_read=res.rows_read(), bytes_read=res.bytes_read(),
                          rows_written=res.rows_written(), bytes_written=res.bytes_written(),
                          elapsed=res.elapsed(), timezone=timezone)

    def stream(self, request: Request, session: Session | None = None) -> Iterator[bytes]:
        """The result in the chunks the engine produces (a long result never sits whole in memory).

        An error after the first chunk is raised from the iteration, as EngineError.
        """
        with self._prepared(request, session) as (conn, statement, output_format):
            result = conn.send_query(statement, output_format, params=request.params)
            try:
                for chunk in result:
                    data = chunk.bytes()
                    if data:
                        yield data
            finally:
                result.close()

    def cancel(self, query_id: str) -> bool:
        """Stop the engine query of a running request (client gone, timed out); True if one was running."""
        with self._guard:  # a streamed query runs on its reader's thread too, so the same KILL finds it
            running = self._running.get(query_id)
        if running is None:
            return False
        tid, text = running
        try:
            self._base.query(_KILL, "TabSeparated", params={"tid": str(tid), "query": text})
        except RuntimeError:
            return False
        return True

    def _register(self, query_id: str) -> None:
        """Claim the query id (its statement is filled in once known), or refuse one already running."""
        with self._guard:
            if query_id in self._running:
                raise EngineError(f"Code: 216. DB::Exception: Query with id = {query_id} is already running. "
                                  "(QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING)")
            self._running[query_id] = (threading.get_native_id(), "")

    @contextmanager
    def _prepared(self, request: Request, session: Session | None):
        """(connection, statement, format) with the request's tables, settings and database in place.

        Engine errors inside become EngineError; a session's connection is drained after one, as
        chDB 4.4 hands a failed query's leftover output to the next query on that connection.
        """
        if request.query_id:
            self._register(request.query_id)
        try:
            with ExitStack() as stack:
                if session is None:
                    conn = chdb.connect(str(self.data_dir))
                    stack.callback(conn.close)
                else:
                    if not session.lock.acquire(blocking=False):
                        raise EngineError("Code: 373. DB::Exception: Session is locked by a concurrent client. "
                                          "(SESSION_IS_LOCKED)")
                    stack.callback(session.lock.release)
                    stack.callback(session.touch)
                    conn = session.conn
                try:
                    statement, output_format = self._prepare(conn, request, session is not None, stack)
                    if request.query_id:  # what `cancel` looks for in system.processes
                        with self._guard:
                            self._running[request.query_id] = (threading.get_native_id(), statement)
                    yield conn, _engine_text(statement), output_format
                except RuntimeError as exc:  # chDB's ChdbError (a RuntimeError) carries ClickHouse's text
                    if session is not None:
                        _drain(conn)
                    raise EngineError(_clean(str(exc))) from None
        finally:
            if request.query_id:
                with self._guard:
                    self._running.pop(request.query_id, None)

    def _prepare(self, conn, request: Request, in_session: bool, stack: ExitStack) -> tuple[str, str]:
        for table in request.external:  # before the settings: `readonly` would refuse it
            path = stack.enter_context(_in_file(table.data))
            formats = ", ".join(f"{_identifier(k)} = {_quote(v)}" for k, v in request.settings.items()
                                if k.startswith(("input_format_", "format_")))  # e.g. errors to skip
            conn.query(f"CREATE TEMPORARY TABLE {_identifier(table.name)} ENGINE = Memory AS "
                       f"SELECT * FROM file({_quote(path)}, {_quote(table.format)}, {_quote(table.structure)})"
                       + (f" SETTINGS {formats}" if formats else ""))
            stack.callback(_drop_quietly, conn, table.name)
        if in_session:
            self._session_state(conn, request, stack)
        else:
            if request.readonly:  # first, so nothing the request sets can lift it
                conn.query(f"SET readonly = {request.readonly}")
            _set(conn, request.settings)
            if request.database:
                conn.query(f"USE {_identifier(request.database)}")
        statement, output_format = request.query, request.output_format
        if request.insert_format:
            statement = _insert_statement(request, stack.enter_context(_in_file(request.data)))
            output_format = "TabSeparated"
        if in_session and request.readonly > request.user_readonly:
            _check_read_only(conn, statement, request.readonly)
        return statement, output_format

    @staticmethod
    def _session_state(conn, request: Request, stack: ExitStack) -> None:
        """A request's URL settings and database on a session: for that request only, as in ClickHouse.

        What the statement itself sets (`SET`, `USE`) stays in the session; a URL value the
        statement left alone is put back afterwards. A read-only user's session is read-only for good.
        """
        if request.user_readonly:
            conn.query(f"SET readonly = {request.user_readonly}")
        names = list(request.settings)
        before = _current(conn, names)
        database = _current_database(conn) if request.database else ""
        _set(conn, request.settings)
        applied = _current(conn, names)
        if request.database:
            conn.query(f"USE {_identifier(request.database)}")

        def restore() -> None:
            now = _current(conn, names)
            _set_quietly(conn, {n: v for n, v in before.items() if n in now and now[n] == applied.get(n)})
            if database and _current_database(conn) == request.database:
                _use_quietly(conn, database)

        stack.callback(restore)

    def close(self) -> None:
        with self._guard:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.conn.close()
        self._base.close()


def _current(conn, names: list[str]) -> dict[str, str]:
    """The values a connection has now for these settings (unknown names are left to the SET to refuse)."""
    if not names:
        return {}
    columns = ", ".join(f"toString(getSetting({{n{i}:String}}))" for i in range(len(names)))
    try:
        row = conn.query(f"SELECT {columns} FORMAT JSONCompactEachRow", "JSONCompactEachRow",
                         params={f"n{i}": name for i, name in enumerate(names)}).bytes()
        return dict(zip(names, json.loads(row), strict=True))
    except RuntimeError:
        return {name: value for one in names for name, value in _current(conn, [one]).items()} if len(names) > 1 else {}


def _check_read_only(conn, statement: str, level: int) -> None:
    """A GET (or `readonly` in the URL) on a session: this statement only must read, the session stays as it is."""
    kind = str(conn._conn.classify_query(statement)["query_class"]).rsplit(".", 1)[-1]
    first = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
    if kind != "READ_ONLY" and not (level == 2 and first == "SET"):
        raise EngineError("Code: 164. DB::Exception: Cannot execute query in readonly mode: a GET request or "
                          "readonly in the URL may only read. (READONLY)")


def _drain(conn) -> None:
    """Take a failed query's leftover output off a connection that will be used again."""
    try:
        conn.query("SELECT 1 WHERE 0", "TabSeparated")
    except RuntimeError:
        pass


def _engine_text(statement: str) -> str | bytes:
    """The statement as chDB takes it: bytes where the body held binary data (a `$name$` heredoc)."""
    try:
        statement.encode("utf-8")
    except UnicodeEncodeError:
        return statement.encode("utf-8", "surrogateescape")
    return statement


def _current_database(conn) -> str:
    return conn.query("SELECT currentDatabase()", "TabSeparatedRaw").bytes().decode().rstrip("\n")


def _set(conn, settings: dict[str, str]) -> None:
    """All of a request's settings in one engine call (one `SET a = ..., b = ...`)."""
    if settings:
        conn.query("SET " + ", ".join(f"{_identifier(name)} = {_quote(value)}" for name, value in settings.items()))


def _set_quietly(conn, values: dict[str, str]) -> None:
    for name, value in values.items():
        try:
            _set(conn, {name: value})
        except RuntimeError:  # e.g. `readonly` cannot be lowered again, exactly as in ClickHouse
            pass


def _use_quietly(conn, database: str) -> None:
    try:
        conn.query(f"USE {_identifier(database)}")
    except RuntimeError:
        pass


def _drop_quietly(conn, name: str) -> None:
    try:
        conn.query(f"DROP TEMPORARY TABLE IF EXISTS {_identifier(name)}")
    except RuntimeError:
        pass


def _insert_statement(request: Request, path: str) -> str:
    """`INSERT INTO t (cols) FROM INFILE ... [SETTINGS ...] FORMAT X`: one statement, errors raised."""
    parts = [request.query, f"FROM INFILE {_quote(path)} COMPRESSION 'none'", request.insert_settings,
             f"FORMAT {request.insert_format}"]
    return " ".join(part for part in parts if part)


@contextmanager
def _in_file(data: bytes) -> Iterator[str]:
    """Bytes as a file the engine opens by path: in memory (memfd) where Linux has it."""
    if hasattr(os, "memfd_create"):
        file = os.fdopen(os.memfd_create("tracetune-insert", os.MFD_CLOEXEC), "w+b")
    else:  # pragma: no cover - macOS: an unlinked temporary file
        file = tempfile.TemporaryFile()
    with file:
        file.write(data)
        file.flush()
        file.seek(0)  # where /dev/fd/N is a dup (macOS), the engine reads from this offset
        yield f"/dev/fd/{file.fileno()}"


def _clean(message: str) -> str:
    """ClickHouse's own text, without chDB's wrappers or its repeated `Code: N. DB::Exception:` prefix."""
    start = message.find("Code: ")
    return _REPEATED_PREFIX.sub(r"\1", message[start if start > 0 else 0:]).strip()


_USERS_XML = """<clickhouse>
  <profiles><default/></profiles>
  <quotas><default/></quotas>
  <users><default>
    <password></password><networks><ip>::1</ip><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota><access_management>1</access_management>
  </default></users>
</clickhouse>
"""


def _engine_config(data_dir: Path) -> Path:
    """The engine's own config: its in-process user (the store's users and passwords are in store/access.py)."""
    users = data_dir / "tracetune-engine-users.xml"
    users.write_text(_USERS_XML)
    config = data_dir / "tracetune-engine.xml"
    config.write_text(f"<clickhouse><users_config>{users}</users_config></clickhouse>\n")
    return config

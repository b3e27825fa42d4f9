"""The embedded ClickHouse engine (chDB), one process per data directory, one call at a time.

Each request gets its own short-lived chDB session (connections are cheap and keep `SET` and
`USE` to themselves), while a single lock serializes every call into the engine. An insert's data
reaches the engine as `INSERT ... FROM INFILE` over an in-memory file, so the engine reports every
error: chDB 4.4's streaming insert (`send_insert`) answers success when the commit fails (too many
partitions, an error in a materialized view) and stores nothing, and data inline in the query text
ends at the first blank line (`\n\n`, common in binary formats).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import chdb

_CODE = re.compile(r"Code:\s*(\d+)")
_REPEATED_PREFIX = re.compile(r"(Code: \d+\. DB::Exception: )(?:Code: \d+\. DB::Exception: )+")


class EngineError(Exception):
    """A ClickHouse error from the engine, with its numeric code."""

    def __init__(self, message: str):
        super().__init__(message)
        match = _CODE.search(message)
        self.code = int(match.group(1)) if match else 1002  # UNKNOWN_EXCEPTION


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
class Request:
    """One statement and its session state: settings, query parameters, database."""

    query: str
    output_format: str = "TabSeparated"
    database: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    insert_format: str = ""  # set for INSERT ... FORMAT X with a data body; `query` is then `INSERT INTO t (cols)`
    insert_settings: str = ""  # the INSERT's own `SETTINGS ...` clause, if any (it follows FROM INFILE)
    data: bytes = b""


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class Engine:
    """Owns the chDB data directory for this process."""

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._base = chdb.connect(str(self.data_dir))  # keeps the engine open between requests
        # The engine's own zone follows TZ of this process; clients need it to read DateTime values.
        self.timezone = self._base.query("SELECT timezone()", "TabSeparatedRaw").bytes().decode().strip()

    def execute(self, request: Request) -> Result:
        timezone = request.settings.get("session_timezone") or self.timezone
        with self._lock:
            conn = chdb.connect(str(self.data_dir))
            try:
                for name, value in request.settings.items():
                    conn.query(f"SET {_identifier(name)} = {_quote(value)}")
                if request.database:
                    conn.query(f"USE {_identifier(request.database)}")
                if request.insert_format:
                    with _in_file(request.data) as path:
                        res = conn.query(_insert_statement(request, path), "TabSeparated", params=request.params)
                else:
                    res = conn.query(request.query, request.output_format, params=request.params)
                return Result(res.bytes(), rows_read=res.rows_read(), bytes_read=res.bytes_read(),
                              rows_written=res.rows_written(), bytes_written=res.bytes_written(),
                              elapsed=res.elapsed(), timezone=timezone)
            except RuntimeError as exc:  # chDB's ChdbError (a RuntimeError) carries ClickHouse's text
                raise EngineError(_clean(str(exc))) from None
            finally:
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._base.close()


def _insert_statement(request: Request, path: str) -> str:
    """`INSERT INTO t (cols) FROM INFILE ... [SETTINGS ...] FORMAT X`: one statement, errors raised."""
    parts = [request.query, f"FROM INFILE {_quote(path)} COMPRESSION 'none'", request.insert_settings,
             f"FORMAT {request.insert_format}"]
    return " ".join(part for part in parts if part)


@contextmanager
def _in_file(data: bytes) -> Iterator[str]:
    """The request body as a file the engine opens by path: in memory (memfd) where Linux has it."""
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
    return _REPEATED_PREFIX.sub(r"\1", message).strip()

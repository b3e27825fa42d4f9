"""The embedded ClickHouse engine (chDB), one process per data directory, one call at a time.

Each request gets its own short-lived chDB session (connections are cheap and keep `SET` and
`USE` to themselves), while a single lock serializes every call into the engine.
"""

from __future__ import annotations

import re
import threading
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
    insert_format: str = ""  # set for INSERT ... FORMAT X with a data body
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
                    with conn.send_insert(request.query, request.insert_format) as inserter:
                        if request.data:
                            inserter.append(request.data)
                        written = inserter.finish()
                    return Result(b"", rows_written=written.rows_written,
                                  bytes_written=written.bytes_written, elapsed=written.elapsed,
                                  timezone=timezone)
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


def _clean(message: str) -> str:
    """ClickHouse's own text, without chDB's wrappers or its repeated `Code: N. DB::Exception:` prefix."""
    for prefix in ("Streaming insert append failed: ", "Streaming insert finish failed: "):
        message = message.replace(prefix, "")
    return _REPEATED_PREFIX.sub(r"\1", message).strip()

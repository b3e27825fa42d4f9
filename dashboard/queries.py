"""How the dashboard reaches ClickHouse: analyzer functions on one cached client, trouble as one line.

The page never writes SQL; `query(settings, analyzer_function, **kwargs)` runs an analyzer (or tuner
read) function as the store's read-only user and turns a connection or server failure into
StoreUnavailable, whose message fits one line; `cached(...)` is the same behind a short-lived cache.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import streamlit as st
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from tracetune import store
from tracetune.base.settings import Settings

__all__ = ["CACHE_SECONDS", "PREFETCH_THREADS", "SPAN_TABLE", "StoreUnavailable", "address", "cached", "prefetch",
           "query", "show_unavailable", "target_key"]

T = TypeVar("T")

# ClickHouse error codes that mean "nothing was ever written here", not "something is broken".
_NOT_CREATED_YET = {60, 81}  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_CODE = re.compile(r"Code:\s*(\d+)")
_MISSING_TABLE = re.compile(r"identifier '(?:\w+\.)?(\w+)'|Table (?:\w+\.)?(\w+) does(?:n't| not) exist")
SPAN_TABLE = "otel_traces"


class StoreUnavailable(Exception):
    """ClickHouse could not answer; the message is one line for the page."""

    def __init__(self, message: str, empty: bool = False, table: str = SPAN_TABLE) -> None:
        super().__init__(message)
        self.empty = empty  # True: the store is up but `table` was not created yet
        self.table = table


def address(settings: Settings) -> str:
    """host:port/database of the ClickHouse this page reads, as shown to the user."""
    target = settings.clickhouse_target()
    return f"{target['host']}:{target['port']}/{target['database']}"


@st.cache_resource(show_spinner=False)
def _cached_client(target: tuple, _settings: Settings):
    """One clickhouse-connect client per ClickHouse target, shared by every browser session."""
    return store.connect(_settings, readonly=True)


def _unavailable(settings: Settings, exc: Exception) -> StoreUnavailable:
    where = address(settings)
    if isinstance(exc, OperationalError):
        return StoreUnavailable(f"Cannot reach ClickHouse at {where}: is `tracetune up` running?")
    code = _CODE.search(str(exc))
    if code and int(code.group(1)) in _NOT_CREATED_YET:
        missing = _MISSING_TABLE.search(str(exc))
        table = next((name for name in missing.groups() if name), SPAN_TABLE) if missing else SPAN_TABLE
        return StoreUnavailable(f"ClickHouse at {where} has no {table} table yet; "
                                "`tracetune up` creates it.", empty=True, table=table)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return StoreUnavailable(f"ClickHouse at {where} could not answer: {first_line}")


def target_key(settings: Settings) -> tuple:
    """The ClickHouse target as a hashable cache key."""
    return tuple(sorted(settings.clickhouse_target().items()))


def query(settings: Settings, fn: Callable[..., T], **kwargs: Any) -> T:
    """Run one analyzer function on the cached client; connection trouble becomes StoreUnavailable."""
    try:
        return fn(_cached_client(target_key(settings), settings), **kwargs)
    except DatabaseError as exc:
        raise _unavailable(settings, exc) from None


def show_unavailable(problem: StoreUnavailable, window: str) -> None:
    """An info when nothing was written yet (no spans, or a table of tracetune's not created), else an error."""
    if problem.empty and problem.table == SPAN_TABLE:
        st.info(f"No spans in the last {window} yet. {problem}")
    elif problem.empty:
        st.info(str(problem))
    else:
        st.error(str(problem))


# ---- a short-lived cache in front of the store --------------------------------------------------------

CACHE_SECONDS = 10
"""How long an answer is reused: every browser session, and every page refresh within it, shares it."""


def _cache_key(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[str, tuple]:
    return f"{fn.__module__}.{fn.__qualname__}", tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False, max_entries=2000)
def _cached_call(target: tuple, name: str, key: tuple, _settings: Settings, _fn: Callable[..., T],
                 _kwargs: dict[str, Any]) -> T:
    return query(_settings, _fn, **_kwargs)


def cached(settings: Settings, fn: Callable[..., T], **kwargs: Any) -> T:
    """`query`, answered from a cache kept CACHE_SECONDS per ClickHouse target, function and arguments.

    Pages refresh on an interval and several people may watch one pipeline: this keeps the store's
    work per refresh to one query per question, whoever asks. Failures are not cached."""
    name, key = _cache_key(fn, kwargs)
    return _cached_call(target_key(settings), name, key, settings, fn, kwargs)


PREFETCH_THREADS = 6
"""Questions of one page asked of the store at once (the client's connection pool holds more)."""


def prefetch(settings: Settings, calls: Iterable[tuple[Callable[..., Any], dict[str, Any]]]) -> None:
    """Ask every question a page is about to ask at once, into the cache `cached` reads: the page then waits
    for its slowest question instead of the sum of them (the store answers several at a time).

    Each call is (analyzer function, keyword arguments) exactly as the page will pass them to `cached`.
    A failure is left for the page's own call to meet and show (failures are not cached)."""
    calls = list(calls)
    if len(calls) < 2:
        return
    context = get_script_run_ctx()

    def ask(call: tuple[Callable[..., Any], dict[str, Any]]) -> None:
        if context is not None:  # the cache's bookkeeping looks for the script run it serves
            add_script_run_ctx(threading.current_thread(), context)
        fn, kwargs = call
        try:
            cached(settings, fn, **kwargs)
        except Exception:  # noqa: BLE001 - the page asks again, and says what went wrong
            pass

    with ThreadPoolExecutor(max_workers=min(PREFETCH_THREADS, len(calls))) as pool:
        list(pool.map(ask, calls))

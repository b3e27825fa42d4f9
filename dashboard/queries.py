"""How the dashboard reaches ClickHouse: analyzer functions on one cached client, trouble as one line.

The page never writes SQL; `query(settings, analyzer_function, **kwargs)` runs an analyzer function
and turns a connection or server failure into StoreUnavailable, whose message fits one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

import store
from tracetune.settings import Settings

__all__ = ["StoreUnavailable", "address", "query", "show_unavailable"]

T = TypeVar("T")

# ClickHouse error codes that mean "nothing was ever written here", not "something is broken".
_NOT_CREATED_YET = {60, 81}  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_CODE = re.compile(r"Code:\s*(\d+)")


class StoreUnavailable(Exception):
    """ClickHouse could not answer; the message is one line for the page."""

    def __init__(self, message: str, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty  # True: the store is up but holds no span table yet


def address(settings: Settings) -> str:
    """host:port/database of the ClickHouse this page reads, as shown to the user."""
    target = settings.clickhouse_target()
    return f"{target['host']}:{target['port']}/{target['database']}"


@st.cache_resource(show_spinner=False)
def _cached_client(target: tuple, _settings: Settings):
    """One clickhouse-connect client per ClickHouse target, shared by every browser session."""
    return store.connect(_settings, ensure_schema=False)


def _unavailable(settings: Settings, exc: Exception) -> StoreUnavailable:
    where = address(settings)
    if isinstance(exc, OperationalError):
        return StoreUnavailable(f"Cannot reach ClickHouse at {where}: is `tracetune up` running?")
    code = _CODE.search(str(exc))
    if code and int(code.group(1)) in _NOT_CREATED_YET:
        return StoreUnavailable(f"ClickHouse at {where} has no otel_traces table yet; "
                                "`tracetune up` creates it.", empty=True)
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
    if problem.empty:
        st.info(f"No spans in the last {window} yet. {problem}")
    else:
        st.error(str(problem))

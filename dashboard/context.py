"""What every page is about: the settings, and the filters (pipeline, time range, tenant, refresh) of the URL.

The filters live in the query string (`?pipeline=doc_qa&since=6h&tenant=acme&refresh=30s`), so a
link shows someone else the same view. `app.py` reads them into the sidebar once per run, writes
them back, and hands the result to the page as a `Context`; pages never read the URL themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import streamlit as st

from tracetune.analyzer import parse_window
from tracetune.base.settings import Settings

__all__ = ["ALL", "DEFAULT_REFRESH", "DEFAULT_WINDOW", "REFRESH", "WINDOWS", "Context", "Filters", "current",
           "filters_from", "publish", "run", "sidebar"]

ALL = "all"
WINDOWS = ("15m", "1h", "6h", "24h", "7d")
DEFAULT_WINDOW = "1h"
REFRESH = ("off", "10s", "30s", "1m", "5m")
DEFAULT_REFRESH = "30s"
_KEY = "tracetune.context"


@dataclass(frozen=True)
class Filters:
    """The view: one pipeline or all, a trailing time range, one tenant or all, how often pages refresh."""

    pipeline: str = ALL
    since: str = DEFAULT_WINDOW
    tenant: str = ALL
    refresh: str = DEFAULT_REFRESH

    @property
    def pipeline_name(self) -> str:
        """The analyzer's pipeline filter: "" for all."""
        return "" if self.pipeline == ALL else self.pipeline

    @property
    def tenant_name(self) -> str:
        return "" if self.tenant == ALL else self.tenant

    @property
    def seconds(self) -> int:
        return parse_window(self.since)

    @property
    def refresh_seconds(self) -> int | None:
        return None if self.refresh == "off" else parse_window(self.refresh)

    def params(self) -> dict[str, str]:
        """The query string of this view."""
        return {"pipeline": self.pipeline, "since": self.since, "tenant": self.tenant, "refresh": self.refresh}

    def scope(self) -> str:
        """The view in words, for captions and empty states: " for pipeline doc_qa, tenant acme"."""
        parts = [f"pipeline {self.pipeline}" if self.pipeline != ALL else "",
                 f"tenant {self.tenant}" if self.tenant != ALL else ""]
        said = ", ".join(p for p in parts if p)
        return f" for {said}" if said else ""


@dataclass(frozen=True)
class Context:
    """What a page renders from: where the store is (and the tuner), and the view."""

    settings: Settings
    filters: Filters


def filters_from(params: Mapping[str, str]) -> Filters:
    """Filters from a query string; a value that is not one of the choices falls back to the default."""
    since = params.get("since", DEFAULT_WINDOW)
    refresh = params.get("refresh", DEFAULT_REFRESH)
    return Filters(pipeline=params.get("pipeline") or ALL, since=since if since in WINDOWS else DEFAULT_WINDOW,
                   tenant=params.get("tenant") or ALL, refresh=refresh if refresh in REFRESH else DEFAULT_REFRESH)


def _choices(known: Sequence[str], chosen: str) -> list[str]:
    """ALL, the known names, and the chosen one even if the window has no data of it (a shared link)."""
    names = sorted(set(known) | ({chosen} - {ALL}))
    return [ALL, *names]


def sidebar(known: Callable[[str], tuple[Sequence[str], Sequence[str]]]) -> Filters:
    """The filter widgets, starting from the query string on a session's first run; the chosen filters.

    `known(since)` gives the pipelines and tenants with data in a time range, for the choices."""
    start = filters_from(st.query_params.to_dict())
    for name, value in start.params().items():
        st.session_state.setdefault(f"filter_{name}", value)
    since = st.sidebar.selectbox("Time range", WINDOWS, key="filter_since",
                                 help="Trailing window every figure covers; cost compares it with the one before.")
    pipelines, tenants = known(since)
    pipeline = st.sidebar.selectbox("Pipeline", _choices(pipelines, st.session_state["filter_pipeline"]),
                                    key="filter_pipeline")
    tenant = st.sidebar.selectbox("Tenant", _choices(tenants, st.session_state["filter_tenant"]), key="filter_tenant",
                                  help="`tracetune.tenant` of the tasks; latency, cost and SLO figures follow it.")
    refresh = st.sidebar.selectbox("Refresh every", REFRESH, key="filter_refresh")
    return Filters(pipeline=pipeline, since=since, tenant=tenant, refresh=refresh)


def publish(context: Context) -> None:
    """Write the view to the URL (so the link can be shared) and hand it to the page about to run."""
    st.query_params.from_dict(context.filters.params())
    st.session_state[_KEY] = context


def current() -> Context:
    """The context `app.py` published for this run."""
    return st.session_state[_KEY]


def run(render: Callable[[Context], None]) -> None:
    """Render a page in a fragment that re-runs on the chosen refresh interval (the sidebar stays put)."""
    context = current()
    st.fragment(render, run_every=context.filters.refresh_seconds)(context)

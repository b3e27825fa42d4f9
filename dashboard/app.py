"""The tracetune dashboard, for product owners: latency, cost, critical path, drift and SLOs per pipeline.

Run with `tracetune dashboard` (or `streamlit run dashboard/app.py`). Every number comes from
`analyzer` query functions; this page holds no SQL, only layout and a little arithmetic. The tabs
live in `dashboard/tabs.py`, the shaping of frames in `dashboard/frames.py`.
"""

from __future__ import annotations

import streamlit as st

from tracetune import settings as settings_mod
from tracetune.analyzer import step_stats
from tracetune.dashboard.queries import StoreUnavailable, address, query, show_unavailable
from tracetune.dashboard.tabs import ALL_PIPELINES, TABS
from tracetune.settings import SettingsError

WINDOWS = ["5m", "15m", "1h", "6h", "24h"]
DEFAULT_WINDOW = "15m"
REFRESH_SECONDS = 5


def main() -> None:
    st.set_page_config(page_title="tracetune", layout="wide")
    st.title("tracetune")
    try:
        settings = settings_mod.load()
    except SettingsError as exc:
        st.error(str(exc))
        return

    window = st.sidebar.selectbox("Window", WINDOWS, index=WINDOWS.index(DEFAULT_WINDOW),
                                  help="Trailing time range every figure covers (drift has its own windows).")
    try:
        pipelines = sorted(set(query(settings, step_stats, since=window)["pipeline"].to_list()))
    except StoreUnavailable as problem:
        show_unavailable(problem, window)
        return
    pipeline = st.sidebar.selectbox("Pipeline", [ALL_PIPELINES, *pipelines])
    refresh = st.sidebar.toggle(f"Refresh every {REFRESH_SECONDS} s", value=False)
    st.caption(f"Last {window} · {'all pipelines' if pipeline == ALL_PIPELINES else pipeline} · "
               f"ClickHouse {address(settings)}")

    # One fragment per tab: auto-refresh re-runs the tabs' contents, never the tab bar (the open tab stays).
    for tab, render in zip(st.tabs(list(TABS)), TABS.values(), strict=True):
        with tab:
            st.fragment(render, run_every=REFRESH_SECONDS if refresh else None)(settings, window, pipeline)


if __name__ == "__main__":
    main()

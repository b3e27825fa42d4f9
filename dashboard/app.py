"""The tracetune dashboard, for product owners: Overview, Steps, Cost, Drift, Tuner, Alerts and Dead letters pages.

Run with `tracetune dashboard` (or `streamlit run dashboard/app.py`). The filters (pipeline, time range,
tenant, refresh) sit in the sidebar and in the URL's query string (`dashboard/context.py`); each page
is a module of its own (`dashboard/overview.py` ... `dashboard/alerts.py`, listed in PAGES) that calls
analyzer and tuner read functions through `dashboard/queries.py` (the read-only store user, answers
cached a few seconds). No SQL here. (Not a `pages/` folder: Streamlit would run one as old-style pages,
bypassing this script.)
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from tracetune import analyzer
from tracetune.base import settings as settings_mod
from tracetune.base.settings import Settings, SettingsError
from tracetune.dashboard import context
from tracetune.dashboard.queries import StoreUnavailable, address, cached, prefetch

HERE = Path(__file__).parent
# (page module beside this file, title, URL path, icon)
PAGES = (
    ("overview.py", "Overview", "overview", ":material/dashboard:"),
    ("steps.py", "Steps", "steps", ":material/timeline:"),
    ("cost.py", "Cost", "cost", ":material/payments:"),
    ("drift.py", "Drift", "drift", ":material/query_stats:"),
    ("tuner.py", "Tuner", "tuner", ":material/tune:"),
    ("alerts.py", "Alerts", "alerts", ":material/notifications:"),
    ("dead_letters.py", "Dead letters", "dead_letters", ":material/mail_lock:"),
)

# `?page=` of the links alerts carry (analyzer/alerts.py) -> the page's URL path
LINKED = {"slo": "overview", **{path: path for _, _, path, _ in PAGES}}


def _known(settings: Settings):
    def known(since: str) -> tuple[list[str], list[str]]:
        """Pipelines and tenants with tasks or steps in the range; none if the store cannot say (the page will)."""
        prefetch(settings, [(analyzer.pipelines, {"since": since}), (analyzer.tenants, {"since": since})])
        try:
            return (cached(settings, analyzer.pipelines, since=since),
                    cached(settings, analyzer.tenants, since=since))
        except StoreUnavailable:
            return [], []
    return known


def main() -> None:
    st.set_page_config(page_title="tracetune", layout="wide")
    try:
        settings = settings_mod.load()
    except SettingsError as exc:
        st.error(str(exc))
        return
    pages = [st.Page(str(HERE / file), title=title, url_path=path, icon=icon, default=path == "overview")
             for file, title, path, icon in PAGES]
    page = st.navigation(pages)
    asked = LINKED.get(st.query_params.get("page", ""))
    if asked is not None and (page.url_path or "overview") != asked:  # an alert's link: `/?page=drift&pipeline=x`
        kept = {k: v for k, v in st.query_params.to_dict().items() if k != "page"}
        st.switch_page(next(p for p in pages if (p.url_path or "overview") == asked), query_params=kept)
    filters = context.sidebar(_known(settings))
    st.sidebar.caption(f"ClickHouse {address(settings)} · read-only")
    context.publish(context.Context(settings, filters))
    st.title(page.title)
    st.caption(f"Last {filters.since}{filters.scope() or ' · all pipelines'}")
    page.run()


if __name__ == "__main__":
    main()

"""Layout helpers the pages share: tables that show every row and fit the page, coloured states, charts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from tracetune.dashboard import frames
from tracetune.dashboard.context import Filters

__all__ = ["COUNT", "MONEY", "MS", "PCT", "bucket_seconds", "chart", "coloured", "table", "text_table", "text_widths",
           "window"]

MS = st.column_config.NumberColumn(format="%.1f")
PCT = st.column_config.NumberColumn(format="%.1f %%")
COUNT = st.column_config.NumberColumn(format="%d")
MONEY = st.column_config.NumberColumn(format="%.4g")

# Chart buckets per time range: a few dozen points per line, and whole rows of the rollup the range reads
# (hourly from 6 h: a 15-minute bucket there would be an hour anyway, and consecutive hours would read as gaps).
BUCKETS = {"15m": 60, "1h": 120, "6h": 3600, "24h": 3600, "7d": 6 * 3600}


def bucket_seconds(filters: Filters) -> int:
    return BUCKETS.get(filters.since, 60)


def window(filters: Filters, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The filters' time range as (start, end) in UTC, the start floored to a bucket like the rollup's."""
    end = now or datetime.now(UTC)
    start = end - timedelta(seconds=filters.seconds)
    step = bucket_seconds(filters)
    return datetime.fromtimestamp(start.timestamp() // step * step, UTC), end


def coloured(table: pl.DataFrame, column: str, colours: dict[str, tuple[str, str]] | None = None):
    """The table as a pandas Styler with `column`'s cells coloured by value."""
    colours = colours or frames.STATUS_COLOURS

    def colour(value: str) -> str:
        background, text = colours.get(value, ("", ""))
        return f"background-color: {background}; color: {text}" if background else ""

    return table.to_pandas().style.map(colour, subset=[column])


# Pixels a character takes in the grid's font, at most (tests/dashboard/test_browser.py measures the real font
# against this): capitals and the wide lower-case letters, and the rest; and a cell's padding. A text column
# is made as wide as its longest value or header, since the grid sizes columns from a sample of rows and
# cuts the rest.
WIDE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZmw%@—→")
WIDE_PX, CHAR_PX, CELL_PADDING_PX = 9.5, 7.4, 20


def text_width(texts: list[str]) -> int:
    """Pixels a grid column needs to show the longest of `texts` whole."""
    return int(max((sum(WIDE_PX if c in WIDE_CHARS else CHAR_PX for c in t) for t in texts), default=0)
               + CELL_PADDING_PX)


def text_widths(frame: pl.DataFrame, given: dict | None = None) -> dict:
    """Column configs for the text columns: each as wide as its longest value or label, keeping whatever else
    `given` configures for it (a width given there wins)."""
    widths = {}
    for name, dtype in frame.schema.items():
        config = dict((given or {}).get(name) or {})
        if dtype != pl.Utf8 or config.get("width"):
            continue
        texts = [config.get("label") or name, *(v for v in frame[name].drop_nulls().to_list())]
        widths[name] = {**(config or st.column_config.TextColumn()), "width": text_width(texts)}
    return widths


def table(data: pl.DataFrame | pd.io.formats.style.Styler, column_config: dict | None = None) -> None:
    """Every row shown (height set: no box scrolling 10 of 15 rows), as wide as the page, no index; text
    columns as wide as their longest value; a missing value shows as frames.MISSING, never "None"."""
    frame = data if isinstance(data, pl.DataFrame) else pl.from_pandas(data.data)  # a Styler's frame
    config = {**(column_config or {}), **text_widths(frame, column_config)}
    st.dataframe(data, hide_index=True, width="stretch", height="content", column_config=config,
                 placeholder=frames.MISSING)


def text_table(frame: pl.DataFrame) -> None:
    """A table of sentences (reasons, effects, descriptions): a static table whose cells wrap, so nothing is
    cut; a missing value shows as frames.MISSING."""
    st.table(frame.with_columns(pl.col(name).fill_null(frames.MISSING)
                                for name, dtype in frame.schema.items() if dtype == pl.Utf8), hide_index=True)


def chart(spec: alt.TopLevelMixin) -> None:
    st.altair_chart(spec, width="stretch")

"""Layout helpers the pages share: tables that show every row and fit the page, coloured states, charts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import altair as alt
import pandas as pd
import polars as pl
import streamlit as st

from tracetune.dashboard import frames
from tracetune.dashboard.context import Filters

__all__ = ["COUNT", "MONEY", "MS", "PCT", "bucket_seconds", "chart", "coloured", "table", "window"]

MS = st.column_config.NumberColumn(format="%.1f")
PCT = st.column_config.NumberColumn(format="%.1f %%")
COUNT = st.column_config.NumberColumn(format="%d")
MONEY = st.column_config.NumberColumn(format="%.4g")

# Chart buckets per time range: a few dozen points per line (the rollup's grain at least).
BUCKETS = {"15m": 60, "1h": 120, "6h": 900, "24h": 3600, "7d": 6 * 3600}


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


def table(data: pl.DataFrame | pd.io.formats.style.Styler, column_config: dict | None = None) -> None:
    """Every row shown (height set: no box scrolling 10 of 15 rows), as wide as the page, no index."""
    st.dataframe(data, hide_index=True, width="stretch", height="content", column_config=column_config or {})


def chart(spec: alt.TopLevelMixin) -> None:
    st.altair_chart(spec, width="stretch")

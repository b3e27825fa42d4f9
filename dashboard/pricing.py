"""Which price table the dashboard prices with: the published one, else the bundled prices.toml (said so)."""

from __future__ import annotations

from tracetune import analyzer
from tracetune.analyzer import PriceTable
from tracetune.base.settings import Settings
from tracetune.dashboard.queries import cached

__all__ = ["table"]


def table(settings: Settings) -> tuple[PriceTable, str]:
    """The published price table and "", or, if none is, the bundled prices.toml and a note saying so.

    The dashboard reads as the store's read-only user, so it never publishes prices itself: the analyzer
    (`tracetune up` starts it) does. PricesError (one line) when prices.toml cannot be read.
    """
    published = cached(settings, analyzer.current_prices)
    if published is not None:
        return published, ""
    return analyzer.load_prices(), "; prices.toml: not published yet, `tracetune analyzer` publishes it"

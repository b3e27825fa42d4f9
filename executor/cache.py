"""Exact-match LRU cache with a TTL and a size bound, keyed on normalised input (the class: tracetune.base.caching)."""

from __future__ import annotations

from typing import Any

from tracetune.base.caching import TTLCache

__all__ = ["TTLCache", "normalise"]


def normalise(item: Any) -> str:
    """The default cache key: the item as text, lower-cased with runs of white space folded."""
    return " ".join(str(item).lower().split())

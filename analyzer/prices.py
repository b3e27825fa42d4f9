"""The versioned price table: `prices.toml` loaded, validated, hashed and published to ClickHouse.

Every cost figure names the price version it used, so a version must mean one set of numbers:
publishing different prices under a version that is already published is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PRICES_PATH", "ModelPrice", "PriceTable", "PricesError", "current", "load", "parse", "publish"]

# The bundled price table ships inside the package (a wheel has no repository root to look in).
DEFAULT_PRICES_PATH = Path(str(resources.files("tracetune.analyzer").joinpath("prices.toml")))

# section -> the one number each entry of it carries (besides models, which carry two)
_SECTIONS = {"models": ("input_per_1m", "output_per_1m"), "routes": ("core_second",), "calls": ("per_call",)}
_TOP_KEYS = ("version", "currency", *_SECTIONS)

_PUBLISHED_HASHES_SQL = "SELECT DISTINCT hash FROM tracetune_prices WHERE version = {version:String}"
_CURRENT_SQL = "SELECT body FROM tracetune_prices ORDER BY loaded_at DESC, version DESC LIMIT 1"


class PricesError(ValueError):
    """A price table that cannot be used; the message is one line naming the bad key."""


@dataclass(frozen=True)
class ModelPrice:
    input_per_1m: float
    output_per_1m: float


@dataclass(frozen=True)
class PriceTable:
    """Prices in `currency`: tokens per 1M by model, compute per core-second by route, flat per call."""

    version: str
    currency: str = "USD"
    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    routes: Mapping[str, float] = field(default_factory=dict)  # price per core-second
    calls: Mapping[str, float] = field(default_factory=dict)  # price per call, by step or provider

    def body(self) -> dict[str, Any]:
        """The table in the shape of prices.toml, keys sorted: what is hashed and stored."""
        return {
            "version": self.version,
            "currency": self.currency,
            "models": {name: {"input_per_1m": p.input_per_1m, "output_per_1m": p.output_per_1m}
                       for name, p in sorted(self.models.items())},
            "routes": {name: {"core_second": price} for name, price in sorted(self.routes.items())},
            "calls": {name: {"per_call": price} for name, price in sorted(self.calls.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON body: the same prices hash the same however the TOML is laid out."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise PricesError(f"{source}: `{key}` must be a number >= 0, got {value!r}")
    return float(value)


def _entries(doc: Mapping[str, Any], section: str, source: str) -> dict[str, tuple[float, ...]]:
    table = doc.get(section, {})
    if not isinstance(table, Mapping):
        raise PricesError(f"{source}: `{section}` must be a table like [{section}.NAME], got {table!r}")
    fields = _SECTIONS[section]
    entries: dict[str, tuple[float, ...]] = {}
    for name, entry in table.items():
        where = f'{section}."{name}"' if not name.replace("_", "").replace("-", "").isalnum() else f"{section}.{name}"
        if not name:
            raise PricesError(f"{source}: `{section}` has an entry with an empty name")
        if not isinstance(entry, Mapping):
            raise PricesError(f"{source}: `{where}` must be a table with {' and '.join(fields)}, got {entry!r}")
        unknown = sorted(set(entry) - set(fields))
        if unknown:
            raise PricesError(f"{source}: unknown key `{where}.{unknown[0]}`; an entry of [{section}] takes "
                              f"{' and '.join(fields)}")
        missing = [f for f in fields if f not in entry]
        if missing:
            raise PricesError(f"{source}: `{where}.{missing[0]}` is missing")
        entries[name] = tuple(_number(entry[f], f"{where}.{f}", source) for f in fields)
    return entries


def parse(doc: Mapping[str, Any], source: str = "prices.toml") -> PriceTable:
    """Validate a decoded price document (the TOML or a stored JSON body) into a PriceTable."""
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise PricesError(f"{source}: unknown key `{unknown[0]}`; expected {', '.join(_TOP_KEYS)}")
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PricesError(f'{source}: `version` must be a quoted, non-empty string such as "2026-11-01", '
                          f"got {version!r}")
    currency = doc.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha() or not currency.isupper():
        raise PricesError(f'{source}: `currency` must be a three-letter ISO 4217 code such as "USD", got {currency!r}')
    models, routes, calls = (_entries(doc, section, source) for section in _SECTIONS)
    return PriceTable(
        version=version.strip(), currency=currency,
        models={name: ModelPrice(*prices) for name, prices in models.items()},
        routes={name: prices[0] for name, prices in routes.items()},
        calls={name: prices[0] for name, prices in calls.items()},
    )


def load(path: str | Path = DEFAULT_PRICES_PATH) -> PriceTable:
    """Read and validate a prices.toml; PricesError (one line) if it is missing or wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PricesError(f"{path}: cannot read the price table ({exc.strerror or exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PricesError(f"{path.name}: not valid TOML ({exc})") from None
    return parse(doc, path.name)


def publish(client, table: PriceTable) -> bool:
    """Append the table to `tracetune_prices`; False if this version+hash is already there (idempotent).

    Raises PricesError if the version was published with different prices: bump `version` instead.
    """
    digest = table.hash
    published = {row[0] for row in client.query(_PUBLISHED_HASHES_SQL, parameters={"version": table.version})
                 .result_rows}
    if digest in published:
        return False
    if published:
        raise PricesError(f"price version {table.version!r} is already published with different prices; "
                          "bump `version` in prices.toml")
    client.insert("tracetune_prices", [[table.version, digest, table.to_json()]],
                  column_names=["version", "hash", "body"])
    return True


def current(client) -> PriceTable | None:
    """The most recently published price table, or None if none was published yet."""
    rows = client.query(_CURRENT_SQL).result_rows
    if not rows:
        return None
    return parse(json.loads(rows[0][0]), "tracetune_prices")

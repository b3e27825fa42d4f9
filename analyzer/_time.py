"""Time conversions the analyzer's SQL parameters need (ClickHouse returns naive UTC datetimes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utc(moment: datetime) -> datetime:
    """Naive datetimes are UTC; aware ones are converted to UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def epoch_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch (microsecond precision, as datetimes hold)."""
    return (utc(moment) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000

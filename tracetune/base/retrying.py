"""What an HTTP answer means for a retry, shared by every client that retries (side effects, alert delivery)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from datetime import UTC

__all__ = ["is_retryable_status", "parse_retry_after"]

# 408 Request Timeout and 429 Too Many Requests are the only 4xx worth repeating unchanged.
_RETRYABLE_4XX = frozenset({408, 429})


def is_retryable_status(status: int) -> bool:
    """429, 408 (timeouts) and 5xx may succeed later; any other 4xx (or a 3xx not followed) needs a different
    request."""
    return status in _RETRYABLE_4XX or 500 <= status <= 599


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms` (OpenAI), else `Retry-After` (seconds or an HTTP
    date); None without either."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = (headers.get("retry-after") or "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))

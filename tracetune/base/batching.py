"""The micro-batcher's rules as pure functions: when a batch is due and which queued items it takes.

The executor's `Batcher` (threads, the wall clock) and the tuner's simulation (virtual time) both
call these, so the batches a simulated step forms are the ones the executor would form.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BUCKET_WIDTH", "length_bucket", "padding_ratio", "seconds_until_due", "take_batch"]

BUCKET_WIDTH = 16
"""Tokens per length bucket: with bucketing, a batch holds items of one bucket only."""


def length_bucket(length: int, width: int = BUCKET_WIDTH) -> int:
    return (max(length, 1) - 1) // width


def seconds_until_due(queued: int, max_size: int, head_enqueued: float, max_wait_ms: float, now: float) -> float:
    """Seconds until the next batch leaves (<= 0: now): when `max_size` items wait, or the oldest waited enough."""
    if queued >= max_size:
        return 0.0
    return head_enqueued + max_wait_ms / 1000 - now


def take_batch(lengths: Sequence[int], max_size: int, bucketing: bool) -> list[int]:
    """Queue positions (oldest first) of the next batch: the oldest `max_size`, or with `bucketing` the oldest
    item and the next-oldest of its length bucket only.

    Topping a batch up from neighbouring buckets pads every request to the longest one; on a
    compute-bound CPU encoder that cost 2-3x throughput (bench/executor.py, section 3)."""
    if not bucketing:
        return list(range(min(max_size, len(lengths))))
    head = length_bucket(lengths[0])
    return [i for i, n in enumerate(lengths) if length_bucket(n) == head][:max_size]


def padding_ratio(lengths: Sequence[int]) -> float:
    """Share of a batch's padded length (every item padded to the longest) that is padding."""
    padded = max(lengths) * len(lengths) if lengths else 0
    return (padded - sum(lengths)) / padded if padded else 0.0

"""What every tuning policy returns, and the one bound helper they share (`tuner/batching.py` for batch
size and wait, `tuner/policies.py` for caching, routing, cascade and concurrency)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tracetune.tuner.config import Knob, KnobValue

__all__ = ["Proposal", "int_bounds"]


@dataclass(frozen=True)
class Proposal:
    """New values for some knobs of one step, why, and what the model predicts they will do."""

    step: str
    values: dict[str, KnobValue]  # knob name -> new value (only knobs that change)
    reason: str  # one sentence with the numbers
    predicted: dict[str, float]  # e.g. {"p95_ms": 410.0, "cost_per_1k": 0.21, "quality": 0.91}


def int_bounds(knob: Knob) -> tuple[int, int]:
    """An integer knob's declared bounds, at least 1 (sizes, entries, concurrency), unbounded above as 2**30."""
    low = max(1, math.ceil(knob.low)) if knob.low is not None else 1
    high = math.floor(knob.high) if knob.high is not None else 1 << 30
    return low, max(low, high)

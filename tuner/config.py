"""The executor config the tuner serves: the client-side model executors import.

Plain data with a JSON form; `etag` changes exactly when the version does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepConfig:
    """One step's knobs as the tuner serves them: batching and caching (defaults when a step has none)."""

    batch_max_size: int = 8
    batch_max_wait_ms: float = 5.0
    cache_enabled: bool = True
    length_bucketing: bool = True

    def validate(self, step: str) -> None:
        if self.batch_max_size < 1:
            raise ValueError(f"steps.{step}.batch_max_size must be at least 1, got {self.batch_max_size}")
        if self.batch_max_wait_ms < 0:
            raise ValueError(f"steps.{step}.batch_max_wait_ms must be 0 or more, got {self.batch_max_wait_ms}")


@dataclass(frozen=True)
class PipelineConfig:
    """A versioned config for one pipeline: per-step knobs, route weights per step, named thresholds.

    What executors poll (`GET /v1/pipelines/{p}/config`); `version` grows with every change and
    `etag` follows it, so a poll with `If-None-Match` costs nothing when nothing changed.
    """

    pipeline: str
    version: int = 1
    steps: dict[str, StepConfig] = field(default_factory=dict)
    route_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def etag(self) -> str:
        return f'"{self.pipeline}-v{self.version}"'

    def step(self, name: str) -> StepConfig:
        return self.steps.get(name, StepConfig())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        steps = {name: StepConfig(**value) for name, value in (data.get("steps") or {}).items()}
        config = cls(
            pipeline=data["pipeline"], version=int(data.get("version", 1)), steps=steps,
            route_weights={k: {r: float(w) for r, w in v.items()}
                           for k, v in (data.get("route_weights") or {}).items()},
            thresholds={k: float(v) for k, v in (data.get("thresholds") or {}).items()},
        )
        config.validate()
        return config

    def validate(self) -> None:
        for name, step in self.steps.items():
            step.validate(name)
        for step, weights in self.route_weights.items():
            if any(w < 0 for w in weights.values()) or (weights and sum(weights.values()) <= 0):
                raise ValueError(f"route_weights.{step} must be non-negative with a positive sum")


def default_config(pipeline: str) -> PipelineConfig:
    """The static starting point for a pipeline until the tuner has decided otherwise."""
    return PipelineConfig(
        pipeline=pipeline,
        version=1,
        steps={"classify": StepConfig(batch_max_size=8, batch_max_wait_ms=5.0, cache_enabled=True)},
        route_weights={"classify": {"fp32": 0.8, "int8": 0.2}},
        thresholds={"escalate_below_confidence": 0.45},
    )

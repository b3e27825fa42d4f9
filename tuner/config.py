"""The executor config the tuner serves, and the pipeline declaration it is checked against.

This is the client-side model executors import. Both are generic over steps and knobs:

- a `PipelineSpec` is what a pipeline declares (each step's knobs with kind, default and bounds,
  and the SLO it starts with); executors register it with the tuner at start;
- a `PipelineConfig` is a versioned set of knob values by step and knob name, what executors poll.

Plain data with a JSON form; a config's `etag` changes exactly when its version does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

KnobKind = Literal["bool", "int", "float", "weights"]
KnobValue = bool | int | float | dict[str, float]
KINDS: tuple[str, ...] = ("bool", "int", "float", "weights")
APPROVAL_MODES: tuple[str, ...] = ("auto", "approve", "observe")


class ConfigError(ValueError):
    """A config or declaration that cannot be applied; the message names the field, e.g. steps.classify.x."""


@dataclass(frozen=True)
class Knob:
    """One tunable value a step declares: its kind, default and inclusive bounds.

    `weights` knobs map route names to non-negative weights with a positive sum; their routes are
    fixed by the declaration (a config may reweigh them, not invent new ones).
    """

    kind: KnobKind
    default: KnobValue
    low: float | None = None
    high: float | None = None
    unit: str = ""
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"knob kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("low", "high"):
            bound = getattr(self, name)
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)
                                      or not math.isfinite(bound)):
                raise ConfigError(f"knob bound {name} must be a finite number, got {bound!r}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ConfigError(f"knob bounds are reversed: low {self.low:g} > high {self.high:g}")
        object.__setattr__(self, "default", self.check("default", self.default))  # e.g. an int default of a float

    def check(self, where: str, value: Any) -> KnobValue:
        """`value` as this knob's kind, or ConfigError naming `where` (e.g. steps.classify.batch_max_size)."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind == "weights":
            return self._check_weights(where, value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if self.kind == "int":
            if value != int(value):
                raise ConfigError(f"{where} must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            unit = f" {self.unit}" if self.unit else ""
            bounds = (f"between {self.low:g} and {self.high:g}" if self.low is not None and self.high is not None
                      else f"at least {self.low:g}" if self.low is not None else f"at most {self.high:g}")
            raise ConfigError(f"{where} must be {bounds}{unit}, got {value:g}")
        return value

    def _check_weights(self, where: str, value: Any) -> dict[str, float]:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must map routes to weights, got {value!r}")
        routes = set(self.default) if isinstance(self.default, dict) else set()
        unknown = sorted(set(value) - routes)
        if routes and unknown:
            raise ConfigError(f"{where} names routes {unknown} the step does not have; its routes: {sorted(routes)}")
        weights: dict[str, float] = {}
        for route, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
                    or weight < 0:
                raise ConfigError(f"{where}.{route} must be a non-negative number, got {weight!r}")
            weights[str(route)] = float(weight)
        if sum(weights.values()) <= 0:
            raise ConfigError(f"{where} must give at least one route a positive weight, got {value!r}")
        return {route: weights.get(route, 0.0) for route in (self.default if routes else weights)}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "default": self.default}
        for name in ("low", "high"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        for name in ("unit", "help"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, where: str, data: Any) -> Knob:
        if not isinstance(data, dict) or "kind" not in data or "default" not in data:
            raise ConfigError(f"{where} must be an object with kind and default, got {data!r}")
        extra = sorted(set(data) - {"kind", "default", "low", "high", "unit", "help"})
        if extra:
            raise ConfigError(f"{where} has unknown fields {extra}")
        try:
            return cls(**data)
        except (TypeError, ConfigError) as exc:
            message = str(exc)
            raise ConfigError(f"{where}.{message}" if message.startswith("default ") else f"{where}: {message}") \
                from None


def is_number(value: Any) -> bool:
    """A numeric knob value (not a switch: bools are ints to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def same_way(base: Any, tried: Any, proposed: Any) -> bool:
    """Whether `proposed` moves a knob from `base` the way a rejected trial (`tried`) did: a number in the same
    direction, any other value (a switch, route weights) to the same value."""
    if all(is_number(v) for v in (base, tried, proposed)):
        return (tried - base) * (proposed - base) > 0
    return proposed == tried


@dataclass(frozen=True)
class PipelineConfig:
    """A versioned config for one pipeline: knob values by step and knob name.

    What executors poll (`GET /v1/pipelines/{p}/config`); `version` grows with every change and
    `etag` follows it, so a poll with `If-None-Match` costs nothing when nothing changed.
    """

    pipeline: str
    version: int = 1
    steps: dict[str, dict[str, KnobValue]] = field(default_factory=dict)

    @property
    def etag(self) -> str:
        return f'"{self.pipeline}-v{self.version}"'

    def knob(self, step: str, name: str, default: Any = None) -> Any:
        """The value of `name` on `step`, or `default` when the config does not set it."""
        return self.steps.get(step, {}).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "version": self.version,
                "steps": {step: dict(knobs) for step, knobs in self.steps.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        if not isinstance(data, dict) or not isinstance(data.get("pipeline"), str):
            raise ConfigError(f"a config is an object with a pipeline name, got {str(data)[:200]}")
        steps = data.get("steps", {})
        if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()):
            raise ConfigError("steps must map step names to objects of knob values")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigError(f"version must be a whole number of 0 or more, got {version!r}")
        return cls(pipeline=data["pipeline"], version=version,
                   steps={str(step): dict(knobs) for step, knobs in steps.items()})


@dataclass(frozen=True)
class Approval:
    """Who decides a change the tuning loop proposes (`tuner.approval` enforces it).

    `auto` applies it (a canary first when canaries are on) unless it is of a class marked here: a move of
    a knob in `knobs` ("route_weights" on any step, or "escalate.cascade_threshold" on one), or a move larger
    than `max_change` (a share of the knob's current value; for route weights, the share of traffic moved).
    `approve`: every proposal waits for an operator. `observe`: proposals are recorded with their
    predictions and never applied. A marked change waits as every proposal waits in `approve`.
    """

    mode: str = "auto"
    knobs: tuple[str, ...] = ()
    max_change: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in APPROVAL_MODES:
            raise ConfigError(f"approval.mode must be one of {', '.join(APPROVAL_MODES)}, got {self.mode!r}")
        if isinstance(self.knobs, str) or not all(isinstance(k, str) and k.strip() for k in self.knobs):
            raise ConfigError(f"approval.knobs must be a list of knob names (\"route_weights\" or "
                              f"\"step.knob\"), got {self.knobs!r}")
        object.__setattr__(self, "knobs", tuple(k.strip() for k in self.knobs))
        change = self.max_change
        if change is not None and (isinstance(change, bool) or not isinstance(change, int | float)
                                   or not math.isfinite(change) or change <= 0):
            raise ConfigError(f"approval.max_change must be a positive share such as 0.3, got {change!r}")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mode": self.mode, "knobs": list(self.knobs)}
        if self.max_change is not None:
            data["max_change"] = self.max_change
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Approval:
        if isinstance(data, str):
            data = {"mode": data}
        if not isinstance(data, dict):
            raise ConfigError(f"approval must be an object like {{\"mode\": \"approve\"}}, got {data!r}")
        extra = sorted(set(data) - {"mode", "knobs", "max_change"})
        if extra:
            raise ConfigError(f"approval has unknown fields {extra}; it takes mode, knobs and max_change")
        knobs = data.get("knobs") or ()
        if not isinstance(knobs, list | tuple):
            raise ConfigError(f"approval.knobs must be a list of knob names, got {knobs!r}")
        return cls(data.get("mode", "auto"), tuple(knobs), data.get("max_change"))

    def check(self, steps: dict[str, dict[str, Knob]]) -> Approval:
        """This policy, or ConfigError naming a marked knob no step declares."""
        for name in self.knobs:
            step, _, knob = name.rpartition(".")
            found = knob in steps.get(step, {}) if step else any(knob in knobs for knobs in steps.values())
            if not found:
                raise ConfigError(f"approval.knobs names {name!r}, which no step declares")
        return self


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline declares: each step's knobs (kind, default, bounds) and its starting SLO.

    Executors register it with the tuner (`PUT /v1/pipelines/{p}/spec`); the tuner derives the first
    config from its defaults and checks every later config against it.
    """

    pipeline: str
    steps: dict[str, dict[str, Knob]] = field(default_factory=dict)
    slo: dict[str, float] = field(default_factory=dict)
    cascades: dict[str, str] = field(default_factory=dict)  # cascade step -> the model step whose confidence it reads
    approval: Approval = field(default_factory=Approval)  # who decides the loop's proposals (declared default)

    def defaults(self, version: int = 1) -> PipelineConfig:
        return PipelineConfig(self.pipeline, version, {
            step: {name: knob.default for name, knob in knobs.items()} for step, knobs in self.steps.items() if knobs})

    def check(self, config: PipelineConfig) -> PipelineConfig:
        """`config` with every value checked and coerced; ConfigError for unknown steps or knobs."""
        steps: dict[str, dict[str, KnobValue]] = {}
        for step, values in config.steps.items():
            declared = self.steps.get(step)
            if declared is None:
                known = ", ".join(s for s, k in self.steps.items() if k) or "none"
                raise ConfigError(f"steps.{step}: {self.pipeline} has no step {step!r} with knobs; it has: {known}")
            for name, value in values.items():
                if name not in declared:
                    raise ConfigError(f"steps.{step}.{name}: step {step!r} has no knob {name!r}; "
                                      f"it has: {', '.join(declared)}")
                steps.setdefault(step, {})[name] = declared[name].check(f"steps.{step}.{name}", value)
        return replace(config, steps=steps)

    def merge(self, config: PipelineConfig, changes: dict[str, dict[str, Any]]) -> PipelineConfig:
        """`config` with `changes` (step -> knob -> value) applied and checked, at the next version."""
        steps = {step: dict(values) for step, values in config.steps.items()}
        for step, values in changes.items():
            if not isinstance(values, dict):
                raise ConfigError(f"steps.{step} must be an object of knob values, got {values!r}")
            steps.setdefault(step, {}).update(values)
        return self.check(PipelineConfig(self.pipeline, config.version + 1, steps))

    def reconcile(self, current: PipelineConfig | None) -> tuple[PipelineConfig, str] | None:
        """The config to store when this declaration meets `current` (None if `current` fits as it is).

        Knob values of `current` that the declaration still has (and still allows) are kept; new
        knobs get their defaults; knobs the pipeline no longer declares are dropped.
        """
        if current is None:
            return self.defaults(), "declared defaults"
        steps: dict[str, dict[str, KnobValue]] = {}
        notes: dict[str, list[str]] = {"defaults for new": [], "reset out of bounds": [], "adjusted": [],
                                       "dropped": []}
        for step, knobs in self.steps.items():
            for name, knob in knobs.items():
                where = f"{step}.{name}"
                stored = current.steps.get(step, {}).get(name, _ABSENT)
                if stored is _ABSENT:
                    value, note = knob.default, "defaults for new"
                else:
                    try:
                        value = knob.check(f"steps.{where}", stored)
                        changed = value != stored or type(value) is not type(stored)
                        note = "adjusted" if changed else ""
                    except ConfigError:
                        value, note = knob.default, "reset out of bounds"
                if note:
                    notes[note].append(where)
                steps.setdefault(step, {})[name] = value
        for step, values in current.steps.items():
            notes["dropped"] += [f"{step}.{name}" for name in values if name not in self.steps.get(step, {})]
        if not any(notes.values()):
            return None
        reason = "declaration changed: " + "; ".join(f"{what} {', '.join(names)}" for what, names in notes.items()
                                                     if names)
        return PipelineConfig(self.pipeline, current.version + 1, steps), reason

    def to_dict(self) -> dict[str, Any]:
        data = {"pipeline": self.pipeline, "slo": dict(self.slo),
                "steps": {step: {name: knob.to_dict() for name, knob in knobs.items()}
                          for step, knobs in self.steps.items()}}
        if self.cascades:
            data["cascades"] = dict(self.cascades)
        if self.approval != Approval():
            data["approval"] = self.approval.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> PipelineSpec:
        if not isinstance(data, dict) or not isinstance(data.get("pipeline"), str):
            raise ConfigError("a pipeline spec is an object with a pipeline name and steps")
        steps = data.get("steps", {})
        if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()):
            raise ConfigError("steps must map step names to objects of knob declarations")
        slo = data.get("slo") or {}
        if not isinstance(slo, dict):
            raise ConfigError("slo must be an object of objectives")
        cascades = data.get("cascades") or {}
        if not isinstance(cascades, dict) or not all(isinstance(v, str) and v in steps for v in cascades.values()):
            raise ConfigError("cascades must map cascade steps to the declared steps they follow")
        knobs = {str(step): {str(name): Knob.from_dict(f"steps.{step}.{name}", knob) for name, knob in declared.items()}
                 for step, declared in steps.items()}
        approval = Approval.from_dict(data.get("approval") or {}).check(knobs)
        return cls(data["pipeline"], knobs, dict(slo), dict(cascades), approval)


_ABSENT = object()

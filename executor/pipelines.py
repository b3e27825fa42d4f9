"""A pipeline is a named list of steps; a task is one root span with a child span per step.

The pipeline declares the knobs of its steps (`spec()`), which the executor registers with the
tuner, and applies each new config the tuner serves (`apply_config`) to its steps by name. A canary
(`apply_canary`) runs a share of tasks on another config: those tasks go through forks of the steps
whose knobs differ, and their spans carry the canary's version. A shadow trial (`apply_shadow`) runs the
model steps of a sample of tasks again under a candidate, after they answered (`executor.shadow`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from tracetune.base import routing
from tracetune.executor import conventions as attr
from tracetune.executor import metrics
from tracetune.executor.effects import Replayed
from tracetune.executor.shadow import ShadowTrial, Snapshot
from tracetune.executor.steps import NAME, Cascade, Effect, InputError, Step, StepError
from tracetune.tuner.config import Approval, ConfigError, PipelineConfig, PipelineSpec

log = logging.getLogger("tracetune.executor")

__all__ = ["Pipeline", "Task", "StepError", "InputError"]


def _error_kind(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, StepError) else "server"


@dataclass
class Task:
    """One request going through a pipeline: its input, and what each step made of it.

    `data` starts as a copy of `input`; steps read and add to it (an `Infer` step's value is under
    its name). `confidence` and `routes` hold, per model step, how sure it was and which route
    served it; `escalated` the local answers a cascade replaced.
    """

    input: dict[str, Any]
    task_id: str = ""
    tenant: str = ""
    trace_id: str = ""
    # What its route draws are taken from (`routing.draw`): its task id, or without one its root span's trace and
    # span ids (tasks run inside one caller's trace share its trace id, never their own span id).
    route_key: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    escalated: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {**self.input, **self.data}

    @property
    def text(self) -> str:
        return str(self.input.get("text", ""))


@dataclass(frozen=True)
class _Canary:
    config: PipelineConfig
    share: float
    steps: list[Step]


RETIRE_AFTER_SECONDS = 60.0  # a replaced canary's own queues close once the tasks it took have finished


def _in_share(task_id: str, share: float) -> bool:
    """Whether a task belongs to the first `share` of tasks: by a hash of its id (the same task, the same
    side, on every executor), or at random without one."""
    if not task_id:
        return random.random() < share
    return int.from_bytes(hashlib.blake2b(task_id.encode(), digest_size=8).digest()) < share * 2**64


def _json_is(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _plain(value: Any) -> Any:
    """JSON-friendly: numpy scalars and arrays become Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Pipeline:
    """Runs `steps` in order for each task, under one root span named after the pipeline.

    - `inputs`: the JSON fields a task must have, with their types (checked before any step runs);
    - `slo`: the objectives the pipeline starts with (p95_ms, p99_ms, error_rate, cost_per_1k,
      quality_floor) until its owner sets others through the tuner;
    - `approval`: who decides the tuner's proposals ({"mode": "auto" | "approve" | "observe", "knobs": [...],
      "max_change": 0.3}; docs/tuner.md, "Approval modes"), until its owner changes it through the tuner;
    - `result(task)`: what the task API answers (default: what the steps added to `task.data`);
    - `outcome(task)`: a short label for the root span (`tracetune.outcome`), optional.
    """

    def __init__(self, name: str, steps: Sequence[Step], *, inputs: Mapping[str, type] | None = None,
                 slo: Mapping[str, float] | None = None, approval: Mapping[str, Any] | str | None = None,
                 result: Callable[[Task], dict[str, Any]] | None = None,
                 outcome: Callable[[Task], str] | None = None, tracer: trace.Tracer | None = None):
        if not NAME.match(name):
            raise ValueError(f"pipeline name {name!r} must start with a letter and hold only letters, digits, _ and -")
        names = [step.name for step in steps]
        if not steps or len(set(names)) != len(names):
            raise ValueError(f"pipeline {name!r} needs at least one step and unique step names, got {names}")
        self.name = name
        self.steps = list(steps)
        self.inputs = dict(inputs if inputs is not None else {"text": str})
        self.slo = dict(slo or {})
        self._result = result
        self._outcome = outcome
        self.tracer = tracer or trace.get_tracer("tracetune.executor")
        cascades = {step.name: step.after for step in self.steps if isinstance(step, Cascade)}
        unknown = {c: a for c, a in cascades.items() if a not in names[:names.index(c)]}
        if unknown:
            raise ValueError(f"pipeline {name!r}: cascade steps must follow the step they read, got {unknown}")
        knobs = {step.name: step.knobs() for step in self.steps}
        self._spec = PipelineSpec(name, knobs, self.slo, cascades, Approval.from_dict(approval or {}).check(knobs))
        self._config = self._spec.defaults(version=0)
        self._lock = threading.Lock()
        self._bound = False
        self._canary: _Canary | None = None
        self._shadow: ShadowTrial | None = None

    # ---- configuration ------------------------------------------------------------------------
    def spec(self) -> PipelineSpec:
        """The knobs every step declares, with defaults and bounds, and the starting SLO."""
        return self._spec

    @property
    def config(self) -> PipelineConfig:
        """The config in force: version 0 until the tuner's first config arrives (the declared defaults)."""
        return self._config

    def apply_config(self, config: PipelineConfig) -> None:
        """Check `config` against the declaration and hand each step its knob values by name.

        Tasks already running finish under the values they started with; a config that does not fit
        the declaration raises ConfigError and changes nothing.
        """
        if config.pipeline != self.name:
            raise ConfigError(f"a config for pipeline {config.pipeline!r} cannot apply to {self.name!r}")
        config = self._spec.check(config)
        self._bind()
        with self._lock:
            steps = {step: dict(values) for step, values in self._config.steps.items()}
            for step in self.steps:
                values = config.steps.get(step.name)
                if values:
                    step.configure(values)
                    self._export(step.name, values)
                    steps.setdefault(step.name, {}).update(values)
            self._config = PipelineConfig(self.name, config.version, steps)  # knobs it did not name keep theirs
        metrics.CONFIG_VERSION.labels(self.name).set(config.version)

    @property
    def canary(self) -> tuple[PipelineConfig, float] | None:
        """The canary's config and its share of tasks, or None."""
        canary = self._canary
        return None if canary is None else (canary.config, canary.share)

    def apply_canary(self, config: PipelineConfig | None, share: float = 0.0) -> None:
        """Run `share` of new tasks on `config` from now on (None: every task on the config in force).

        Steps whose knobs `config` sets to other values than the config in force run as forks for
        those tasks (`Step.fork`); the rest are shared. A task's side is decided by a hash of its
        id. ConfigError if `config` does not fit the declaration or `share` is not in (0, 1)."""
        if config is not None:
            if not 0 < share < 1:
                raise ConfigError(f"a canary's share of tasks must be between 0 and 1, got {share}")
            if config.pipeline != self.name:
                raise ConfigError(f"a config for pipeline {config.pipeline!r} cannot apply to {self.name!r}")
            config = self._spec.check(config)
        self._bind()
        with self._lock:
            old, new = self._canary, None
            if config is not None:
                steps, merged = [], {}
                for step in self.steps:
                    base = self._config.steps.get(step.name, {})
                    values = {k: v for k, v in config.steps.get(step.name, {}).items() if base.get(k) != v}
                    steps.append(step.fork(self, values) if values else step)
                    if base or values:
                        merged[step.name] = {**base, **values}
                new = _Canary(PipelineConfig(self.name, config.version, merged), float(share), steps)
            self._canary = new
        if old is not None:
            timer = threading.Timer(RETIRE_AFTER_SECONDS, self._retire, args=(old,))
            timer.daemon = True
            timer.start()

    @property
    def shadow(self) -> ShadowTrial | None:
        """The shadow trial running, or None."""
        return self._shadow

    def apply_shadow(self, body: Mapping[str, Any] | None) -> None:
        """Shadow a sample of tasks under the candidate the tuner serves under `shadow` (None: stop shadowing).

        ConfigError if the candidate does not fit the declaration (the trial in hand then goes on)."""
        self._bind()
        trial = ShadowTrial.from_body(self, body) if body is not None else None
        with self._lock:
            old, self._shadow = self._shadow, trial
        if old is not None:
            old.close()

    def _retire(self, canary: _Canary) -> None:
        for fork, step in zip(canary.steps, self.steps, strict=True):
            if fork is not step:
                try:
                    fork.close_fork()
                except Exception as exc:  # noqa: BLE001 - close every fork even if one fails
                    log.warning("closing the canary fork of step %s of %s: %s", step.name, self.name, exc)

    def _export(self, step: str, values: Mapping[str, Any]) -> None:
        for knob, value in values.items():
            if isinstance(value, dict):
                for route, weight in value.items():
                    metrics.KNOB_VALUE.labels(self.name, step, f"{knob}.{route}").set(weight)
            else:
                metrics.KNOB_VALUE.labels(self.name, step, knob).set(float(value))

    def _bind(self) -> None:
        if self._bound:  # every task calls this: no lock once bound
            return
        with self._lock:
            if self._bound:
                return
            for step in self.steps:
                step.bind(self)
            for step, values in self._config.steps.items():
                self._export(step, values)
            self._bound = True

    # ---- tasks --------------------------------------------------------------------------------
    def check_input(self, body: Mapping[str, Any]) -> str | None:
        """Why `body` cannot be a task's input (one sentence), or None if it can.

        Types follow JSON: a `float` field takes any number, an `int` field whole numbers; neither
        takes true or false."""
        for key, kind in self.inputs.items():
            if not _json_is(body.get(key), kind):
                fields = ", ".join(f'"{k}" ({t.__name__})' for k, t in self.inputs.items())
                return f"pipeline {self.name} needs the fields {fields}; \"{key}\" is missing or not of type " \
                       f"{kind.__name__}"
        return None

    def run(self, input: Mapping[str, Any] | str, tenant: str = "", task_id: str = "") -> Task:
        """Run one task through every step that applies; StepError if a step refuses it."""
        self._bind()
        task = Task(dict(input) if isinstance(input, Mapping) else {"text": input}, task_id=task_id, tenant=tenant)
        steps, config, canary, shadow = self.steps, self._config, self._canary, self._shadow
        if canary is not None and _in_share(task_id, canary.share):
            steps, config, shadow = canary.steps, canary.config, None
        if shadow is not None and not shadow.samples(task_id):
            shadow = None
        snapshot: Snapshot | None = None
        common = {attr.PIPELINE: self.name}
        if tenant:
            common[attr.TENANT] = tenant
        metrics.TASKS_IN_FLIGHT.labels(self.name).inc()
        try:
            with self.tracer.start_as_current_span(self.name, kind=trace.SpanKind.SERVER, attributes={
                    **common, attr.CONFIG_VERSION: config.version, attr.TASK_ID: task_id}) as root:
                task.trace_id = f"{root.get_span_context().trace_id:032x}"
                task.route_key = routing.key(task_id, task.trace_id, f"{root.get_span_context().span_id:016x}")
                for index, step in enumerate(steps):
                    if shadow is not None and index == shadow.first:
                        snapshot = Snapshot.of(task)  # what the shadow starts from, before the real step changes it
                    if not step.applies(task):
                        continue
                    started = time.perf_counter()
                    with self.tracer.start_as_current_span(step.name, attributes={
                            **common, attr.STEP: step.name}) as span:
                        try:
                            step.run(task, span)
                        except Exception as exc:
                            span.set_attribute(attr.ERROR_KIND, _error_kind(exc))
                            root.set_attribute(attr.ERROR_KIND, _error_kind(exc))
                            raise
                        finally:
                            metrics.STEP_SECONDS.labels(self.name, step.name).observe(time.perf_counter() - started)
                    if snapshot is not None:
                        snapshot.saw(step, span, time.perf_counter() - started)
                if self._outcome is not None:
                    root.set_attribute(attr.OUTCOME, str(self._outcome(task)))
            metrics.TASKS_TOTAL.labels(self.name, "ok").inc()
            if shadow is not None and snapshot is not None:
                shadow.submit(task, snapshot, root.get_span_context())  # runs after the answer, in the background
            return task
        except StepError as exc:
            exc.trace_id = task.trace_id
            metrics.TASKS_TOTAL.labels(self.name, "error").inc()
            raise
        except Exception:
            metrics.TASKS_TOTAL.labels(self.name, "error").inc()
            raise
        finally:
            metrics.TASKS_IN_FLIGHT.labels(self.name).dec()

    def result(self, task: Task) -> dict[str, Any]:
        """What the task API answers for `task`."""
        if self._result is not None:
            return _plain(self._result(task))
        return _plain({k: v for k, v in task.data.items() if k not in task.input})

    def replay(self, step: str, task_id: str, idempotency_key: str, payload: Any) -> Replayed:
        """Send a dead letter of effect step `step` again, under its original idempotency key, with the step's
        URL, headers, limits and retry policy (`SideEffect.replay`). LookupError if the pipeline has no such
        effect step; SideEffectFailed if the service still does not take it."""
        self._bind()
        found = next((s for s in self.steps if s.name == step), None)
        if not isinstance(found, Effect) or found.effect is None:
            effects = [s.name for s in self.steps if isinstance(s, Effect)]
            raise LookupError(f"pipeline {self.name} has no effect step {step!r} to replay; its effect steps: "
                              f"{', '.join(effects) or 'none'}")
        return found.effect.replay(task_id, idempotency_key, payload)

    def close(self) -> None:
        shadow, self._shadow = self._shadow, None
        if shadow is not None:
            shadow.close()
        canary, self._canary = self._canary, None
        if canary is not None:
            self._retire(canary)
        for step in self.steps:
            try:
                step.close()
            except Exception as exc:  # noqa: BLE001 - close every step even if one fails
                log.warning("closing step %s of %s: %s", step.name, self.name, exc)

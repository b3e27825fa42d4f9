"""What a proposed config would do, predicted from the models the tuner fits, before anyone applies it.

`predict(spec, config, proposed, obs)` compares the config in force with a proposed one, step by step:
batching knobs through the fitted service time and the batcher's queueing model, the cascade
threshold through the observed confidences (escalation share, remote cost, labelled quality),
route weights through each route's cost and labelled accuracy. Pure: numbers in, rows out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tracetune.tuner.batching import BUCKETED_PADDING_SCALE, fit_service_time, predict_batching
from tracetune.tuner.config import ConfigError, PipelineConfig, PipelineSpec
from tracetune.tuner.observe import Observation


def parse_sets(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """`step.knob=value` strings as step -> knob -> value (JSON-ish values: numbers, true/false, a=0.5,b=0.5)."""
    changes: dict[str, dict[str, Any]] = {}
    for text in assignments:
        where, sep, raw = text.partition("=")
        step, dot, knob = where.strip().partition(".")
        if not sep or not dot or not step or not knob:
            raise ConfigError(f"--set {text!r} must look like step.knob=value, e.g. classify.batch_max_size=16")
        changes.setdefault(step, {})[knob] = _value(raw.strip(), text)
    return changes


def _value(raw: str, text: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if "=" in raw or ":" in raw:  # route weights: fp32=0.5,int8=0.5
        weights = {}
        for part in raw.split(","):
            route, _, weight = part.replace(":", "=").partition("=")
            weights[route.strip()] = _value(weight.strip(), text)
        return weights
    try:
        number = float(raw)
    except ValueError:
        raise ConfigError(f"--set {text!r}: {raw!r} is not a number, true/false or route=weight list") from None
    return int(number) if number.is_integer() and "." not in raw else number


def _batching(obs: Observation, step: str, values: Mapping[str, Any]) -> dict[str, float] | None:
    model = fit_service_time(obs.batches.get(step, []))
    if model is None or "batch_max_size" not in values:
        return None
    padding = obs.padding_ratio(step)
    if values.get("length_bucketing"):
        padding *= BUCKETED_PADDING_SCALE
    return predict_batching(model, obs.arrival_rate(step), int(values["batch_max_size"]),
                            float(values.get("batch_max_wait_ms", 5.0)), padding_ratio=padding)


def _cascade(obs: Observation, step: str, threshold: float) -> dict[str, float] | None:
    samples = obs.cascade_samples.get(step, [])
    if not samples:
        return None
    escalated = sum(s.confidence < threshold for s in samples) / len(samples)
    remote = [s.remote_correct for s in samples if s.remote_correct is not None]
    remote_accuracy = sum(remote) / len(remote) if remote else None
    labelled = [s for s in samples if s.local_correct is not None]
    quality = None
    if labelled and remote_accuracy is not None:
        quality = sum(remote_accuracy if s.confidence < threshold else float(s.local_correct) for s in labelled) \
            / len(labelled)
    per_call = obs.cost_per_call(step)
    requests = obs.requests or 1
    local_tasks = len(samples) / requests  # share of requests that reach the local step the cascade follows
    row = {"escalated_share": escalated, "cost_per_1k": 1000 * escalated * local_tasks * per_call}
    if quality is not None:
        row["quality"] = quality
    return row


def _routing(obs: Observation, step: str, weights: Mapping[str, float]) -> dict[str, float] | None:
    stats = {r.route: r for r in obs.route_stats(step)}
    total = sum(weights.values())
    if not stats or total <= 0:
        return None
    share = {route: w / total for route, w in weights.items()}
    cost = sum(share[r] * stats[r].compute_cost_per_request for r in share if r in stats)
    row = {"cost_per_1k_of_step_requests": 1000 * cost}
    if all(r in stats and stats[r].labelled for r in share if share[r] > 0):
        row["accuracy"] = sum(share[r] * stats[r].correct / stats[r].labelled for r in share if share[r] > 0)
    return row


def predict(spec: PipelineSpec, config: PipelineConfig, changes: Mapping[str, Mapping[str, Any]],
            obs: Observation) -> list[dict[str, Any]]:
    """One row per (step, figure): the value under the current config and under the proposed one."""
    proposed = spec.merge(config, {k: dict(v) for k, v in changes.items()})  # ConfigError if it does not fit
    rows: list[dict[str, Any]] = []
    for step in changes:
        now = {**{n: k.default for n, k in spec.steps[step].items()}, **config.steps.get(step, {})}
        then = {**now, **proposed.steps.get(step, {})}
        pairs = []
        if {"batch_max_size", "batch_max_wait_ms", "length_bucketing"} & set(changes[step]):
            pairs.append(("batching", _batching(obs, step, now), _batching(obs, step, then)))
        if "cascade_threshold" in changes[step]:
            pairs.append(("cascade", _cascade(obs, step, float(now["cascade_threshold"])),
                          _cascade(obs, step, float(then["cascade_threshold"]))))
        if "route_weights" in changes[step]:
            pairs.append(("routing", _routing(obs, step, now["route_weights"]),
                          _routing(obs, step, then["route_weights"])))
        for model, before, after in pairs:
            if before is None or after is None:
                rows.append({"step": step, "model": model, "figure": "(not enough data in the window)",
                             "current": None, "proposed": None})
                continue
            for figure in after:
                rows.append({"step": step, "model": model, "figure": figure,
                             "current": _finite(before.get(figure)), "proposed": _finite(after[figure])})
    return rows


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)

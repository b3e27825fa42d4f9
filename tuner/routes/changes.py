"""Changes to a pipeline's config made through the API, each under `versions.write_lock` (the lock the
tuning loop takes too) and each with its row in the decision audit; a change by hand ends the canary
on trial."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from tracetune.tuner import canary, decisions, versions
from tracetune.tuner.config import ConfigError, PipelineConfig, PipelineSpec
from tracetune.tuner.routes.common import not_declared


def config_in_force(client, pipeline: str) -> PipelineConfig:
    """The config executors are served, or the 404 of an undeclared pipeline."""
    config = versions.latest(client, pipeline)
    if config is None:
        raise not_declared(client, pipeline)
    return config


def _decide(client, kind: str, before: PipelineConfig | None, after: PipelineConfig, reason: str,
            author: str = "api") -> None:
    decisions.record(client, decisions.Decision(
        after.pipeline, kind, before.version if before else 0, after.version, before.to_dict() if before else {},
        after.to_dict(), reason, author=author))


def _cancel_canary(client, pipeline: str, why: str) -> None:
    """A change by hand (or a new declaration) ends the canary on trial: it was measured against another config."""
    trial = canary.running(client, pipeline)
    if trial is None:
        return
    reason = f"canary version {trial.version} cancelled: {why}"
    canary.finish(client, trial, "cancelled", reason)
    base = versions.latest(client, pipeline)
    decisions.record(client, decisions.Decision(
        pipeline, "canary_cancel", trial.version, base.version if base else 0, trial.config.to_dict(),
        base.to_dict() if base else {}, reason, author="api"))


def register(client, spec: PipelineSpec, source: str) -> PipelineConfig:
    with versions.write_lock:
        before = versions.latest(client, spec.pipeline)
        after, reason = versions.register(client, spec, source)
        if reason is not None:
            _cancel_canary(client, spec.pipeline, "the pipeline's declaration changed")
            _decide(client, "declaration", before, after, reason, author="tracetune")
        return after


def change(client, spec: PipelineSpec, steps: dict[str, Any], reason: str) -> PipelineConfig:
    with versions.write_lock:
        before = versions.latest(client, spec.pipeline)
        after = versions.change(client, spec, steps, "api", reason)
        if before is None or after.version != before.version:
            _cancel_canary(client, spec.pipeline, f"version {after.version} was set by hand")
            _decide(client, "change", before, after, reason)
        return after


def pin(client, spec: PipelineSpec, steps: dict[str, Any], reason: str) -> PipelineConfig:
    with versions.write_lock:
        before = config_in_force(client, spec.pipeline)
        spec.merge(before, steps)  # ConfigError before anything is stored
        _cancel_canary(client, spec.pipeline, "the config was pinned by hand")
        held = decisions.state(client, spec.pipeline)
        # Pinned first: the loop never sees the hand-set config unpinned.
        decisions.set_state(client, spec.pipeline, frozen=held.frozen, pinned=True, author="api", reason=reason)
        after = versions.change(client, spec, steps, "api", reason) if steps else before
        _decide(client, "pin", before, after, reason)
        return after


def rollback(client, spec: PipelineSpec, version: int | None, reason: str) -> PipelineConfig:
    with versions.write_lock:
        before = config_in_force(client, spec.pipeline)
        if version is None:  # the version in force before this one (canaries never promoted were never in force)
            old = versions.latest(client, spec.pipeline, below=before.version)
            target = old.version if old else 0
        else:
            target, old = version, versions.at(client, spec.pipeline, version)
        if old is None:
            known = f"1 to {before.version}" if before.version > 1 else "1"
            what = f"no version {target}" if version is not None else f"no version before {before.version}"
            raise HTTPException(404, f"pipeline {spec.pipeline!r} has {what}; its versions are {known}")
        try:
            # Every declared knob set: version N's values, defaults for knobs declared since.
            steps = spec.merge(spec.defaults(), old.steps).steps
        except ConfigError as exc:
            raise HTTPException(409, f"version {target} no longer fits the declaration ({exc}); "
                                     f"set the knobs with PATCH or POST .../config instead") from None
        reason = reason or f"rolled back to version {target}"
        _cancel_canary(client, spec.pipeline, "the config was rolled back by hand")
        held = decisions.state(client, spec.pipeline)
        # Frozen first: the loop does not undo the rollback it might otherwise see as a regression.
        decisions.set_state(client, spec.pipeline, frozen=True, pinned=held.pinned, author="api", reason=reason)
        after = versions.change(client, spec, steps, "api", reason)
        _decide(client, "rollback", before, after, reason)
        return after


def hold(client, pipeline: str, kind: str, reason: str) -> decisions.TunerState:
    """Freeze the pipeline, or unfreeze (and unpin) it, with its audit row."""
    with versions.write_lock:
        in_force = config_in_force(client, pipeline)
        held = decisions.state(client, pipeline)
        reason = reason or f"{kind} by API"
        if kind == "freeze":
            _cancel_canary(client, pipeline, "the tuner was frozen for this pipeline")
        new = decisions.set_state(client, pipeline, frozen=kind == "freeze", pinned=held.pinned and kind == "freeze",
                                  author="api", reason=reason)
        _decide(client, kind, in_force, in_force, reason)
        return new

"""The config in force, served to the executors that poll it (ETag, 304), and the owner's changes to it:
set knobs (PATCH), pin (POST) and roll back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tracetune.tuner import canary, decisions, shadow, versions
from tracetune.tuner.config import ConfigError, PipelineConfig
from tracetune.tuner.routes import changes
from tracetune.tuner.routes.common import (
    MAX_REASON_CHARS,
    WRITE_ERRORS,
    declared,
    errors,
    store_client,
    writer,
)

router = APIRouter()


class CanaryConfig(BaseModel):
    """A version on trial: executors run `share` of tasks (by a hash of the task id) on these knob values."""

    version: int
    base_version: int
    share: float
    started_at: datetime
    steps: dict[str, dict[str, Any]]


class Config(BaseModel):
    """The config in force: knob values by step and knob name, at a version (the ETag follows it and the
    canary's version), and the canary on trial, if any."""

    pipeline: str
    version: int
    steps: dict[str, dict[str, Any]]
    canary: CanaryConfig | None = None
    shadow: dict[str, Any] | None = Field(None, description="the shadow trial executors run beside the config in "
                                          "force (tuner/shadow.py): id, base_version, share, steps, answer_step, "
                                          "unit_costs, cost_cap_usd_per_hour, until")


class PinBody(BaseModel):
    """Knob values to hold (others keep theirs); `steps: {}` pins the config in force as it is."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"steps": {"classify": {"batch_max_size": 16}}, "reason": "hold while we investigate"}]})
    steps: dict[str, Any]
    reason: str = Field("", max_length=MAX_REASON_CHARS)


class RollbackBody(BaseModel):
    """The version to go back to; without one, the version before the current one."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"version": 3, "reason": "p95 regressed"}]})
    version: int | None = Field(None, ge=1)
    reason: str = Field("", max_length=MAX_REASON_CHARS)


def _served(client, pipeline: str) -> tuple[PipelineConfig | None, canary.Canary | None, dict | None]:
    config = versions.latest(client, pipeline)
    if config is None:
        return None, None, None
    return config, canary.running(client, pipeline), shadow.served(client, config)


def _etag(config: PipelineConfig, trial: canary.Canary | None, trying: dict | None = None) -> str:
    tag = config.etag if trial is None else f'"{config.pipeline}-v{config.version}-c{trial.version}"'
    return tag if trying is None else f'{tag[:-1]}-s{trying["id"]}"'


def config_response(config: PipelineConfig, response: Response, trial: canary.Canary | None = None,
                    trying: dict | None = None) -> dict[str, Any]:
    response.headers["ETag"] = _etag(config, trial, trying)
    response.headers["Cache-Control"] = "no-cache"
    decisions.CONFIG_VERSION.labels(config.pipeline).set(config.version)
    return {**config.to_dict(), "canary": trial.to_dict() if trial else None, "shadow": trying}


@router.get("/v1/pipelines/{pipeline}/config", response_model=Config,
            responses={304: {"description": "Not modified"}, **errors(404)})
async def get_config(pipeline: str, request: Request, response: Response) -> Any:
    """The config in force, the canary on trial and the shadow trial running (if any); send If-None-Match
    with the last ETag to get a cheap 304 while none changed."""
    client = store_client(request)
    config, trial, trying = await run_in_threadpool(_served, client, pipeline)
    if config is None:
        await declared(client, pipeline)  # 404 naming the known pipelines
        raise HTTPException(404, f"pipeline {pipeline!r} has no config yet")
    if request.headers.get("if-none-match") == _etag(config, trial, trying):
        decisions.CONFIG_VERSION.labels(pipeline).set(config.version)
        return Response(status_code=304, headers={"ETag": _etag(config, trial, trying)})
    return config_response(config, response, trial, trying)


@router.patch("/v1/pipelines/{pipeline}/config", dependencies=[Depends(writer)], response_model=Config,
              responses=errors(*WRITE_ERRORS))
async def change_config(pipeline: str, request: Request, response: Response, body: dict[str, Any] = Body(
        ..., examples=[{"steps": {"classify": {"batch_max_size": 16, "cache_enabled": False}},
                        "reason": "bigger batches for the evening peak"}])) -> dict[str, Any]:
    """Set knob values by step and knob name (others keep theirs); answers the new version.

    Values are checked against the pipeline's declaration: unknown steps or knobs and values out of
    bounds get 422 naming the field. A new version is recorded as a `change` decision; the tuner
    may tune on from it (POST the config to pin it instead)."""
    steps, reason = body.get("steps"), body.get("reason", "")
    if not isinstance(steps, dict) or not steps or not isinstance(reason, str):
        raise HTTPException(422, 'body must be {"steps": {step: {knob: value}}, "reason": "why"}')
    if len(reason) > MAX_REASON_CHARS:
        raise HTTPException(422, f"reason must be at most {MAX_REASON_CHARS} characters, got {len(reason)}")
    client = store_client(request)
    spec = await declared(client, pipeline)
    try:
        config = await run_in_threadpool(changes.change, client, spec, steps, reason or "changed by API")
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return config_response(config, response)


@router.post("/v1/pipelines/{pipeline}/config", dependencies=[Depends(writer)], response_model=Config,
             responses=errors(*WRITE_ERRORS))
async def pin_config(pipeline: str, body: PinBody, request: Request, response: Response) -> dict[str, Any]:
    """Pin a config by hand: set knob values (checked as PATCH checks them) as the next version and
    hold it; the tuner loop leaves the pipeline alone until `POST .../unfreeze`. Recorded as `pin`."""
    client = store_client(request)
    spec = await declared(client, pipeline)
    try:
        config = await run_in_threadpool(changes.pin, client, spec, body.steps, body.reason or "pinned by API")
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return config_response(config, response)


@router.post("/v1/pipelines/{pipeline}/rollback", dependencies=[Depends(writer)], response_model=Config,
             responses=errors(401, 403, 404, 409, 422))
async def rollback(pipeline: str, request: Request, response: Response,
                   body: RollbackBody | None = None) -> dict[str, Any]:
    """Go back to an earlier version's knob values (default: the version before the current one).

    Stores them as the next version, records a `rollback` decision and freezes the tuner so it does
    not undo the rollback; 404 for a version the pipeline never had, 409 if that version's values
    no longer fit the declaration."""
    body = body or RollbackBody()
    client = store_client(request)
    spec = await declared(client, pipeline)
    config = await run_in_threadpool(changes.rollback, client, spec, body.version, body.reason)
    return config_response(config, response)

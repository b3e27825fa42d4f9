"""Tuner HTTP API (OpenAPI at /docs, served offline): executors register their pipelines and poll their
config; owners set SLOs, change or pin knobs, roll back, freeze the tuner and send quality feedback.

Reads are open on loopback; write calls need `Authorization: Bearer <token>`. Every call answers only to
the tuner's own Host names and origin, with JSON bodies of a bounded size (tracetune.serving.Guard).
Every config change is a row in the decision audit (`GET /v1/pipelines/{p}/decisions`); Prometheus
metrics on /metrics.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer import alerts as alerting
from tracetune.analyzer import delivery, parse_window
from tracetune.analyzer.slo import SLO, SLOError, delete_slo, get_slo, save_slo, slo_version
from tracetune.serving import LOOPBACK_HOSTS, Guard, metrics
from tracetune.tuner import canary, decisions, shadow, versions
from tracetune.tuner.config import ConfigError, PipelineConfig, PipelineSpec

_bearer = HTTPBearer(auto_error=False)
router = APIRouter()


# ---- answers as OpenAPI documents them -------------------------------------------------------------

class Error(BaseModel):
    """Every error answer: one line saying what was wrong (naming the field) and how to fix it."""

    detail: str


_ERROR_TEXT = {
    400: "A body that is not UTF-8 JSON, nested too deeply or holding a lone UTF-16 surrogate",
    401: "No or a wrong bearer token: send Authorization: Bearer <tuner token>",
    403: "Writes are disabled (the tuner has no token), or a browser request from another site or Host",
    404: "The pipeline is not declared, or it has no such version",
    409: "The request conflicts with the pipeline's declaration",
    413: "The body is larger than tuner_max_body_bytes",
    415: "The body is not sent as Content-Type: application/json",
    422: "A malformed body or value; the message names the field (e.g. steps.classify.batch_max_size)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Error, "description": _ERROR_TEXT[code]} for code in codes}


_WRITE_ERRORS = (400, 401, 403, 404, 413, 415, 422)

MAX_REASON_CHARS = 2000
"""A reason is a sentence or two for the audit, not a document."""


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


class DecisionRow(BaseModel):
    """One row of the decision audit: the config before and after, why, what was predicted and observed."""

    decision_id: str
    decided_at: datetime
    pipeline: str
    kind: str
    author: str
    reason: str
    summary: str = Field("", description="the reason's first line: one sentence a product owner reads")
    version_before: int
    version_after: int
    config_before: dict[str, Any]
    config_after: dict[str, Any]
    predicted: dict[str, float]
    observed: dict[str, float]


class State(BaseModel):
    """Whether the tuner loop may change the pipeline: frozen (it changes nothing) or pinned by hand."""

    pipeline: str
    frozen: bool
    pinned: bool
    reason: str
    author: str


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


class ReasonBody(BaseModel):
    """Why (kept in the audit)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=MAX_REASON_CHARS)


class FeedbackItem(BaseModel):
    """A user's quality label for one task: its trace id, and the step judged ("" = the pipeline's answer)."""

    trace_id: str = Field(pattern="^[0-9a-fA-F]{32}$")
    label: str = Field(min_length=1, max_length=200)
    step: str = ""
    source: str = Field("", max_length=200)


class FeedbackStored(BaseModel):
    pipeline: str
    stored: int


# ---- shared pieces ---------------------------------------------------------------------------------

def _client(request: Request):
    return request.app.state.client


def writer(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    token = request.app.state.token
    if not token:
        raise HTTPException(403, "writes are disabled: the tuner has no token (set TRACETUNE_TUNER_TOKEN)")
    # Bytes, not str: compare_digest refuses non-ASCII str (a header holds any Latin-1 text).
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode("latin-1"), token.encode()):
        raise HTTPException(401, "write calls need Authorization: Bearer <tuner token>",
                            headers={"WWW-Authenticate": "Bearer"})


def _not_declared(client, pipeline: str) -> HTTPException:
    known = [p["pipeline"] for p in versions.pipelines(client)]
    return HTTPException(404, f"pipeline {pipeline!r} is not declared (an executor running it registers it "
                              f"at start); known: {', '.join(known) or 'none yet'}")


async def _spec(client, pipeline: str) -> PipelineSpec:
    spec = await run_in_threadpool(versions.latest_spec, client, pipeline)
    if spec is None:
        raise await run_in_threadpool(_not_declared, client, pipeline)
    return spec


def _served(client, pipeline: str) -> tuple[PipelineConfig | None, canary.Canary | None, dict | None]:
    config = versions.latest(client, pipeline)
    if config is None:
        return None, None, None
    return config, canary.running(client, pipeline), shadow.served(client, config)


def _current(client, pipeline: str) -> PipelineConfig:
    config = versions.latest(client, pipeline)
    if config is None:
        raise _not_declared(client, pipeline)
    return config


_slo_lock = threading.Lock()


def _save_slo(client, slo: SLO, author: str, only_if_none: bool) -> int | None:
    """Save `slo`; with `only_if_none`, only when the pipeline never had one (a declared SLO never
    overwrites the owner's, nor brings back one the owner deleted). One lock, so the check and the
    save are one step."""
    with _slo_lock:
        if only_if_none and slo_version(client, slo.pipeline):
            return None
        return save_slo(client, slo, author)


def _etag(config: PipelineConfig, trial: canary.Canary | None, trying: dict | None = None) -> str:
    tag = config.etag if trial is None else f'"{config.pipeline}-v{config.version}-c{trial.version}"'
    return tag if trying is None else f'{tag[:-1]}-s{trying["id"]}"'


def _config_response(config: PipelineConfig, response: Response, trial: canary.Canary | None = None,
                     trying: dict | None = None) -> dict[str, Any]:
    response.headers["ETag"] = _etag(config, trial, trying)
    response.headers["Cache-Control"] = "no-cache"
    decisions.CONFIG_VERSION.labels(config.pipeline).set(config.version)
    return {**config.to_dict(), "canary": trial.to_dict() if trial else None, "shadow": trying}


# ---- config changes, each with its audit row ---------------------------------------------------------


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


def _register(client, spec: PipelineSpec, source: str) -> PipelineConfig:
    with versions.write_lock:
        before = versions.latest(client, spec.pipeline)
        after, reason = versions.register(client, spec, source)
        if reason is not None:
            _cancel_canary(client, spec.pipeline, "the pipeline's declaration changed")
            _decide(client, "declaration", before, after, reason, author="tracetune")
        return after


def _change(client, spec: PipelineSpec, steps: dict[str, Any], reason: str) -> PipelineConfig:
    with versions.write_lock:
        before = versions.latest(client, spec.pipeline)
        after = versions.change(client, spec, steps, "api", reason)
        if before is None or after.version != before.version:
            _cancel_canary(client, spec.pipeline, f"version {after.version} was set by hand")
            _decide(client, "change", before, after, reason)
        return after


def _pin(client, spec: PipelineSpec, steps: dict[str, Any], reason: str) -> PipelineConfig:
    with versions.write_lock:
        before = _current(client, spec.pipeline)
        spec.merge(before, steps)  # ConfigError before anything is stored
        _cancel_canary(client, spec.pipeline, "the config was pinned by hand")
        held = decisions.state(client, spec.pipeline)
        # Pinned first: the loop never sees the hand-set config unpinned.
        decisions.set_state(client, spec.pipeline, frozen=held.frozen, pinned=True, author="api", reason=reason)
        after = versions.change(client, spec, steps, "api", reason) if steps else before
        _decide(client, "pin", before, after, reason)
        return after


def _rollback(client, spec: PipelineSpec, version: int | None, reason: str) -> PipelineConfig:
    with versions.write_lock:
        before = _current(client, spec.pipeline)
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


def _hold(client, pipeline: str, kind: str, reason: str) -> decisions.TunerState:
    """Freeze the pipeline, or unfreeze (and unpin) it, with its audit row."""
    with versions.write_lock:
        current = _current(client, pipeline)
        held = decisions.state(client, pipeline)
        reason = reason or f"{kind} by API"
        if kind == "freeze":
            _cancel_canary(client, pipeline, "the tuner was frozen for this pipeline")
        new = decisions.set_state(client, pipeline, frozen=kind == "freeze", pinned=held.pinned and kind == "freeze",
                                  author="api", reason=reason)
        _decide(client, kind, current, current, reason)
        return new


def _state_answer(pipeline: str, state: decisions.TunerState) -> dict[str, Any]:
    return {"pipeline": pipeline, **asdict(state)}


# ---- feedback -----------------------------------------------------------------------------------------

MAX_FEEDBACK_ITEMS = 1000
FEEDBACK_COLUMNS = ["pipeline", "trace_id", "step", "label", "source"]
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_FEEDBACK_FIELDS = ("trace_id", "label", "step", "source")
_FEEDBACK_SCHEMA = {"oneOf": [FeedbackItem.model_json_schema(),
                              {"type": "array", "items": FeedbackItem.model_json_schema(), "minItems": 1,
                               "maxItems": MAX_FEEDBACK_ITEMS}]}


def _text(where: str, value: Any, limit: int, required: bool) -> str:
    if not isinstance(value, str) or len(value.strip()) > limit or (required and not value.strip()):
        need = f"a non-empty string of at most {limit} characters" if required else \
            f"a string of at most {limit} characters"
        raise HTTPException(422, f"{where} must be {need}, got {str(value)[:80]!r}")
    return value.strip()


def _feedback_rows(spec: PipelineSpec, body: Any) -> list[list[str]]:
    """Rows for tracetune_feedback, or 422 naming the first bad item (by index) and field."""
    if isinstance(body, bytes):  # FastAPI passes a body without a JSON Content-Type through as bytes
        raise HTTPException(422, "body must be JSON sent with Content-Type: application/json")
    many = isinstance(body, list)
    items = body if many else [body]
    if many and not 1 <= len(items) <= MAX_FEEDBACK_ITEMS:
        raise HTTPException(422, f"send 1 to {MAX_FEEDBACK_ITEMS} feedback items per call, got {len(items)}")
    rows = []
    for index, item in enumerate(items):
        at = f"[{index}]." if many else ""
        if not isinstance(item, dict):
            raise HTTPException(422, f"{at.rstrip('.') or 'body'} must be an object like "
                                     '{"trace_id": "<32 hex>", "label": "billing"}, got ' + str(item)[:80])
        unknown = sorted(set(item) - set(_FEEDBACK_FIELDS))
        if unknown:
            raise HTTPException(422, f"{at}{unknown[0]} is not a feedback field; use {', '.join(_FEEDBACK_FIELDS)}")
        trace_id = item.get("trace_id")
        if not isinstance(trace_id, str) or not _TRACE_ID.fullmatch(trace_id.lower()) or not trace_id.strip("0"):
            raise HTTPException(422, f"{at}trace_id must be the task's trace id, 32 hex digits (not all zero), "
                                     f"got {str(trace_id)[:80]!r}")
        label = _text(f"{at}label", item.get("label"), 200, required=True)
        step = _text(f"{at}step", item.get("step", ""), 200, required=False)
        if step and step not in spec.steps:
            raise HTTPException(422, f"{at}step: {spec.pipeline} has no step {step!r}; it has: "
                                     f"{', '.join(spec.steps)} (or leave it empty for the pipeline's answer)")
        source = _text(f"{at}source", item.get("source", ""), 200, required=False)
        rows.append([spec.pipeline, trace_id.lower(), step, label, source])
    return rows


# ---- endpoints -----------------------------------------------------------------------------------------

@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/pipelines")
async def list_pipelines(request: Request) -> list[dict[str, Any]]:
    """Every pipeline the tuner has a config for, with its current version."""
    return await run_in_threadpool(versions.pipelines, _client(request))


@router.put("/v1/pipelines/{pipeline}/spec", dependencies=[Depends(writer)], response_model=Config,
            responses=_errors(401, 403, 422))
async def register_spec(pipeline: str, request: Request, response: Response,
                        body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Register what a pipeline declares (its steps' knobs, its starting SLO); answers the config in force.

    A new pipeline starts on its declared defaults (version 1) and its declared SLO; a changed
    declaration keeps the values it still allows and takes defaults for new knobs (next version,
    recorded as a `declaration` decision)."""
    try:
        spec = PipelineSpec.from_dict({**body, "pipeline": pipeline})
        slo = SLO.from_dict(spec.slo, pipeline=pipeline) if spec.slo else None
    except (ConfigError, SLOError, TypeError) as exc:
        raise HTTPException(422, str(exc)) from None
    client = _client(request)
    source = request.client.host if request.client else ""
    config = await run_in_threadpool(_register, client, spec, source)
    if slo is not None:
        await run_in_threadpool(_save_slo, client, slo, "declaration", True)
    return _config_response(config, response)


@router.get("/v1/pipelines/{pipeline}/spec", responses=_errors(404))
async def read_spec(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's declaration: every step's knobs with kind, default and bounds."""
    return (await _spec(_client(request), pipeline)).to_dict()


@router.get("/v1/pipelines/{pipeline}/config", response_model=Config,
            responses={304: {"description": "Not modified"}, **_errors(404)})
async def get_config(pipeline: str, request: Request, response: Response) -> Any:
    """The config in force, the canary on trial and the shadow trial running (if any); send If-None-Match
    with the last ETag to get a cheap 304 while none changed."""
    client = _client(request)
    config, trial, trying = await run_in_threadpool(_served, client, pipeline)
    if config is None:
        await _spec(client, pipeline)  # 404 naming the known pipelines
        raise HTTPException(404, f"pipeline {pipeline!r} has no config yet")
    if request.headers.get("if-none-match") == _etag(config, trial, trying):
        decisions.CONFIG_VERSION.labels(pipeline).set(config.version)
        return Response(status_code=304, headers={"ETag": _etag(config, trial, trying)})
    return _config_response(config, response, trial, trying)


@router.patch("/v1/pipelines/{pipeline}/config", dependencies=[Depends(writer)], response_model=Config,
              responses=_errors(*_WRITE_ERRORS))
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
    client = _client(request)
    spec = await _spec(client, pipeline)
    try:
        config = await run_in_threadpool(_change, client, spec, steps, reason or "changed by API")
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return _config_response(config, response)


@router.post("/v1/pipelines/{pipeline}/config", dependencies=[Depends(writer)], response_model=Config,
             responses=_errors(*_WRITE_ERRORS))
async def pin_config(pipeline: str, body: PinBody, request: Request, response: Response) -> dict[str, Any]:
    """Pin a config by hand: set knob values (checked as PATCH checks them) as the next version and
    hold it; the tuner loop leaves the pipeline alone until `POST .../unfreeze`. Recorded as `pin`."""
    client = _client(request)
    spec = await _spec(client, pipeline)
    try:
        config = await run_in_threadpool(_pin, client, spec, body.steps, body.reason or "pinned by API")
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return _config_response(config, response)


@router.post("/v1/pipelines/{pipeline}/rollback", dependencies=[Depends(writer)], response_model=Config,
             responses=_errors(401, 403, 404, 409, 422))
async def rollback(pipeline: str, request: Request, response: Response,
                   body: RollbackBody | None = None) -> dict[str, Any]:
    """Go back to an earlier version's knob values (default: the version before the current one).

    Stores them as the next version, records a `rollback` decision and freezes the tuner so it does
    not undo the rollback; 404 for a version the pipeline never had, 409 if that version's values
    no longer fit the declaration."""
    body = body or RollbackBody()
    client = _client(request)
    spec = await _spec(client, pipeline)
    config = await run_in_threadpool(_rollback, client, spec, body.version, body.reason)
    return _config_response(config, response)


@router.post("/v1/pipelines/{pipeline}/freeze", dependencies=[Depends(writer)], response_model=State,
             responses=_errors(*_WRITE_ERRORS))
async def freeze(pipeline: str, request: Request, body: ReasonBody | None = None) -> dict[str, Any]:
    """Stop the tuner loop changing this pipeline (hand changes still apply); recorded as `freeze`."""
    client = _client(request)
    await _spec(client, pipeline)
    state = await run_in_threadpool(_hold, client, pipeline, "freeze", (body or ReasonBody()).reason)
    return _state_answer(pipeline, state)


@router.post("/v1/pipelines/{pipeline}/unfreeze", dependencies=[Depends(writer)], response_model=State,
             responses=_errors(*_WRITE_ERRORS))
async def unfreeze(pipeline: str, request: Request, body: ReasonBody | None = None) -> dict[str, Any]:
    """Let the tuner loop tune this pipeline again (clears frozen and pinned); recorded as `unfreeze`."""
    client = _client(request)
    await _spec(client, pipeline)
    state = await run_in_threadpool(_hold, client, pipeline, "unfreeze", (body or ReasonBody()).reason)
    return _state_answer(pipeline, state)


@router.get("/v1/pipelines/{pipeline}/state", response_model=State, responses=_errors(404, 422))
async def read_state(pipeline: str, request: Request) -> dict[str, Any]:
    """Whether the tuner loop may change the pipeline (frozen, pinned), who said so and why."""
    client = _client(request)
    await _spec(client, pipeline)
    return _state_answer(pipeline, await run_in_threadpool(decisions.state, client, pipeline))


@router.get("/v1/pipelines/{pipeline}/decisions", response_model=list[DecisionRow], responses=_errors(404, 422))
async def read_decisions(pipeline: str, request: Request,
                         limit: int = Query(100, ge=1, le=1000, description="newest rows to answer")) -> Any:
    """The decision audit, newest first: every config change (tuner, API, declaration), freeze and
    canary step, with the config before and after, the reason, the predicted and the observed effect."""
    client = _client(request)
    await _spec(client, pipeline)
    return await run_in_threadpool(decisions.history, client, pipeline, limit)


@router.post("/v1/pipelines/{pipeline}/feedback", dependencies=[Depends(writer)], response_model=FeedbackStored,
             responses=_errors(*_WRITE_ERRORS), openapi_extra={"requestBody": {
                 "required": True, "content": {"application/json": {"schema": _FEEDBACK_SCHEMA}}}})
async def post_feedback(pipeline: str, request: Request, body: Any = Body(
        ..., examples=[{"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "label": "billing", "source": "agent-ui"}]),
) -> dict[str, Any]:
    """Quality labels from real users, one object or a list of up to 1000: the task's trace id, the
    right label, the step judged (empty = the pipeline's answer). The tuner scores routes and the
    cascade with them. 422 names the first bad item by index and field; nothing is stored then."""
    client = _client(request)
    spec = await _spec(client, pipeline)
    rows = _feedback_rows(spec, body)
    await run_in_threadpool(lambda: client.insert("tracetune_feedback", rows, column_names=FEEDBACK_COLUMNS))
    return {"pipeline": pipeline, "stored": len(rows)}


_SLO_EXAMPLE = {"p95_ms": 500, "p99_ms": 1500, "error_rate": 0.02, "cost_per_1k": 0.5, "quality_floor": 0.85}
_OBJECTIVES = ("p95_ms", "p99_ms", "error_rate", "objective", "cost_per_1k", "quality_floor")


def _slo_answer(version: int, slo: SLO, **extra: Any) -> dict[str, Any]:
    return {"version": version, **slo.to_dict(), **extra}


def _write_slo(client, pipeline: str, body: Any, merge: bool) -> dict[str, Any]:
    """PUT (replace) or PATCH (merge; null removes an objective) the pipeline's SLO, as one step."""
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object of SLO fields, e.g. " + json.dumps(_SLO_EXAMPLE))
    with _slo_lock:
        current = get_slo(client, pipeline)
        values = {k: v for k, v in current.to_dict().items() if k != "pipeline"} if merge and current else {}
        for name, value in body.items():
            if merge and value is None:
                values.pop(name, None)
            else:
                values[name] = value
        try:
            slo = SLO.from_dict(values, pipeline=pipeline)
        except (SLOError, TypeError) as exc:
            raise HTTPException(422, str(exc)) from None
        version = save_slo(client, slo, "api")
    if merge:
        return _slo_answer(version, slo)
    unset = [name for name in _OBJECTIVES if current and getattr(current, name) is not None
             and getattr(slo, name) is None]
    note = "replaced the whole SLO" + (f"; no longer set: {', '.join(unset)} (PATCH changes single objectives)"
                                       if unset else "")
    return _slo_answer(version, slo, replaced=True, unset=unset, note=note)


def _remove_slo(client, pipeline: str) -> dict[str, Any]:
    with _slo_lock:
        version = delete_slo(client, pipeline, "api")
    if version is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no SLO to delete")
    return {"pipeline": pipeline, "version": version, "deleted": True}


@router.get("/v1/pipelines/{pipeline}/slo", responses=_errors(404))
async def read_slo(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's SLO; 404 for an undeclared pipeline (naming the known ones) or one without an SLO."""
    client = _client(request)
    await _spec(client, pipeline)
    slo = await run_in_threadpool(get_slo, client, pipeline)
    if slo is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no SLO; set one with PUT")
    return slo.to_dict()


@router.put("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)], responses=_errors(*_WRITE_ERRORS))
async def put_slo(pipeline: str, request: Request, body: Any = Body(..., examples=[_SLO_EXAMPLE])) -> dict[str, Any]:
    """Replace the pipeline's SLO: p95/p99 latency (ms), error rate, cost per 1k budget, quality floor.

    Objectives left out are no longer set: the answer says which (`unset`); use PATCH to change some
    and keep the rest. 404 for a pipeline no executor declared."""
    client = _client(request)
    await _spec(client, pipeline)
    return await run_in_threadpool(_write_slo, client, pipeline, body, False)


@router.patch("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)], responses=_errors(*_WRITE_ERRORS))
async def patch_slo(pipeline: str, request: Request, body: Any = Body(
        ..., examples=[{"p95_ms": 400, "cost_per_1k": None}])) -> dict[str, Any]:
    """Change some objectives and keep the others (JSON merge patch: `null` removes an objective)."""
    client = _client(request)
    await _spec(client, pipeline)
    return await run_in_threadpool(_write_slo, client, pipeline, body, True)


@router.delete("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)], responses=_errors(*_WRITE_ERRORS))
async def remove_slo(pipeline: str, request: Request) -> dict[str, Any]:
    """Remove the pipeline's SLO (its burn rates and the tuner's latency target go with it); also
    the SLO of a pipeline no executor declares (e.g. one set under a misspelled name)."""
    client = _client(request)
    try:
        return await run_in_threadpool(_remove_slo, client, pipeline)
    except HTTPException:
        await _spec(client, pipeline)  # 404 naming the known pipelines
        raise


# ---- alerts (for the dashboard and scripts; the analyzer evaluates and delivers them) --------------------

class SilenceBody(BaseModel):
    """A silence: matchers (Alertmanager's objects, or "name=value" / "name!=value" / "name=~regex" strings),
    an end (`endsAt`, or `duration` such as "2h"), and why."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={"examples": [
        {"matchers": ["pipeline=ticket_triage", "severity=ticket"], "duration": "2h", "comment": "deploying"}]})
    matchers: list[str | dict[str, Any]] = Field(min_length=1)
    ends_at: datetime | None = Field(None, alias="endsAt")
    duration: str | None = None
    comment: str = Field("", max_length=1000)
    created_by: str = Field("api", alias="createdBy", max_length=200)


def _matchers(raw: list[str | dict[str, Any]]) -> list[alerting.Matcher]:
    found = []
    for item in raw:
        try:
            found.append(alerting.Matcher.parse(item) if isinstance(item, str) else alerting.Matcher.from_dict(item))
        except ValueError as exc:
            raise HTTPException(422, f"matchers: {exc}") from None
    return found


@router.get("/v1/alerts", responses=_errors(422))
async def list_alerts(request: Request, state: str = Query("firing", pattern="^(firing|pending|resolved|all)$"),
                      ) -> list[dict[str, Any]]:
    """Alerts by state (default firing; `all`: pending, firing and resolved in the last hour), with the
    silences that keep each out of notifications."""
    client = _client(request)
    found = await run_in_threadpool(alerting.current_alerts, client)
    silences = await run_in_threadpool(alerting.list_silences, client)
    now = datetime.now(UTC)
    return [{**a.to_dict(), "silenced_by": a.silenced_by(silences, now)}
            for a in sorted(found.values(), key=lambda a: a.active_at) if state == "all" or a.state == state]


@router.get("/v1/alerts/silences")
async def read_silences(request: Request) -> list[dict[str, Any]]:
    """Silences: active, pending and those that ended within a day (Alertmanager's silence objects)."""
    return [s.to_dict() for s in await run_in_threadpool(alerting.list_silences, _client(request))]


@router.post("/v1/alerts/silences", dependencies=[Depends(writer)], responses=_errors(401, 403, 422))
async def create_silence(body: SilenceBody, request: Request) -> dict[str, Any]:
    """Silence matching alerts until `endsAt` (or for `duration`); answers the silence with its id."""
    matchers = _matchers(body.matchers)
    if (body.ends_at is None) == (body.duration is None):
        raise HTTPException(422, "give either endsAt (an RFC 3339 time) or duration (e.g. 2h)")
    if body.duration is not None:
        try:
            ends = datetime.now(UTC) + timedelta(seconds=parse_window(body.duration))
        except ValueError as exc:
            raise HTTPException(422, f"duration: {exc}") from None
    else:
        ends = body.ends_at if body.ends_at.tzinfo else body.ends_at.replace(tzinfo=UTC)
    try:
        silence = await run_in_threadpool(lambda: alerting.add_silence(
            _client(request), matchers, ends, created_by=body.created_by, comment=body.comment))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return silence.to_dict()


@router.delete("/v1/alerts/silences/{silence_id}", dependencies=[Depends(writer)], responses=_errors(401, 403, 404))
async def end_silence(silence_id: str, request: Request) -> dict[str, Any]:
    """End a silence now."""
    try:
        silence = await run_in_threadpool(alerting.expire_silence, _client(request), silence_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    return silence.to_dict()


@router.get("/v1/alerts/deliveries", responses=_errors(422))
async def read_deliveries(request: Request,
                          status: str | None = Query(None, pattern="^(pending|retrying|delivered|failed)$"),
                          limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
    """The delivery log, newest first: each notification per receiver, attempts, last answer, state."""
    return await run_in_threadpool(lambda: delivery.deliveries(_client(request), limit=limit, status=status))


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422s (bad JSON, wrong types) as one line naming the field, like the tuner's own."""
    error = exc.errors()[0]
    where, *path = error.get("loc") or ("body",)
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    if error.get("type") == "json_invalid":
        detail = f"body is not valid JSON: {(error.get('ctx') or {}).get('error', error.get('msg'))}"
    elif where == "body":
        detail = f"{field or 'body'}: {error.get('msg')}"
    else:
        detail = f"{where} parameter {field}: {error.get('msg')}"
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(client_factory, token: str = "", hosts: frozenset[str] | None = LOOPBACK_HOSTS,
               max_body_bytes: int = 1024 * 1024) -> FastAPI:
    """The tuner app over the store `client_factory()` connects to; `token` guards the write calls.

    Behind tracetune.serving.Guard: `hosts` is the Host allow-list (None: any), bodies are JSON of at
    most `max_body_bytes`. /docs and /redoc load their scripts from this server (fastapi-offline), not
    from a CDN."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = await run_in_threadpool(client_factory)
        yield

    app = FastAPIOffline(title="tracetune tuner", version="1", lifespan=lifespan,
                         swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io
    app.state.token = token
    app.include_router(router)
    from tracetune.tuner import baselines  # its routes use this module's `writer`

    app.include_router(baselines.router)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_route("/metrics", metrics, include_in_schema=False)
    app.add_middleware(Guard, hosts=hosts, max_body_bytes=max_body_bytes, json_body=True)
    return app

"""Tuner HTTP API (OpenAPI at /docs): executors register their pipelines and poll their config;
owners set SLOs and change knobs.

Reads are open on loopback; write calls need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer.slo import SLO, SLOError, get_slo, save_slo
from tracetune.tuner import versions
from tracetune.tuner.config import ConfigError, PipelineConfig, PipelineSpec

_bearer = HTTPBearer(auto_error=False)
router = APIRouter()


def _client(request: Request):
    return request.app.state.client


def writer(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    token = request.app.state.token
    if not token:
        raise HTTPException(403, "writes are disabled: the tuner has no token (set TRACETUNE_TUNER_TOKEN)")
    if credentials is None or not hmac.compare_digest(credentials.credentials, token):
        raise HTTPException(401, "write calls need Authorization: Bearer <tuner token>",
                            headers={"WWW-Authenticate": "Bearer"})


async def _spec(client, pipeline: str) -> PipelineSpec:
    spec = await run_in_threadpool(versions.latest_spec, client, pipeline)
    if spec is None:
        known = [p["pipeline"] for p in await run_in_threadpool(versions.pipelines, client)]
        raise HTTPException(404, f"pipeline {pipeline!r} is not declared (an executor running it registers it "
                                 f"at start); known: {', '.join(known) or 'none yet'}")
    return spec


_slo_lock = threading.Lock()


def _save_slo(client, slo: SLO, author: str, only_if_none: bool) -> int | None:
    """Save `slo`; with `only_if_none`, only when the pipeline has none (a declared SLO never
    overwrites the owner's). One lock, so the check and the save are one step."""
    with _slo_lock:
        if only_if_none and get_slo(client, slo.pipeline) is not None:
            return None
        return save_slo(client, slo, author)


def _config_response(config: PipelineConfig, response: Response) -> dict[str, Any]:
    response.headers["ETag"] = config.etag
    response.headers["Cache-Control"] = "no-cache"
    return config.to_dict()


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/pipelines")
async def list_pipelines(request: Request) -> list[dict[str, Any]]:
    """Every pipeline the tuner has a config for, with its current version."""
    return await run_in_threadpool(versions.pipelines, _client(request))


@router.put("/v1/pipelines/{pipeline}/spec", dependencies=[Depends(writer)])
async def register_spec(pipeline: str, request: Request, response: Response,
                        body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Register what a pipeline declares (its steps' knobs, its starting SLO); answers the config in force.

    A new pipeline starts on its declared defaults (version 1) and its declared SLO; a changed
    declaration keeps the values it still allows and takes defaults for new knobs (next version)."""
    try:
        spec = PipelineSpec.from_dict({**body, "pipeline": pipeline})
        slo = SLO.from_dict(spec.slo, pipeline=pipeline) if spec.slo else None
    except (ConfigError, SLOError, TypeError) as exc:
        raise HTTPException(422, str(exc)) from None
    client = _client(request)
    source = request.client.host if request.client else ""
    config = await run_in_threadpool(versions.register, client, spec, source)
    if slo is not None:
        await run_in_threadpool(_save_slo, client, slo, "declaration", True)
    return _config_response(config, response)


@router.get("/v1/pipelines/{pipeline}/spec")
async def read_spec(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's declaration: every step's knobs with kind, default and bounds."""
    return (await _spec(_client(request), pipeline)).to_dict()


@router.get("/v1/pipelines/{pipeline}/config", responses={304: {"description": "Not modified"}})
async def get_config(pipeline: str, request: Request, response: Response) -> Any:
    """Current config; send If-None-Match with the last ETag to get a cheap 304."""
    client = _client(request)
    config = await run_in_threadpool(versions.latest, client, pipeline)
    if config is None:
        await _spec(client, pipeline)  # 404 naming the known pipelines
        raise HTTPException(404, f"pipeline {pipeline!r} has no config yet")
    if request.headers.get("if-none-match") == config.etag:
        return Response(status_code=304, headers={"ETag": config.etag})
    return _config_response(config, response)


@router.patch("/v1/pipelines/{pipeline}/config", dependencies=[Depends(writer)])
async def change_config(pipeline: str, request: Request, response: Response, body: dict[str, Any] = Body(
        ..., examples=[{"steps": {"classify": {"batch_max_size": 16, "cache_enabled": False}},
                        "reason": "bigger batches for the evening peak"}])) -> dict[str, Any]:
    """Set knob values by step and knob name (others keep theirs); answers the new version.

    Values are checked against the pipeline's declaration: unknown steps or knobs and values out of
    bounds get 422 naming the field."""
    steps, reason = body.get("steps"), body.get("reason", "")
    if not isinstance(steps, dict) or not steps or not isinstance(reason, str):
        raise HTTPException(422, 'body must be {"steps": {step: {knob: value}}, "reason": "why"}')
    client = _client(request)
    spec = await _spec(client, pipeline)
    try:
        config = await run_in_threadpool(versions.change, client, spec, steps, "api", reason or "changed by API")
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return _config_response(config, response)


@router.get("/v1/pipelines/{pipeline}/slo")
async def read_slo(pipeline: str, request: Request) -> dict[str, Any]:
    slo = await run_in_threadpool(get_slo, _client(request), pipeline)
    if slo is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no SLO; set one with PUT")
    return slo.to_dict()


@router.put("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)])
async def put_slo(pipeline: str, request: Request, body: dict[str, Any] = Body(
        ..., examples=[{"p95_ms": 500, "p99_ms": 1500, "error_rate": 0.02, "cost_per_1k": 0.5,
                        "quality_floor": 0.85}])) -> dict[str, Any]:
    """Set the pipeline's SLO: p95/p99 latency (ms), error rate, cost per 1k budget, quality floor."""
    try:
        slo = SLO.from_dict(body, pipeline=pipeline)
    except (SLOError, TypeError) as exc:
        raise HTTPException(422, str(exc)) from None
    version = await run_in_threadpool(_save_slo, _client(request), slo, "api", False)
    return {"version": version, **slo.to_dict()}


def create_app(client_factory, token: str = "") -> FastAPI:
    """The tuner app over the store `client_factory()` connects to; `token` guards the write calls."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = await run_in_threadpool(client_factory)
        yield

    app = FastAPI(title="tracetune tuner", version="1", lifespan=lifespan)
    app.state.token = token
    app.include_router(router)
    return app

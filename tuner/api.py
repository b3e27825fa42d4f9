"""Tuner HTTP API (OpenAPI at /docs): executors poll their pipeline's config; owners set SLOs.

Reads are open on loopback; write calls need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer.slo import SLO, SLOError, get_slo, save_slo
from tracetune.tuner import versions

_bearer = HTTPBearer(auto_error=False)


def create_app(client_factory, pipelines: list[str], token: str = "",
               default_slos: dict[str, dict[str, Any]] | None = None) -> FastAPI:
    client = client_factory()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for pipeline in pipelines:
            await run_in_threadpool(versions.ensure_default, client, pipeline)
        for pipeline, body in (default_slos or {}).items():
            if await run_in_threadpool(get_slo, client, pipeline) is None:
                await run_in_threadpool(save_slo, client, SLO.from_dict(body, pipeline=pipeline), "tracetune")
        yield

    app = FastAPI(title="tracetune tuner", version="1", lifespan=lifespan)

    def writer(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if not token:
            raise HTTPException(403, "writes are disabled: the tuner has no token (set TRACETUNE_TUNER_TOKEN)")
        if credentials is None or not hmac.compare_digest(credentials.credentials, token):
            raise HTTPException(401, "write calls need Authorization: Bearer <tuner token>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/pipelines/{pipeline}/config", responses={304: {"description": "Not modified"}})
    async def get_config(pipeline: str, request: Request, response: Response) -> Any:
        """Current config; send If-None-Match with the last ETag to get a cheap 304."""
        config = await run_in_threadpool(versions.latest, client, pipeline)
        if config is None:
            raise HTTPException(404, f"pipeline {pipeline!r} has no config; known: {', '.join(pipelines)}")
        if request.headers.get("if-none-match") == config.etag:
            return Response(status_code=304, headers={"ETag": config.etag})
        response.headers["ETag"] = config.etag
        response.headers["Cache-Control"] = "no-cache"
        return config.to_dict()

    @app.get("/v1/pipelines/{pipeline}/slo")
    async def read_slo(pipeline: str) -> dict[str, Any]:
        slo = await run_in_threadpool(get_slo, client, pipeline)
        if slo is None:
            raise HTTPException(404, f"pipeline {pipeline!r} has no SLO; set one with PUT")
        return slo.to_dict()

    @app.put("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)])
    async def put_slo(pipeline: str, body: dict[str, Any] = Body(
            ..., examples=[{"p95_ms": 500, "p99_ms": 1500, "error_rate": 0.02, "cost_per_1k": 0.5,
                            "quality_floor": 0.85}])) -> dict[str, Any]:
        """Set the pipeline's SLO: p95/p99 latency (ms), error rate, cost per 1k budget, quality floor."""
        try:
            slo = SLO.from_dict(body, pipeline=pipeline)
        except (SLOError, TypeError) as exc:
            raise HTTPException(422, str(exc)) from None
        version = await run_in_threadpool(save_slo, client, slo, "api")
        return {"version": version, **slo.to_dict()}

    return app

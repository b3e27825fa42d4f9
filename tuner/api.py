"""Tuner HTTP API (OpenAPI at /docs): executors poll their pipeline's config here."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from tuner import versions


def create_app(client_factory, pipelines: list[str]) -> FastAPI:
    client = client_factory()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for pipeline in pipelines:
            await run_in_threadpool(versions.ensure_default, client, pipeline)
        yield

    app = FastAPI(title="tracetune tuner", version="1", lifespan=lifespan)

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

    return app

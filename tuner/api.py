"""Tuner HTTP API (OpenAPI at /docs, served offline): executors register their pipelines and poll their
config; owners set SLOs, change or pin knobs, roll back, freeze the tuner and send quality feedback.

Reads are open on loopback; write calls need `Authorization: Bearer <token>`. Every call answers only to
the tuner's own Host names and origin, with JSON bodies of a bounded size (tracetune.base.serving.Guard).
Every config change is a row in the decision audit (`GET /v1/pipelines/{p}/decisions`); Prometheus
metrics on /metrics. The endpoints live in tracetune.tuner.routes, one router per resource; this module
assembles them.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from tracetune.base.serving import LOOPBACK_HOSTS, Guard, metrics
from tracetune.tuner.routes import ROUTERS

__all__ = ["create_app"]


def health() -> dict[str, str]:
    return {"status": "ok"}


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

    Behind tracetune.base.serving.Guard: `hosts` is the Host allow-list (None: any), bodies are JSON of at
    most `max_body_bytes`. /docs and /redoc load their scripts from this server (fastapi-offline), not
    from a CDN."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = await run_in_threadpool(client_factory)
        yield

    app = FastAPIOffline(title="tracetune tuner", version="1", lifespan=lifespan,
                         swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io
    app.state.token = token
    app.add_api_route("/health", health, methods=["GET"])
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_route("/metrics", metrics, include_in_schema=False)
    app.add_middleware(Guard, hosts=hosts, max_body_bytes=max_body_bytes, json_body=True)
    return app

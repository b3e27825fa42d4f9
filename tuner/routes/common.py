"""What every tuner router shares: the error answers OpenAPI documents, the write-token check, and
reaching the store and a pipeline's declaration from a request."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tracetune.tuner import versions
from tracetune.tuner.config import PipelineSpec

_bearer = HTTPBearer(auto_error=False)


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


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error code it may answer, with its model and meaning."""
    return {code: {"model": Error, "description": _ERROR_TEXT[code]} for code in codes}


WRITE_ERRORS = (400, 401, 403, 404, 413, 415, 422)

MAX_REASON_CHARS = 2000
"""A reason is a sentence or two for the audit, not a document."""


def store_client(request: Request):
    """The store client the app's lifespan connected."""
    return request.app.state.client


def writer(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """The dependency of every write call: the tuner's bearer token, compared in constant time."""
    token = request.app.state.token
    if not token:
        raise HTTPException(403, "writes are disabled: the tuner has no token (set TRACETUNE_TUNER_TOKEN)")
    # Bytes, not str: compare_digest refuses non-ASCII str (a header holds any Latin-1 text).
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode("latin-1"), token.encode()):
        raise HTTPException(401, "write calls need Authorization: Bearer <tuner token>",
                            headers={"WWW-Authenticate": "Bearer"})


def not_declared(client, pipeline: str) -> HTTPException:
    """The 404 for a pipeline no executor declared, naming the ones that are."""
    known = [p["pipeline"] for p in versions.pipelines(client)]
    return HTTPException(404, f"pipeline {pipeline!r} is not declared (an executor running it registers it "
                              f"at start); known: {', '.join(known) or 'none yet'}")


async def declared(client, pipeline: str) -> PipelineSpec:
    """The pipeline's declaration, or the 404 of `not_declared`."""
    spec = await run_in_threadpool(versions.latest_spec, client, pipeline)
    if spec is None:
        raise await run_in_threadpool(not_declared, client, pipeline)
    return spec

"""The decision audit: every config change, freeze and canary step of a pipeline, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from tracetune.tuner import decisions
from tracetune.tuner.routes.common import declared, errors, store_client

router = APIRouter()


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


@router.get("/v1/pipelines/{pipeline}/decisions", response_model=list[DecisionRow], responses=errors(404, 422))
async def read_decisions(pipeline: str, request: Request,
                         limit: int = Query(100, ge=1, le=1000, description="newest rows to answer")) -> Any:
    """The decision audit, newest first: every config change (tuner, API, declaration), freeze and
    canary step, with the config before and after, the reason, the predicted and the observed effect."""
    client = store_client(request)
    await declared(client, pipeline)
    return await run_in_threadpool(decisions.history, client, pipeline, limit)

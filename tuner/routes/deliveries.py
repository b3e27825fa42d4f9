"""The alert delivery log: each notification per receiver, its attempts and state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer import delivery
from tracetune.tuner.routes.common import errors, store_client

router = APIRouter()


@router.get("/v1/alerts/deliveries", responses=errors(422))
async def read_deliveries(request: Request,
                          status: str | None = Query(None, pattern="^(pending|retrying|delivered|failed)$"),
                          limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
    """The delivery log, newest first: each notification per receiver, attempts, last answer, state."""
    return await run_in_threadpool(lambda: delivery.deliveries(store_client(request), limit=limit, status=status))

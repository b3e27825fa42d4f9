"""Alerts by state, with the silences that hold each back (the analyzer evaluates and delivers them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer import alerts as alerting
from tracetune.tuner.routes.common import errors, store_client

router = APIRouter()


@router.get("/v1/alerts", responses=errors(422))
async def list_alerts(request: Request, state: str = Query("firing", pattern="^(firing|pending|resolved|all)$"),
                      ) -> list[dict[str, Any]]:
    """Alerts by state (default firing; `all`: pending, firing and resolved in the last hour), with the
    silences that keep each out of notifications."""
    client = store_client(request)
    found = await run_in_threadpool(alerting.current_alerts, client)
    silences = await run_in_threadpool(alerting.list_silences, client)
    now = datetime.now(UTC)
    return [{**a.to_dict(), "silenced_by": a.silenced_by(silences, now)}
            for a in sorted(found.values(), key=lambda a: a.active_at) if state == "all" or a.state == state]

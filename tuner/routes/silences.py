"""Alertmanager-style silences: list, create (matchers and an end) and expire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer import alerts as alerting
from tracetune.analyzer import parse_window
from tracetune.tuner.routes.common import errors, store_client, writer

router = APIRouter()


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


@router.get("/v1/alerts/silences")
async def read_silences(request: Request) -> list[dict[str, Any]]:
    """Silences: active, pending and those that ended within a day (Alertmanager's silence objects)."""
    return [s.to_dict() for s in await run_in_threadpool(alerting.list_silences, store_client(request))]


@router.post("/v1/alerts/silences", dependencies=[Depends(writer)], responses=errors(401, 403, 422))
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
            store_client(request), matchers, ends, created_by=body.created_by, comment=body.comment))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return silence.to_dict()


@router.delete("/v1/alerts/silences/{silence_id}", dependencies=[Depends(writer)], responses=errors(401, 403, 404))
async def end_silence(silence_id: str, request: Request) -> dict[str, Any]:
    """End a silence now."""
    try:
        silence = await run_in_threadpool(alerting.expire_silence, store_client(request), silence_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    return silence.to_dict()

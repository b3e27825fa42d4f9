"""Drift baselines over HTTP: pin, read and remove the window a pipeline's drift is measured against.

Served beside the SLO calls (tuner/routes/__init__.py lists the routers create_app includes); writes
need the tuner's bearer token. The storage and the maths are analyzer's (analyzer/baselines.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer.baselines import (
    Baseline,
    BaselineError,
    clear_baseline,
    first_traffic,
    get_baseline,
    set_baseline,
)
from tracetune.analyzer.stats import parse_window
from tracetune.tuner.routes.common import writer

__all__ = ["router"]

router = APIRouter()


class BaselineBody(BaseModel):
    """The window to pin: `start` and `end` (ISO times), or `first` (the pipeline's first `first` of
    traffic, e.g. "1h"), or `last` (the `last` up to now, e.g. "1h")."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"first": "1h", "note": "launch traffic"}, {"start": "2026-01-02T10:00:00Z", "end": "2026-01-02T11:00:00Z"}]})
    start: datetime | None = None
    end: datetime | None = None
    first: str | None = Field(None, description="The first WINDOW of traffic, e.g. 1h.")
    last: str | None = Field(None, description="The WINDOW up to now, e.g. 1h.")
    note: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _one_window(self) -> BaselineBody:
        given = [name for name in ("first", "last") if getattr(self, name)] + (
            ["start/end"] if self.start or self.end else [])
        if len(given) != 1:
            raise ValueError("give one of `first` (e.g. \"1h\"), `last` (e.g. \"1h\") or `start` and `end`")
        if (self.start is None) != (self.end is None):
            raise ValueError("`start` and `end` go together")
        return self


class BaselineAnswer(BaseModel):
    """A pinned baseline: [start, end) at a version, with who set it and why."""

    pipeline: str
    start: datetime
    end: datetime
    version: int
    note: str
    author: str
    created_at: datetime | None = None


class BaselineRemoved(BaseModel):
    pipeline: str
    version: int
    deleted: bool


def _answer(baseline: Baseline) -> dict[str, Any]:
    return {"pipeline": baseline.pipeline, "start": baseline.start, "end": baseline.end, "version": baseline.version,
            "note": baseline.note, "author": baseline.author, "created_at": baseline.created_at}


def _window(client, pipeline: str, body: BaselineBody) -> tuple[datetime, datetime]:
    if body.start is not None and body.end is not None:
        return body.start, body.end
    text = body.first or body.last or ""
    try:
        seconds = parse_window(text)
    except ValueError as exc:
        raise HTTPException(422, f"{'first' if body.first else 'last'}: {exc}") from None
    if body.last:
        now = datetime.now(UTC)
        return now - timedelta(seconds=seconds), now
    begin = first_traffic(client, pipeline)
    if begin is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no tasks yet; send traffic first, or give start and end")
    return begin, begin + timedelta(seconds=seconds)


def _pin(client, pipeline: str, body: BaselineBody) -> dict[str, Any]:
    start, end = _window(client, pipeline, body)
    try:
        return _answer(set_baseline(client, pipeline, start, end, note=body.note, author="api",
                                    allow_future=bool(body.first)))
    except BaselineError as exc:
        raise HTTPException(422, str(exc)) from None


@router.put("/v1/pipelines/{pipeline}/drift/baseline", dependencies=[Depends(writer)], response_model=BaselineAnswer)
async def put_baseline(pipeline: str, body: BaselineBody, request: Request) -> dict[str, Any]:
    """Pin the window the pipeline's drift is measured against (until DELETE); without one, each window
    is compared with the preceding window of the same length."""
    return await run_in_threadpool(_pin, request.app.state.client, pipeline, body)


@router.get("/v1/pipelines/{pipeline}/drift/baseline", response_model=BaselineAnswer)
async def read_baseline(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's pinned baseline; 404 when it has none (drift then uses the preceding window)."""
    baseline = await run_in_threadpool(get_baseline, request.app.state.client, pipeline)
    if baseline is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no drift baseline; its drift uses the preceding window")
    return _answer(baseline)


@router.delete("/v1/pipelines/{pipeline}/drift/baseline", dependencies=[Depends(writer)],
               response_model=BaselineRemoved)
async def remove_baseline(pipeline: str, request: Request) -> dict[str, Any]:
    """Remove the pipeline's baseline: its drift goes back to the preceding window."""
    version = await run_in_threadpool(clear_baseline, request.app.state.client, pipeline, "api")
    if version is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no drift baseline to delete")
    return {"pipeline": pipeline, "version": version, "deleted": True}

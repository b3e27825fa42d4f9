"""Whether the tuning loop may change a pipeline: freeze, unfreeze, and the state with who set it and why."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tracetune.tuner import decisions
from tracetune.tuner.routes import changes
from tracetune.tuner.routes.common import MAX_REASON_CHARS, WRITE_ERRORS, declared, errors, store_client, writer

router = APIRouter()


class State(BaseModel):
    """Whether the tuner loop may change the pipeline: frozen (it changes nothing) or pinned by hand."""

    pipeline: str
    frozen: bool
    pinned: bool
    reason: str
    author: str


class ReasonBody(BaseModel):
    """Why (kept in the audit)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=MAX_REASON_CHARS)


def _answer(pipeline: str, state: decisions.TunerState) -> dict[str, Any]:
    return {"pipeline": pipeline, **asdict(state)}


async def _hold(request: Request, pipeline: str, kind: str, body: ReasonBody | None) -> dict[str, Any]:
    """Freeze or unfreeze a declared pipeline (tuner/routes/changes.py `hold`), answering its new state."""
    client = store_client(request)
    await declared(client, pipeline)
    state = await run_in_threadpool(changes.hold, client, pipeline, kind, (body or ReasonBody()).reason)
    return _answer(pipeline, state)


@router.post("/v1/pipelines/{pipeline}/freeze", dependencies=[Depends(writer)], response_model=State,
             responses=errors(*WRITE_ERRORS))
async def freeze(pipeline: str, request: Request, body: ReasonBody | None = None) -> dict[str, Any]:
    """Stop the tuner loop changing this pipeline (hand changes still apply); recorded as `freeze`."""
    return await _hold(request, pipeline, "freeze", body)


@router.post("/v1/pipelines/{pipeline}/unfreeze", dependencies=[Depends(writer)], response_model=State,
             responses=errors(*WRITE_ERRORS))
async def unfreeze(pipeline: str, request: Request, body: ReasonBody | None = None) -> dict[str, Any]:
    """Let the tuner loop tune this pipeline again (clears frozen and pinned); recorded as `unfreeze`."""
    return await _hold(request, pipeline, "unfreeze", body)


@router.get("/v1/pipelines/{pipeline}/state", response_model=State, responses=errors(404, 422))
async def read_state(pipeline: str, request: Request) -> dict[str, Any]:
    """Whether the tuner loop may change the pipeline (frozen, pinned), who said so and why."""
    client = store_client(request)
    await declared(client, pipeline)
    return _answer(pipeline, await run_in_threadpool(decisions.state, client, pipeline))

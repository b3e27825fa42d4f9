"""Approval modes over HTTP: the policy per pipeline, the proposals waiting for an operator, approve and reject.

`ROUTERS` (tuner/routes/__init__.py) serves them; the writes need the
tuner's bearer token and, as every call of the app, pass its Host and Origin rules (tracetune.base.serving.Guard).
The logic is tuner/approval.py's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tracetune.tuner import approval, versions
from tracetune.tuner.config import Approval, ConfigError
from tracetune.tuner.routes.common import MAX_REASON_CHARS, Error, declared, store_client, writer

__all__ = ["router"]

router = APIRouter()


class PolicyBody(BaseModel):
    """Who decides the loop's proposals: `auto` (apply; a marked change waits), `approve` (every proposal
    waits), `observe` (record, never apply); `knobs` and `max_change` mark change classes in `auto`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"mode": "approve", "reason": "launch week: a person signs off every change"},
        {"mode": "auto", "knobs": ["route_weights", "escalate.cascade_threshold"], "max_change": 0.3,
         "reason": "quality knobs and big moves need a person"}]})
    mode: str = Field(pattern="^(auto|approve|observe)$")
    knobs: list[str] = Field(default_factory=list, max_length=100)
    max_change: float | None = Field(None, gt=0)
    reason: str = Field("", max_length=MAX_REASON_CHARS)
    by: str = Field("api", min_length=1, max_length=200, description="who sets it (kept in the audit)")


class AnswerBody(BaseModel):
    """Who answers and why (both kept in the decision audit)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"by": "alice", "reason": "cheaper escalation checked against last week's labels"}]})
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)
    by: str = Field("api", min_length=1, max_length=200, description="who answers (the token is shared: say who)")


_ERRORS = {401: "No or a wrong bearer token: send Authorization: Bearer <tuner token>",
           403: "Writes are disabled (the tuner has no token), or a browser request from another site or Host",
           404: "No such pipeline or proposal", 409: "The proposal is not pending, is stale, or the pipeline is frozen",
           413: "The body is larger than tuner_max_body_bytes", 415: "The body is not sent as application/json",
           422: "A malformed body or value; the message names the field",
           503: "Another tuner replica is answering the same proposal; retry after Retry-After seconds"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Error, "description": _ERRORS[code]} for code in codes}



def _refused(exc: approval.ApprovalError) -> HTTPException:
    return HTTPException(exc.status, str(exc), headers={"Retry-After": "5"} if exc.status == 503 else None)


@router.get("/v1/pipelines/{pipeline}/approval", responses=_errors(404))
async def read_policy(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's approval policy in force and where it came from (its declaration, or the API)."""
    client = store_client(request)
    await declared(client, pipeline)
    return (await run_in_threadpool(approval.policy, client, pipeline)).to_dict()


@router.put("/v1/pipelines/{pipeline}/approval", dependencies=[Depends(writer)],
            responses=_errors(401, 403, 404, 413, 415, 422))
async def write_policy(pipeline: str, body: PolicyBody, request: Request) -> dict[str, Any]:
    """Set the pipeline's approval policy (recorded as an `approval_mode` decision); it holds until changed
    here again or until the pipeline's declaration changes its own. Proposals already waiting stay."""
    client = store_client(request)
    spec = await declared(client, pipeline)
    try:
        rules = Approval(body.mode, tuple(body.knobs), body.max_change)
        found = await run_in_threadpool(approval.set_policy, client, spec, rules, body.by, body.reason)
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return found.to_dict()


_STATUSES = "^(" + "|".join(approval.OPEN + approval.CLOSED) + ")$"


@router.get("/v1/proposals", responses=_errors(404, 422))
async def list_proposals(request: Request, pipeline: str = Query("", max_length=200),
                         status: str | None = Query(None, pattern=_STATUSES),
                         limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
    """The loop's proposals, newest first: what each changes, its one-sentence summary and predictions, the
    objectives it restores, why it waits, until when, and how it ended (who, why)."""
    client = store_client(request)
    if pipeline:
        await declared(client, pipeline)
    found = await run_in_threadpool(approval.proposals, client, pipeline, status, limit)
    return [p.to_dict() for p in found]


@router.get("/v1/proposals/{number}", responses=_errors(404, 422))
async def read_proposal(number: int, request: Request) -> dict[str, Any]:
    """One proposal."""
    found = await run_in_threadpool(approval.proposal, store_client(request), number)
    if found is None:
        raise HTTPException(404, f"no proposal {number}; GET /v1/proposals?status=pending lists those waiting")
    return found.to_dict()


@router.post("/v1/proposals/{number}/approve", dependencies=[Depends(writer)],
             responses=_errors(401, 403, 404, 409, 413, 415, 422, 503))
async def approve(number: int, body: AnswerBody, request: Request) -> dict[str, Any]:
    """Apply a pending proposal exactly as proposed, through the loop's own path: a canary of it when it was
    proposed with one, else the change for every task. 409 when it is not pending, when the pipeline is
    frozen or pinned (it stays pending), or when the config changed since it was made (it is recorded
    `stale` and nothing is applied: the loop proposes again on the config in force)."""
    client = store_client(request)
    try:
        made = await run_in_threadpool(approval.approve, client, number, body.by, body.reason)
    except approval.ApprovalError as exc:
        raise _refused(exc) from None
    found = await run_in_threadpool(approval.proposal, client, number)
    config = await run_in_threadpool(versions.latest, client, found.pipeline)
    return {"proposal": found.to_dict(), "decisions": [{"kind": d.kind, "decision_id": d.decision_id,
                                                        "version_after": d.version_after} for d in made],
            "version": config.version if config else None}


@router.post("/v1/proposals/{number}/reject", dependencies=[Depends(writer)],
             responses=_errors(401, 403, 404, 409, 413, 415, 422, 503))
async def reject(number: int, body: AnswerBody, request: Request) -> dict[str, Any]:
    """Reject a pending proposal: nothing changes, and the loop does not propose the same moves again for an
    hour (the same knob, the same way). Recorded as `proposal_reject` with who and why."""
    client = store_client(request)
    try:
        await run_in_threadpool(approval.reject, client, number, body.by, body.reason)
    except approval.ApprovalError as exc:
        raise _refused(exc) from None
    found = await run_in_threadpool(approval.proposal, client, number)
    return {"proposal": found.to_dict()}

"""Dead letters over HTTP: list and show them, replay one through the executor, discard one with a reason.

`ROUTERS` (tuner/routes/__init__.py) serves them. Every call needs the
tuner's bearer token: letters hold the bodies sent to other systems (customer data), and replay and discard
change things. Replay runs in the executor, which holds the downstream's URL and credentials (they are the
pipeline's code and settings): the tuner reads the letter, asks the executor at `executor_url`
(`POST /v1/pipelines/{p}/steps/{step}/replay`, with the executor's token) to send it under its original
idempotency key, and records the outcome in `tracetune_dead_letter_events` with who asked. Storage and
queries are analyzer's (analyzer/dead_letters.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer import dead_letters
from tracetune.tuner.routes.common import writer

__all__ = ["router", "ExecutorLink", "configure"]

router = APIRouter()

REPLAY_TIMEOUT_SECONDS = 300.0
"""How long a replay may take at the executor: the effect step's retries with their backoff, within its budget."""


@dataclass(frozen=True)
class ExecutorLink:
    """Where replays are sent: the executor's base URL (or a load balancer before its replicas) and its token."""

    url: str
    token: str


def configure(app: FastAPI, executor_url: str, executor_token: str) -> None:
    """Tell the dead-letter calls where the executor is (done by `tracetune tuner` from the settings)."""
    app.state.executor = ExecutorLink(executor_url.rstrip("/"), executor_token)


class ActionBody(BaseModel):
    """Who asks (kept in the audit) and why."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"author": "alice", "reason": "the CRM is back after its outage"}]})
    author: str = Field("api", min_length=1, max_length=200)
    reason: str = Field("", max_length=2000)


class DiscardBody(ActionBody):
    """Who discards the letter and why (required: a discarded effect never happens)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"author": "alice", "reason": "duplicate ticket, the customer was called back by phone"}]})
    reason: str = Field(min_length=1, max_length=2000)


def _find(client, key: str) -> dead_letters.Letter:
    try:
        return dead_letters.find(client, key)
    except dead_letters.DeadLetterError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/v1/dead-letters", dependencies=[Depends(writer)])
async def list_letters(request: Request, status: str = Query("open", pattern="^(open|replayed|discarded|all)$"),
                       pipeline: str = "", step: str = "",
                       limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
    """Dead letters, newest first: the effect (pipeline, step, task, idempotency key), why it failed, how often
    it was tried, when, and what was done about it. Bodies are left out: `GET /v1/dead-letters/{key}`."""
    found = await run_in_threadpool(dead_letters.letters, request.app.state.client, status, pipeline, step,
                                    None, limit)
    return [letter.to_dict(payload=False) for letter in found]


@router.get("/v1/dead-letters/{key}", dependencies=[Depends(writer)])
async def show_letter(key: str, request: Request) -> dict[str, Any]:
    """One letter by its idempotency key (or a unique prefix of 8+ characters): the body it sent, every time it
    was dead-lettered and every replay and discard."""
    return (await run_in_threadpool(_find, request.app.state.client, key)).to_dict()


@router.post("/v1/dead-letters/{key}/replay", dependencies=[Depends(writer)])
async def replay_letter(key: str, request: Request, body: ActionBody | None = None) -> Any:
    """Send the letter again through the executor under its original idempotency key, so the downstream stores
    the effect once however often it is replayed. 200 when the downstream took it (the letter is `replayed`);
    502 with the downstream's answer when it did not (the letter stays open); 409 for a discarded letter;
    503 when the executor cannot be reached (nothing was sent)."""
    body = body or ActionBody()
    client = request.app.state.client
    letter = await run_in_threadpool(_find, client, key)
    if letter.status == "discarded":
        raise HTTPException(409, f"dead letter {letter.idempotency_key} was discarded by {letter.last_author}: "
                                 f"{letter.last_reason}; it is not replayed")
    link: ExecutorLink | None = getattr(request.app.state, "executor", None)
    if link is None:
        raise HTTPException(503, "replay needs the executor's address: this tuner was started without one "
                                 "(`tracetune tuner` takes it from the executor_endpoint / executor_port settings)")
    url = f"{link.url}/v1/pipelines/{letter.pipeline}/steps/{letter.step}/replay"
    sent = {"task_id": letter.task_id, "idempotency_key": letter.idempotency_key, "payload": letter.body}
    try:
        async with httpx.AsyncClient(timeout=REPLAY_TIMEOUT_SECONDS) as http:
            answer = await http.post(url, json=sent, headers={"Authorization": f"Bearer {link.token}"})
    except httpx.HTTPError as exc:
        raise HTTPException(503, f"cannot reach the executor at {link.url} ({type(exc).__name__}); nothing was "
                                 f"sent: start it (`tracetune up`) and replay again") from None
    try:
        said = answer.json()
    except ValueError:
        said = {}
    said = said if isinstance(said, dict) else {}
    if answer.status_code == 200:
        event = dead_letters.Event("replayed", body.author, body.reason, int(said.get("attempts") or 0),
                                   int(said.get("http_status") or 0), json.dumps(said.get("answer"), default=str))
        event = await run_in_threadpool(dead_letters.record, client, letter, event)
        return {"outcome": "replayed", "idempotency_key": letter.idempotency_key, "attempts": event.attempts,
                "http_status": event.http_status, "answer": said.get("answer"), "at": event.at.isoformat()}
    if answer.status_code == 502:
        error = str(said.get("error") or answer.text[:500])
        event = dead_letters.Event("replay_failed", body.author, error, int(said.get("attempts") or 0),
                                   int(said.get("last_status") or 0))
        await run_in_threadpool(dead_letters.record, client, letter, event)
        return JSONResponse({"detail": error, "outcome": "replay_failed", "idempotency_key": letter.idempotency_key,
                             "attempts": event.attempts, "last_status": event.http_status}, status_code=502)
    why = said.get("error") or answer.text[:300] or answer.reason_phrase
    raise HTTPException(502 if answer.status_code >= 500 else 409,
                        f"the executor at {link.url} did not replay it (HTTP {answer.status_code}: {why}); "
                        f"nothing was recorded")


@router.post("/v1/dead-letters/{key}/discard", dependencies=[Depends(writer)])
async def discard_letter(key: str, body: DiscardBody, request: Request) -> dict[str, Any]:
    """Give the letter up for good, with who and why in the audit; it leaves the open letters (and the alert).
    Dead-lettered again later (the task resubmitted), it is open again."""
    client = request.app.state.client
    letter = await run_in_threadpool(_find, client, key)
    event = await run_in_threadpool(dead_letters.record, client, letter,
                                    dead_letters.Event("discarded", body.author, body.reason))
    return {"outcome": "discarded", "idempotency_key": letter.idempotency_key, **event.to_dict()}

"""Quality labels from real users (`tracetune_feedback`), which the tuner scores routes and the cascade with."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from tracetune.tuner.config import PipelineSpec
from tracetune.tuner.routes.common import WRITE_ERRORS, declared, errors, store_client, writer

router = APIRouter()


class FeedbackItem(BaseModel):
    """A user's quality label for one task: its trace id, and the step judged ("" = the pipeline's answer)."""

    trace_id: str = Field(pattern="^[0-9a-fA-F]{32}$")
    label: str = Field(min_length=1, max_length=200)
    step: str = ""
    source: str = Field("", max_length=200)


class FeedbackStored(BaseModel):
    pipeline: str
    stored: int


MAX_FEEDBACK_ITEMS = 1000
FEEDBACK_COLUMNS = ["pipeline", "trace_id", "step", "label", "source"]
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_FEEDBACK_FIELDS = ("trace_id", "label", "step", "source")
_FEEDBACK_SCHEMA = {"oneOf": [FeedbackItem.model_json_schema(),
                              {"type": "array", "items": FeedbackItem.model_json_schema(), "minItems": 1,
                               "maxItems": MAX_FEEDBACK_ITEMS}]}


def _text(where: str, value: Any, limit: int, required: bool) -> str:
    if not isinstance(value, str) or len(value.strip()) > limit or (required and not value.strip()):
        need = f"a non-empty string of at most {limit} characters" if required else \
            f"a string of at most {limit} characters"
        raise HTTPException(422, f"{where} must be {need}, got {str(value)[:80]!r}")
    return value.strip()


def _feedback_rows(spec: PipelineSpec, body: Any) -> list[list[str]]:
    """Rows for tracetune_feedback, or 422 naming the first bad item (by index) and field."""
    if isinstance(body, bytes):  # FastAPI passes a body without a JSON Content-Type through as bytes
        raise HTTPException(422, "body must be JSON sent with Content-Type: application/json")
    many = isinstance(body, list)
    items = body if many else [body]
    if many and not 1 <= len(items) <= MAX_FEEDBACK_ITEMS:
        raise HTTPException(422, f"send 1 to {MAX_FEEDBACK_ITEMS} feedback items per call, got {len(items)}")
    rows = []
    for index, item in enumerate(items):
        at = f"[{index}]." if many else ""
        if not isinstance(item, dict):
            raise HTTPException(422, f"{at.rstrip('.') or 'body'} must be an object like "
                                     '{"trace_id": "<32 hex>", "label": "billing"}, got ' + str(item)[:80])
        unknown = sorted(set(item) - set(_FEEDBACK_FIELDS))
        if unknown:
            raise HTTPException(422, f"{at}{unknown[0]} is not a feedback field; use {', '.join(_FEEDBACK_FIELDS)}")
        trace_id = item.get("trace_id")
        if not isinstance(trace_id, str) or not _TRACE_ID.fullmatch(trace_id.lower()) or not trace_id.strip("0"):
            raise HTTPException(422, f"{at}trace_id must be the task's trace id, 32 hex digits (not all zero), "
                                     f"got {str(trace_id)[:80]!r}")
        label = _text(f"{at}label", item.get("label"), 200, required=True)
        step = _text(f"{at}step", item.get("step", ""), 200, required=False)
        if step and step not in spec.steps:
            raise HTTPException(422, f"{at}step: {spec.pipeline} has no step {step!r}; it has: "
                                     f"{', '.join(spec.steps)} (or leave it empty for the pipeline's answer)")
        source = _text(f"{at}source", item.get("source", ""), 200, required=False)
        rows.append([spec.pipeline, trace_id.lower(), step, label, source])
    return rows


@router.post("/v1/pipelines/{pipeline}/feedback", dependencies=[Depends(writer)], response_model=FeedbackStored,
             responses=errors(*WRITE_ERRORS), openapi_extra={"requestBody": {
                 "required": True, "content": {"application/json": {"schema": _FEEDBACK_SCHEMA}}}})
async def post_feedback(pipeline: str, request: Request, body: Any = Body(
        ..., examples=[{"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "label": "billing", "source": "agent-ui"}]),
) -> dict[str, Any]:
    """Quality labels from real users, one object or a list of up to 1000: the task's trace id, the
    right label, the step judged (empty = the pipeline's answer). The tuner scores routes and the
    cascade with them. 422 names the first bad item by index and field; nothing is stored then."""
    client = store_client(request)
    spec = await declared(client, pipeline)
    rows = _feedback_rows(spec, body)
    await run_in_threadpool(lambda: client.insert("tracetune_feedback", rows, column_names=FEEDBACK_COLUMNS))
    return {"pipeline": pipeline, "stored": len(rows)}

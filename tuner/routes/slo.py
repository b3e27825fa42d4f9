"""A pipeline's SLO: read, replace (PUT), merge (PATCH) and delete; one lock so a check and a save are one step."""

from __future__ import annotations

import json
import threading
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer.slo import SLO, SLOError, delete_slo, get_slo, save_slo, slo_version
from tracetune.tuner.routes.common import WRITE_ERRORS, declared, errors, store_client, writer

router = APIRouter()

_slo_lock = threading.Lock()


def save_declared(client, slo: SLO, author: str, only_if_none: bool) -> int | None:
    """Save `slo`; with `only_if_none`, only when the pipeline never had one (a declared SLO never
    overwrites the owner's, nor brings back one the owner deleted). One lock, so the check and the
    save are one step."""
    with _slo_lock:
        if only_if_none and slo_version(client, slo.pipeline):
            return None
        return save_slo(client, slo, author)


_SLO_EXAMPLE = {"p95_ms": 500, "p99_ms": 1500, "error_rate": 0.02, "cost_per_1k": 0.5, "quality_floor": 0.85}
_OBJECTIVES = ("p95_ms", "p99_ms", "error_rate", "objective", "cost_per_1k", "quality_floor")


def _slo_answer(version: int, slo: SLO, **extra: Any) -> dict[str, Any]:
    return {"version": version, **slo.to_dict(), **extra}


def _write_slo(client, pipeline: str, body: Any, merge: bool) -> dict[str, Any]:
    """PUT (replace) or PATCH (merge; null removes an objective) the pipeline's SLO, as one step."""
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object of SLO fields, e.g. " + json.dumps(_SLO_EXAMPLE))
    with _slo_lock:
        current = get_slo(client, pipeline)
        values = {k: v for k, v in current.to_dict().items() if k != "pipeline"} if merge and current else {}
        for name, value in body.items():
            if merge and value is None:
                values.pop(name, None)
            else:
                values[name] = value
        try:
            slo = SLO.from_dict(values, pipeline=pipeline)
        except (SLOError, TypeError) as exc:
            raise HTTPException(422, str(exc)) from None
        version = save_slo(client, slo, "api")
    if merge:
        return _slo_answer(version, slo)
    unset = [name for name in _OBJECTIVES if current and getattr(current, name) is not None
             and getattr(slo, name) is None]
    note = "replaced the whole SLO" + (f"; no longer set: {', '.join(unset)} (PATCH changes single objectives)"
                                       if unset else "")
    return _slo_answer(version, slo, replaced=True, unset=unset, note=note)


def _remove_slo(client, pipeline: str) -> dict[str, Any]:
    with _slo_lock:
        version = delete_slo(client, pipeline, "api")
    if version is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no SLO to delete")
    return {"pipeline": pipeline, "version": version, "deleted": True}


@router.get("/v1/pipelines/{pipeline}/slo", responses=errors(404))
async def read_slo(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's SLO; 404 for an undeclared pipeline (naming the known ones) or one without an SLO."""
    client = store_client(request)
    await declared(client, pipeline)
    slo = await run_in_threadpool(get_slo, client, pipeline)
    if slo is None:
        raise HTTPException(404, f"pipeline {pipeline!r} has no SLO; set one with PUT")
    return slo.to_dict()


@router.put("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)], responses=errors(*WRITE_ERRORS))
async def put_slo(pipeline: str, request: Request, body: Any = Body(..., examples=[_SLO_EXAMPLE])) -> dict[str, Any]:
    """Replace the pipeline's SLO: p95/p99 latency (ms), error rate, cost per 1k budget, quality floor.

    Objectives left out are no longer set: the answer says which (`unset`); use PATCH to change some
    and keep the rest. 404 for a pipeline no executor declared."""
    client = store_client(request)
    await declared(client, pipeline)
    return await run_in_threadpool(_write_slo, client, pipeline, body, False)


@router.patch("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)], responses=errors(*WRITE_ERRORS))
async def patch_slo(pipeline: str, request: Request, body: Any = Body(
        ..., examples=[{"p95_ms": 400, "cost_per_1k": None}])) -> dict[str, Any]:
    """Change some objectives and keep the others (JSON merge patch: `null` removes an objective)."""
    client = store_client(request)
    await declared(client, pipeline)
    return await run_in_threadpool(_write_slo, client, pipeline, body, True)


@router.delete("/v1/pipelines/{pipeline}/slo", dependencies=[Depends(writer)], responses=errors(*WRITE_ERRORS))
async def remove_slo(pipeline: str, request: Request) -> dict[str, Any]:
    """Remove the pipeline's SLO (its burn rates and the tuner's latency target go with it); also
    the SLO of a pipeline no executor declares (e.g. one set under a misspelled name)."""
    client = store_client(request)
    try:
        return await run_in_threadpool(_remove_slo, client, pipeline)
    except HTTPException:
        await declared(client, pipeline)  # 404 naming the known pipelines
        raise

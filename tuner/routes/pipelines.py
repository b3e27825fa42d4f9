"""The pipelines executors declare: the list, and each one's declaration (its steps' knobs and starting SLO)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from tracetune.analyzer.slo import SLO, SLOError
from tracetune.tuner import versions
from tracetune.tuner.config import ConfigError, PipelineSpec
from tracetune.tuner.routes import changes
from tracetune.tuner.routes.common import declared, errors, store_client, writer
from tracetune.tuner.routes.config import Config, config_response
from tracetune.tuner.routes.slo import save_declared

router = APIRouter()


@router.get("/v1/pipelines")
async def list_pipelines(request: Request) -> list[dict[str, Any]]:
    """Every pipeline the tuner has a config for, with its current version."""
    return await run_in_threadpool(versions.pipelines, store_client(request))


@router.put("/v1/pipelines/{pipeline}/spec", dependencies=[Depends(writer)], response_model=Config,
            responses=errors(401, 403, 422))
async def register_spec(pipeline: str, request: Request, response: Response,
                        body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Register what a pipeline declares (its steps' knobs, its starting SLO); answers the config in force.

    A new pipeline starts on its declared defaults (version 1) and its declared SLO; a changed
    declaration keeps the values it still allows and takes defaults for new knobs (next version,
    recorded as a `declaration` decision)."""
    try:
        spec = PipelineSpec.from_dict({**body, "pipeline": pipeline})
        slo = SLO.from_dict(spec.slo, pipeline=pipeline) if spec.slo else None
    except (ConfigError, SLOError, TypeError) as exc:
        raise HTTPException(422, str(exc)) from None
    client = store_client(request)
    source = request.client.host if request.client else ""
    config = await run_in_threadpool(changes.register, client, spec, source)
    if slo is not None:
        await run_in_threadpool(save_declared, client, slo, "declaration", True)
    return config_response(config, response)


@router.get("/v1/pipelines/{pipeline}/spec", responses=errors(404))
async def read_spec(pipeline: str, request: Request) -> dict[str, Any]:
    """The pipeline's declaration: every step's knobs with kind, default and bounds."""
    return (await declared(store_client(request), pipeline)).to_dict()

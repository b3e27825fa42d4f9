"""The tuner's HTTP API, one router per resource; `tracetune.tuner.api.create_app` includes `ROUTERS`.

A new resource is a module here with its own `router = APIRouter()`, using `common` for the error
answers (`errors`, `Error`), the write-token dependency (`writer`) and the store client, and one line
in `ROUTERS` below. The order of `ROUTERS` is the order of the paths in the OpenAPI document.
"""

from __future__ import annotations

from fastapi import APIRouter

from tracetune.tuner.routes import (
    alerts,
    approvals,
    baselines,
    config,
    dead_letters,
    decisions,
    deliveries,
    feedback,
    pipelines,
    silences,
    slo,
    state,
)

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    pipelines.router,   # GET /v1/pipelines, PUT/GET .../spec
    config.router,      # GET/PATCH/POST .../config, POST .../rollback
    state.router,       # POST .../freeze, .../unfreeze, GET .../state
    decisions.router,   # GET .../decisions
    feedback.router,    # POST .../feedback
    slo.router,         # GET/PUT/PATCH/DELETE .../slo
    alerts.router,      # GET /v1/alerts
    silences.router,    # GET/POST /v1/alerts/silences, DELETE /v1/alerts/silences/{id}
    deliveries.router,  # GET /v1/alerts/deliveries
    baselines.router,   # GET/PUT/DELETE .../drift/baseline
    approvals.router,   # GET/PUT .../approval, GET /v1/proposals[/{n}], POST .../approve, .../reject
    dead_letters.router,  # GET /v1/dead-letters[/{key}], POST .../replay, .../discard
)

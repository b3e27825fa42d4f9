"""The executor's HTTP API: run a task, health, and Prometheus /metrics, on one port (default 9464).

`POST /v1/pipelines/{pipeline}/tasks` takes the task's input fields as a JSON object, plus the
optional `task_id` and `tenant`; it answers the pipeline's result, 400 for a body the pipeline
cannot take, 422 when a step refuses the task, and 503 + Retry-After past `max_in_flight` tasks.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import asynccontextmanager

import anyio.to_thread
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from tracetune.executor.pipelines import Pipeline, StepError

_CALLER_FIELDS = ("task_id", "tenant")


class _Admission:
    """Counts tasks in flight; refuses past the limit instead of queueing without bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


async def run_task(request: Request) -> JSONResponse:
    pipelines: dict[str, Pipeline] = request.app.state.pipelines
    admission: _Admission = request.app.state.admission
    name = request.path_params["pipeline"]
    pipeline = pipelines.get(name)
    if pipeline is None:
        return JSONResponse({"error": f"unknown pipeline {name!r}; this executor runs {', '.join(pipelines)}"},
                            status_code=404)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "body must be JSON like {\"text\": \"...\", \"tenant\": \"...\"}"},
                            status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "body must be a JSON object of the task's input fields"}, status_code=400)
    problem = pipeline.check_input(body)
    if problem:
        return JSONResponse({"error": problem}, status_code=400)
    if not admission.enter():
        return JSONResponse({"error": f"{admission.in_flight} tasks already running; retry later"},
                            status_code=503, headers={"Retry-After": "1"})
    task_id = str(body.get("task_id") or uuid.uuid4())
    tenant = str(body.get("tenant") or "")
    task_input = {k: v for k, v in body.items() if k not in _CALLER_FIELDS}
    try:
        task = await run_in_threadpool(pipeline.run, task_input, tenant=tenant, task_id=task_id)
    except StepError as exc:  # the caller's input (422), or a failure on our side such as a dependency (502)
        return JSONResponse({"error": str(exc), "task_id": task_id, "trace_id": exc.trace_id},
                            status_code=422 if exc.kind == "client" else 502)
    finally:
        admission.leave()
    return JSONResponse({"task_id": task_id, "trace_id": task.trace_id, "result": pipeline.result(task)})


async def health(request: Request) -> JSONResponse:
    pipelines: dict[str, Pipeline] = request.app.state.pipelines
    return JSONResponse({"status": "ok", "pipelines": {n: p.config.version for n, p in pipelines.items()},
                         "in_flight": request.app.state.admission.in_flight})


def create_app(pipelines: dict[str, Pipeline], max_in_flight: int = 256) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        # Tasks wait on batchers in threads: allow as many threads as tasks we admit.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max_in_flight + 8
        yield

    app = Starlette(lifespan=lifespan, routes=[
        Route("/v1/pipelines/{pipeline}/tasks", run_task, methods=["POST"]),
        Route("/health", health),
        Mount("/metrics", make_asgi_app()),
    ])
    app.state.pipelines = dict(pipelines)
    app.state.admission = _Admission(max_in_flight)
    return app

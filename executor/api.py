"""The executor's HTTP API: run a task, and Prometheus /metrics, on one port (default 9464)."""

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


def create_app(pipelines: dict[str, Pipeline], max_in_flight: int = 256) -> Starlette:
    in_flight = [0]
    lock = threading.Lock()

    async def run_task(request: Request) -> JSONResponse:
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
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return JSONResponse({"error": "body needs a string field \"text\""}, status_code=400)
        with lock:
            if in_flight[0] >= max_in_flight:
                return JSONResponse({"error": f"{in_flight[0]} tasks already running; retry later"},
                                    status_code=503, headers={"Retry-After": "1"})
            in_flight[0] += 1
        task_id = str(body.get("task_id") or uuid.uuid4())
        tenant = str(body.get("tenant") or "")
        try:
            task = await run_in_threadpool(pipeline.run, body["text"], tenant=tenant, task_id=task_id)
        except StepError as exc:
            return JSONResponse({"error": str(exc), "task_id": task_id, "trace_id": exc.trace_id},
                                status_code=422)
        finally:
            with lock:
                in_flight[0] -= 1
        return JSONResponse({"task_id": task_id, "trace_id": task.trace_id, "result": task.result()})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "pipelines": {n: p.config.version for n, p in pipelines.items()},
                             "in_flight": in_flight[0]})

    @asynccontextmanager
    async def lifespan(_: Starlette):
        # Tasks wait on batchers in threads: allow as many threads as tasks we admit.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max_in_flight + 8
        yield

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/pipelines/{pipeline}/tasks", run_task, methods=["POST"]),
        Route("/health", health),
        Mount("/metrics", make_asgi_app()),
    ])

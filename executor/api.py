"""The executor's HTTP API: run a task, health, and Prometheus /metrics, on one port (default 9464).

`POST /v1/pipelines/{pipeline}/tasks` takes the task's input fields as a JSON object, plus the
optional `task_id` and `tenant`, with `Authorization: Bearer <executor token>` (401 without it); it
answers the pipeline's result, 400 for a body the pipeline cannot take, 422 when a step refuses the
task, and 503 + Retry-After past `max_in_flight` tasks. Behind tracetune.base.serving.Guard: the Host
allow-list, no cross-site browser requests (403), JSON bodies only (415) of at most
`executor_max_body_bytes` (413), UTF-8 without lone surrogates and not nested too deeply (400).

`POST /v1/pipelines/{pipeline}/steps/{step}/replay` (the same token) sends a dead letter of an effect step
again under its original idempotency key; the tuner's `/v1/dead-letters/{key}/replay` calls it.
"""

from __future__ import annotations

import hmac
import threading
import uuid
from contextlib import asynccontextmanager

import anyio.to_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracetune.base.serving import LOOPBACK_HOSTS, Guard, Refused, metrics
from tracetune.executor.effects import SideEffectFailed
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


def _refusal(_: dict[str, str], refused: Refused) -> JSONResponse:
    return JSONResponse({"error": refused.message}, status_code=refused.status, headers=refused.headers)


def _unauthorized(request: Request) -> JSONResponse | None:
    """401 unless the request carries the executor's bearer token (403 when the executor has none)."""
    token: str = request.app.state.token
    if not token:
        return JSONResponse({"error": "task calls are disabled: the executor has no token (set "
                                      "TRACETUNE_EXECUTOR_TOKEN)"}, status_code=403)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII str (a header holds any Latin-1 text).
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), token.encode()):
        return JSONResponse({"error": "task calls need Authorization: Bearer <executor token> (in "
                                      "<home>/executor.token, or TRACETUNE_EXECUTOR_TOKEN)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


def _pipeline(request: Request) -> Pipeline | JSONResponse:
    """The pipeline the path names, once the caller is authorized; else the 401/403/404 answer."""
    refused = _unauthorized(request)
    if refused is not None:
        return refused
    pipelines: dict[str, Pipeline] = request.app.state.pipelines
    name = request.path_params["pipeline"]
    pipeline = pipelines.get(name)
    if pipeline is None:
        return JSONResponse({"error": f"unknown pipeline {name!r}; this executor runs {', '.join(pipelines)}"},
                            status_code=404)
    return pipeline


async def run_task(request: Request) -> JSONResponse:
    pipeline = _pipeline(request)
    if isinstance(pipeline, JSONResponse):
        return pipeline
    admission: _Admission = request.app.state.admission
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


async def replay_dead_letter(request: Request) -> JSONResponse:
    """Send a dead letter of an effect step again with the step's URL, credentials and retry policy, under the
    letter's ORIGINAL idempotency key (body: `task_id`, `idempotency_key`, `payload`). The control plane calls
    this (`POST /v1/dead-letters/{key}/replay` on the tuner) and records the outcome; 200 when the service took
    it, 502 with why when it did not (the letter stays), 404 for a pipeline or effect step this executor lacks."""
    pipeline = _pipeline(request)
    if isinstance(pipeline, JSONResponse):
        return pipeline
    step = request.path_params["step"]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body.get(k)
                                             for k in ("task_id", "idempotency_key")) or "payload" not in body:
        return JSONResponse({"error": "body must be a JSON object with task_id and idempotency_key (strings) and "
                                      "payload (the letter's request body)"}, status_code=400)
    try:
        replayed = await run_in_threadpool(pipeline.replay, step, body["task_id"], body["idempotency_key"],
                                           body["payload"])
    except LookupError as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    except SideEffectFailed as exc:
        return JSONResponse({"error": str(exc), "attempts": exc.attempts, "last_status": exc.last_status},
                            status_code=502)
    return JSONResponse({"status": "replayed", "attempts": replayed.attempts, "http_status": replayed.status,
                         "answer": replayed.answer})


async def health(request: Request) -> JSONResponse:
    pipelines: dict[str, Pipeline] = request.app.state.pipelines
    return JSONResponse({"status": "ok", "pipelines": {n: p.config.version for n, p in pipelines.items()},
                         "shadows": {n: p.shadow.id for n, p in pipelines.items() if p.shadow is not None},
                         "in_flight": request.app.state.admission.in_flight})


def create_app(pipelines: dict[str, Pipeline], max_in_flight: int = 256, *, token: str,
               hosts: frozenset[str] | None = LOOPBACK_HOSTS, max_body_bytes: int = 1024 * 1024) -> Starlette:
    """The task API over `pipelines`; task calls need `token`, `hosts` is the Host allow-list (None: any)."""
    @asynccontextmanager
    async def lifespan(app: Starlette):
        # Tasks wait on batchers in threads: allow as many threads as tasks we admit.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max_in_flight + 8
        yield

    app = Starlette(lifespan=lifespan, routes=[
        Route("/v1/pipelines/{pipeline}/tasks", run_task, methods=["POST"]),
        Route("/v1/pipelines/{pipeline}/steps/{step}/replay", replay_dead_letter, methods=["POST"]),
        Route("/health", health),
        Route("/metrics", metrics),
    ])
    app.add_middleware(Guard, hosts=hosts, max_body_bytes=max_body_bytes, json_body=True, error=_refusal)
    app.state.token = token
    app.state.pipelines = dict(pipelines)
    app.state.admission = _Admission(max_in_flight)
    return app

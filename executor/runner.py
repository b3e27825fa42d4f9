"""The executor process: the sample pipeline, its metrics, config polling and an optional steady load."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import start_http_server

from executor.corpus import generate
from executor.models import TicketClassifier, build_models
from executor.pipelines import Pipeline, StepError, TicketTriage
from executor.telemetry import setup_tracing
from executor.tuning import ConfigPoller
from tracetune.settings import Settings

log = logging.getLogger("tracetune.executor")


def build_pipeline(settings: Settings) -> Pipeline:
    build_models(settings.models_dir)
    if settings.pipeline != TicketTriage.name:
        raise SystemExit(f"unknown pipeline {settings.pipeline!r}; this executor runs: {TicketTriage.name}")
    return TicketTriage(TicketClassifier(settings.models_dir))


def steady_load(pipeline: Pipeline, rate: float, stop: threading.Event, workers: int,
                seed: int = 3, duplicate_ratio: float = 0.2, empty_ratio: float = 0.01) -> dict[str, int]:
    """Open-loop Poisson arrivals at `rate`/s until `stop`; returns counts of ok / failed tasks."""
    rng = random.Random(seed)
    tickets = [t.text for t in generate(2000, seed=seed)]
    counts = {"submitted": 0, "ok": 0, "failed": 0, "crashed": 0}
    lock = threading.Lock()

    def one(text: str) -> None:
        try:
            pipeline.run(text)
            outcome = "ok"
        except StepError:
            outcome = "failed"
        except Exception:
            log.exception("task crashed")
            outcome = "crashed"
        with lock:
            counts[outcome] += 1

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="task") as pool:
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += rng.expovariate(rate)
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            roll = rng.random()
            text = "   " if roll < empty_ratio else (tickets[rng.randrange(50)] if roll < empty_ratio + duplicate_ratio
                                                     else tickets[rng.randrange(len(tickets))])
            pool.submit(one, text)
            counts["submitted"] += 1
    return counts


def run(settings: Settings, duration: float | None = None) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    provider = setup_tracing(settings.collector_url)
    pipeline = build_pipeline(settings)
    start_http_server(settings.executor_metrics_port, addr=settings.bind_host)
    poller = ConfigPoller(settings.tuner_url, pipeline.name, pipeline.apply_config,
                          settings.executor_config_poll_seconds).start()
    if duration:
        threading.Timer(duration, stop.set).start()
    log.warning("executor ready: pipeline %s, config version %s, load %.1f/s",
                pipeline.name, pipeline.config.version, settings.load_rate)
    try:
        if settings.load_rate > 0:
            counts = steady_load(pipeline, settings.load_rate, stop, settings.executor_workers)
            log.warning("load finished: %s", counts)
        else:
            stop.wait()
    finally:
        poller.stop()
        pipeline.close()
        provider.force_flush(30_000)
        provider.shutdown()

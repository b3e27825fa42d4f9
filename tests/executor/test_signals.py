"""Cold starts and batch-queue depth from a real executor process (real ONNX variants) with a real collector
and store: on /metrics, on spans, and in `tracetune stats`. A cold start is counted once per model variant per
executor start; a burst of tasks shows a batch queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.executor.model_pipeline import NAME, ROUTES
from tests.servers import start_process, stop_process, wait_until
from tracetune import analyzer, store
from tracetune.base.settings import Settings

EXECUTOR_TOKEN = "executor-s3cret"


def samples(settings: Settings, name: str) -> dict[str, float]:
    """The executor's samples of metric `name` for the test pipeline's step, by route (or "" without one)."""
    text = httpx.get(settings.executor_metrics_url, timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("pipeline") == NAME:
                found[sample.labels.get("route", "")] = sample.value
    return found


def run_tasks(settings: Settings, count: int, workers: int, prefix: str) -> None:
    def one(i: int) -> None:
        answer = httpx.post(f"{settings.executor_url}/v1/pipelines/{NAME}/tasks", timeout=30,
                            headers={"Authorization": f"Bearer {EXECUTOR_TOKEN}"},
                            json={"text": f"ticket number {i} about {prefix}", "task_id": f"{prefix}-{i}"})
        assert answer.status_code == 200, answer.text

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))


class Executor:
    """The executor as a real process, restartable."""

    def __init__(self, settings: Settings, logs: Path):
        self.settings, self.logs, self.proc, self.starts = settings, logs, None, 0

    def start(self) -> None:
        self.starts += 1
        log = self.logs / f"executor-{self.starts}.log"
        self.proc = start_process(["executor"], self.settings, log)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(log.read_text()[-3000:])
            try:
                return httpx.get(f"{self.settings.executor_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 90, 0.2, "executor ready")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture
def executor(collector, tmp_path) -> Iterator[Executor]:
    settings = collector.replace(executor_token=EXECUTOR_TOKEN, tuner_interval_seconds=0,
                                 pipelines=f"tests.executor.model_pipeline:{NAME}")
    tuner = start_process(["tuner"], settings, tmp_path / "tuner.log")
    running = Executor(settings, tmp_path)
    try:
        wait_until(lambda: tuner.poll() is None and _tuner_up(f"{settings.tuner_url}/health"), 60, 0.2, "tuner ready")
        running.start()
        yield running
    finally:
        running.stop()
        stop_process(tuner)


def _tuner_up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_cold_starts_count_once_per_variant_per_executor_start_and_a_burst_fills_the_batch_queue(executor, tmp_path):
    settings = executor.settings
    assert samples(settings, "tracetune_cold_starts_total") == {}  # no request yet, no cold start
    run_tasks(settings, 40, 8, "warm-up")
    assert set(samples(settings, "tracetune_route_requests_total")) == set(ROUTES)  # both variants served
    assert samples(settings, "tracetune_cold_starts_total") == dict.fromkeys(ROUTES, 1.0)
    assert all(v > 0 for v in samples(settings, "tracetune_cold_start_duration_seconds").values())
    run_tasks(settings, 20, 4, "more")
    assert samples(settings, "tracetune_cold_starts_total") == dict.fromkeys(ROUTES, 1.0)  # still once each

    # A burst: batches wait up to 150 ms to fill, so concurrent tasks sit in the queue meanwhile.
    assert samples(settings, "tracetune_batch_queue_depth") == {"": 0.0}
    burst = threading.Thread(target=run_tasks, args=(settings, 48, 48, "burst"))
    burst.start()
    deepest = wait_until(lambda: samples(settings, "tracetune_batch_queue_depth")[""], 20, 0.02, "a queue")
    burst.join(60)
    assert deepest > 0
    wait_until(lambda: samples(settings, "tracetune_batch_queue_depth") == {"": 0.0}, 20, 0.1, "an empty queue")

    executor.stop()
    executor.start()  # a new executor process: its variants start cold again, once each
    assert samples(settings, "tracetune_cold_starts_total") == {}
    run_tasks(settings, 40, 8, "restarted")
    assert samples(settings, "tracetune_cold_starts_total") == dict.fromkeys(ROUTES, 1.0)
    executor.stop()  # flushes its spans to the collector

    client = store.connect(settings, ensure_schema=False)
    [cold] = wait_until(lambda: [f for f in [analyzer.cold_starts(client, "1h", NAME)] if f["cold_starts"].sum() >= 4],
                        30, 0.5, "cold-start spans")
    assert cold["route"].to_list() == sorted(ROUTES)
    assert cold["cold_starts"].to_list() == [2, 2] and cold["executors"].to_list() == [2, 2]
    assert (cold["cold_ms_max"] > 0).all() and (cold["warm_ms_p50"] > 0).all()
    # The collector stores spans a moment after it acknowledges them: wait for every batched span (148 tasks).
    [queues] = wait_until(lambda: [f for f in [analyzer.batching(client, "1h", NAME)]
                                   if f["batched_spans"].sum() >= 148], 30, 0.5, "every batched span")
    assert queues["queue_depth_max"].max() > 1 and queues["batched_spans"].sum() == 148

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    shown = subprocess.run([sys.executable, "-m", "tracetune", "stats", "--cold-starts", "--pipeline", NAME,
                            "--since", "1h", "--json"], cwd=tmp_path, env={**env, **settings.as_env()},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert [(r["route"], r["cold_starts"], r["executors"]) for r in json.loads(shown.stdout)] == \
        [(route, 2, 2) for route in sorted(ROUTES)]
    table = subprocess.run([sys.executable, "-m", "tracetune", "stats", "--batching", "--pipeline", NAME,
                            "--since", "1h"], cwd=tmp_path, env={**env, **settings.as_env(), "COLUMNS": "100"},
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "depth p95" in table.stdout, table.stdout + table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 100, table.stdout

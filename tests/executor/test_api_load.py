"""The executor's HTTP API and the open-loop load generator, against real servers."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.executor.test_pipeline import classifiers, make_pipeline, remote  # noqa: F401 - fixtures
from tests.servers import ThreadServer
from tracetune import store
from tracetune.demo.load import Drift, LoadPlan, TicketSource, arrivals, ground_truth_writer, rate_at, run_load
from tracetune.executor.api import create_app

TASK_TOKEN = "t0ken"


def _post(url: str, **kwargs) -> httpx.Response:
    """A task call with the executor's bearer token."""
    headers = {"Authorization": f"Bearer {TASK_TOKEN}", **kwargs.pop("headers", {})}
    return httpx.post(url, headers=headers, **kwargs)



@pytest.fixture
def executor_server(classifiers, remote):  # noqa: F811
    pipeline, exporter = make_pipeline(classifiers, remote)
    with ThreadServer(create_app({pipeline.name: pipeline}, max_in_flight=64, token=TASK_TOKEN)) as server:
        yield server, pipeline, exporter
    pipeline.close()


def test_task_api_answers_with_trace_ids_and_clear_errors(executor_server):
    server, pipeline, _ = executor_server
    url = f"{server.url}/v1/pipelines/ticket_triage/tasks"
    ok = _post(url, json={"text": "where is my parcel, order #48213 has not arrived", "tenant": "acme"})
    assert ok.status_code == 200
    body = ok.json()
    assert len(body["trace_id"]) == 32 and body["result"]["category"] == "shipping" and body["task_id"]
    empty = _post(url, json={"text": "  "})
    assert empty.status_code == 422 and "empty ticket" in empty.json()["error"] and len(empty.json()["trace_id"]) == 32
    assert _post(url, content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    assert _post(url, json={"txt": "x"}).status_code == 400
    assert _post(f"{server.url}/v1/pipelines/nope/tasks", json={"text": "x"}).status_code == 404
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("tracetune_step_duration_seconds_bucket", "tracetune_tasks_total", "tracetune_batch_queue_depth",
                 "tracetune_cache_hit_ratio", "tracetune_tasks_in_flight", "tracetune_retries_total"):
        assert name in metrics, name


def test_arrival_patterns():
    plan = LoadPlan(rate=10, duration=200, pattern="step")
    assert rate_at(plan, 10) == 10 and rate_at(plan, 150) == 20
    times = list(arrivals(LoadPlan(rate=50, duration=100, seed=3), random.Random(3)))
    assert abs(len(times) - 5000) < 4 * 5000 ** 0.5  # Poisson count: mean 5000, sd ~71
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert abs(sum(gaps) / len(gaps) - 0.02) < 0.002  # exponential gaps with mean 1/rate
    burst = LoadPlan(rate=10, duration=120, pattern="burst", period_seconds=120)
    assert rate_at(burst, 1) == 50 and rate_at(burst, 10) == 10
    daily = LoadPlan(rate=10, pattern="daily", period_seconds=100)
    assert rate_at(daily, 25) == pytest.approx(16) and rate_at(daily, 75) == pytest.approx(4)
    with pytest.raises(ValueError, match="KIND@SECONDS"):
        Drift.parse("bogus@3")


def test_drift_injection_changes_the_tickets_from_its_time():
    drifts = [Drift("category_mix", 50), Drift("text_length", 50)]
    source = TicketSource(LoadPlan(duplicate_ratio=0, invalid_ratio=0, drifts=drifts), random.Random(1))
    before = [source.draw(t) for t in range(0, 50)]
    after = [source.draw(t) for t in range(50, 400)]
    assert {s for _, _, s in before} == {"baseline"} and {s for _, _, s in after} == {"category_mix+text_length"}
    share = sum(t.category in ("billing", "refund") for t, _, _ in after) / len(after)
    assert share > 0.5  # 60% forced + their share of the rest
    assert sum(len(t.text) for t, _, _ in after) / len(after) > 2 * sum(len(t.text) for t, _, _ in before) / 50


def test_open_loop_load_records_ground_truth(executor_server, db_settings):
    server, pipeline, _ = executor_server
    client = store.connect(db_settings, ensure_schema=False)
    plan = LoadPlan(rate=40, duration=3, duplicate_ratio=0.3, drifts=[Drift("unseen_vocab", 1.5)], seed=5)
    report = asyncio.run(run_load(plan, server.url, "ticket_triage", record=ground_truth_writer(client),
                                  token=TASK_TOKEN))
    summary = report.summary()
    assert summary["sent"] > 60 and summary["sent"] == summary["ok"] + summary["rejected"] + summary["failed"] + \
        summary["overloaded"] + summary["dropped"]
    assert summary["failed"] == 0 and summary["accuracy"] > 0.6
    rows = client.query("SELECT count(), countIf(duplicate = 1), countIf(scenario = 'unseen_vocab'), "
                        "countIf(predicted = label), countIf(length(trace_id) = 32) FROM tracetune_ground_truth "
                        "WHERE run_id = {r:String}", parameters={"r": report.run_id}).result_rows[0]
    total, duplicates, drifted, correct, traced = rows
    assert total == summary["sent"] - summary["dropped"] and traced == summary["ok"] + summary["rejected"]
    assert 0.15 < duplicates / total < 0.45 and drifted > 0 and correct == report.correct

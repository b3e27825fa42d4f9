"""The ticket-triage pipeline on the real ONNX model: spans, attributes, errors, live config changes."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import store
from executor.corpus import generate
from executor.models import TicketClassifier
from executor.pipelines import StepError, TicketTriage
from executor.tuning import ConfigPoller
from tests.conftest import ThreadServer, wait_until
from tuner import versions
from tuner.api import create_app
from tuner.config import StepConfig


@pytest.fixture
def traced_pipeline(models_dir):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipeline = TicketTriage(TicketClassifier(models_dir), tracer=provider.get_tracer("test"))
    yield pipeline, exporter
    pipeline.close()


def test_a_task_is_one_root_span_with_a_child_span_per_step(traced_pipeline):
    pipeline, exporter = traced_pipeline
    task = pipeline.run("I was charged twice for my pro subscription, urgent")
    assert task.data["category"] == "billing" and task.data["priority"] == "P1"
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "ticket_triage")
    steps = [s for s in spans if s.attributes.get("tracetune.step")]
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time)] == \
        ["normalize", "classify", "prioritize", "draft_reply"]
    assert all(s.parent.span_id == root.context.span_id for s in steps)
    assert root.attributes["tracetune.pipeline"] == "ticket_triage"
    assert root.attributes["tracetune.config_version"] == 1
    classify = next(s for s in steps if s.name == "classify")
    assert classify.attributes["tracetune.route"] == "fp32"
    assert classify.attributes["tracetune.cache"] == "miss"
    assert classify.attributes["tracetune.batch_size"] == 1
    assert classify.attributes["tracetune.queue_ms"] >= 0
    batch = next(s for s in spans if s.name == "batch classify")
    assert [link.context.span_id for link in batch.links] == [classify.context.span_id]

    exporter.clear()
    pipeline.run("I WAS charged twice for my pro   subscription, urgent")  # same text once normalised
    again = next(s for s in exporter.get_finished_spans() if s.name == "classify")
    assert again.attributes["tracetune.cache"] == "hit"


def test_bad_input_fails_its_step_with_an_error_status(traced_pipeline):
    pipeline, exporter = traced_pipeline
    with pytest.raises(StepError, match="empty ticket"):
        pipeline.run("   ")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["normalize"].status.status_code == StatusCode.ERROR
    assert spans["ticket_triage"].status.status_code == StatusCode.ERROR
    assert "classify" not in spans


def test_config_change_mid_load_applies_without_errors(traced_pipeline, db_settings):
    pipeline, exporter = traced_pipeline
    client = store.connect(db_settings, ensure_schema=False)
    with ThreadServer(create_app(lambda: store.connect(db_settings), ["ticket_triage"])) as tuner:
        poller = ConfigPoller(tuner.url, "ticket_triage", pipeline.apply_config, interval=0.1).start()
        tickets = [t.text for t in generate(200, seed=5)]
        errors, done = [], threading.Event()

        def load():
            rng = random.Random(1)
            while not done.is_set():
                try:
                    pipeline.run(rng.choice(tickets))
                except Exception as exc:  # any failure at all is a defect here
                    errors.append(exc)

        workers = [threading.Thread(target=load) for _ in range(6)]
        for w in workers:
            w.start()
        wait_until(lambda: len(exporter.get_finished_spans()) > 200, 30, message="load running")
        current = versions.latest(client, "ticket_triage")
        newer = dataclasses.replace(current, version=2, steps={"classify": StepConfig(16, 2.0, False)})
        versions.save(client, newer, author="test", reason="mid-load change")
        wait_until(lambda: pipeline.config.version == 2, 20, message="version 2 applied")
        mark = len(exporter.get_finished_spans())
        wait_until(lambda: len(exporter.get_finished_spans()) > mark + 200, 30, message="load after change")
        done.set()
        for w in workers:
            w.join(10)
        poller.stop()

    assert errors == []
    assert pipeline.batcher.max_size == 16 and pipeline.batcher.max_wait_ms == 2.0
    assert poller.not_modified > 0  # polling between changes was answered with 304
    after = exporter.get_finished_spans()[mark:]
    roots = [s for s in after if s.name == "ticket_triage"]
    assert roots and all(s.attributes["tracetune.config_version"] == 2 for s in roots[-20:])
    classify = [s for s in after if s.name == "classify"]
    assert all(s.attributes["tracetune.cache"] == "bypass" for s in classify[-20:])  # cache switched off

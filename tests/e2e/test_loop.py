"""The real processes (store, collector, tuner, executor) under load; `tracetune stats` reads the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

import store
from tests.conftest import make_settings, start_process, stop_process, wait_until


def _ready(url: str, proc, log) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"process exited early:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def loop(tmp_path, models_dir):
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2, load_rate=40)
    shutil.copytree(models_dir, settings.models_dir)
    procs = {}
    try:
        for name, args, url in (
            ("store", ["store"], f"{settings.store_url}/ping"),
            ("collector", ["collector"], f"{settings.collector_url}/health"),
            ("tuner", ["tuner"], f"{settings.tuner_url}/health"),
            ("executor", ["executor", "--rate", "40"], settings.executor_metrics_url),
        ):
            log = tmp_path / f"{name}.log"
            procs[name] = start_process(args, settings, log)
            wait_until(lambda: _ready(url, procs[name], log), 90, 0.2, f"{name} ready")
        yield settings, procs
    finally:
        for proc in reversed(list(procs.values())):
            stop_process(proc)


def test_stats_reports_every_step_after_a_few_seconds_of_load(loop, tmp_path):
    settings, procs = loop
    client = store.connect(settings, ensure_schema=False)
    wait_until(lambda: client.query("SELECT countDistinct(SpanAttributes['tracetune.step']) FROM otel_traces "
                                    "WHERE SpanAttributes['tracetune.step'] != ''").result_rows[0][0] == 4
               and client.query("SELECT count() FROM otel_traces").result_rows[0][0] > 400,
               60, 0.5, "spans of every step")
    metrics = httpx.get(settings.executor_metrics_url).text
    assert 'tracetune_step_duration_seconds_count{pipeline="ticket_triage",step="classify"}' in metrics
    assert 'tracetune_config_version{pipeline="ticket_triage"} 1.0' in metrics
    stop_process(procs["executor"])  # SIGTERM: finishes in-flight tasks and flushes its spans

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    out = subprocess.run([sys.executable, "-m", "tracetune", "stats", "--since", "5m", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["step"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"normalize", "classify", "prioritize", "draft_reply"}
    for row in rows.values():
        assert row["pipeline"] == "ticket_triage"
        assert row["p99_ms"] >= row["p95_ms"] >= row["p50_ms"] > 0
        assert row["requests"] > 0
    assert rows["normalize"]["requests"] >= rows["classify"]["requests"]  # empty tickets stop at normalize
    # Every finished task reached ClickHouse: one root span per task, config version on each.
    roots = client.query("SELECT count(), countIf(SpanAttributes['tracetune.config_version'] = '1') FROM otel_traces "
                         "WHERE SpanName = 'ticket_triage'").result_rows[0]
    assert roots[0] == rows["normalize"]["requests"] == roots[1]

    table = subprocess.run([sys.executable, "-m", "tracetune", "stats", "--since", "5m"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "classify" in table.stdout and "p95 ms" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "tracetune", "stats", "--since", "soon"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "30s, 5m" in bad.stderr and "Traceback" not in bad.stderr

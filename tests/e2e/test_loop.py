"""The real processes (store, collector, tuner, executor) under load; `tracetune stats` reads the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import make_settings
from tests.servers import running_stack, stop_process, wait_until
from tracetune import store


@pytest.fixture
def loop(tmp_path, models_dir):
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2, load_rate=40,
                             executor_config_poll_seconds=1)
    shutil.copytree(models_dir, settings.models_dir)
    with running_stack(settings, tmp_path) as procs:
        yield settings, procs


def _run(args: list[str], settings, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    return subprocess.run([sys.executable, "-m", "tracetune", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_stats_reports_every_step_after_a_few_seconds_of_load(loop, tmp_path):
    settings, procs = loop
    load = _run(["load", "--rate", "40", "--duration", "6", "--duplicates", "0.3", "--no-progress", "--json"],
                settings)
    assert load.returncode == 0, load.stderr
    summary = json.loads(load.stdout)
    assert summary["ok"] > 100 and summary["failed"] == 0, summary
    metrics = httpx.get(settings.executor_metrics_url).text
    assert 'tracetune_step_duration_seconds_count{pipeline="ticket_triage",step="classify"}' in metrics
    assert 'tracetune_config_version{pipeline="ticket_triage"} 1.0' in metrics
    stop_process(procs["executor"])  # SIGTERM: finishes in-flight tasks and flushes its spans

    client = store.connect(settings, ensure_schema=False)
    answered = summary["ok"] + summary["rejected"]
    roots = lambda: client.query("SELECT count() FROM otel_traces WHERE SpanName = 'ticket_triage'").result_rows[0][0]
    try:
        wait_until(lambda: roots() >= answered, 60, 0.5, "every task's root span")
    except AssertionError:
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
        raise AssertionError(f"{roots()} root spans for {answered} answered tasks ({summary})\n{logs}") from None
    assert roots() <= answered  # and never a task twice
    out = _run(["stats", "--since", "5m", "--json"], settings)
    assert out.returncode == 0, out.stderr
    rows = {r["step"]: r for r in json.loads(out.stdout)}
    assert {"(end to end)", "normalize", "classify", "prioritize", "draft_reply"} <= set(rows) <= \
        {"(end to end)", "normalize", "classify", "escalate", "prioritize", "create_followup", "draft_reply"}
    assert rows["(end to end)"]["requests"] == answered  # the end-to-end row counts tasks
    for row in rows.values():
        assert row["pipeline"] == "ticket_triage"
        assert row["p99_ms"] >= row["p95_ms"] >= row["p50_ms"] > 0
        assert row["requests"] > 0
    assert rows["normalize"]["requests"] == answered  # every task started there
    counts = client.query("SELECT count(), countIf(SpanAttributes['tracetune.config_version'] = '1') FROM otel_traces "
                         "WHERE SpanName = 'ticket_triage'").result_rows[0]
    assert counts[0] == rows["normalize"]["requests"] == counts[1]  # one root per task, config version on each
    truth = client.query("SELECT count(), countIf(predicted = label) FROM tracetune_ground_truth").result_rows[0]
    assert truth[0] == summary["sent"] - summary["dropped"] and truth[1] > 0.6 * summary["ok"]

    table = _run(["stats", "--since", "5m"], settings)
    assert table.returncode == 0 and "classify" in table.stdout and "p95 ms" in table.stdout
    bad = _run(["stats", "--since", "soon"], settings)
    assert bad.returncode != 0 and "30s, 5m" in bad.stderr and "Traceback" not in bad.stderr
    cost = _run(["cost", "--since", "5m", "--json"], settings)
    assert cost.returncode == 0, cost.stderr
    by_step = {r["step"]: r for r in json.loads(cost.stdout)}
    assert by_step["classify"]["compute_cost"] > 0 and by_step["classify"]["price_version"]
    report = _run(["report", "--since", "5m", "-o", str(tmp_path / "report.html")], settings)
    assert report.returncode == 0, report.stderr
    assert "<svg" in (tmp_path / "report.html").read_text()

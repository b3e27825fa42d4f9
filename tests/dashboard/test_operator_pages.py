"""The Dead letters page and the Steps page's cold starts and batch queues, run headless (Streamlit AppTest)
against a real embedded store: letters written by the executor's own writer, spans as the executor writes them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.dashboard.test_app import chart_rows, charts, metrics, open_page, rows, use_settings
from tests.spans import COLUMNS, span_row
from tracetune import store
from tracetune.analyzer import dead_letters
from tracetune.executor.effects import DeadLetter, DeadLetters


def _letter(settings, task_id: str, minutes_ago: float) -> str:
    key = f"key-{task_id}-0123456789"
    DeadLetters(lambda: store.connect(settings, ensure_schema=False)).write(DeadLetter(
        "triage", "create_followup", task_id, key, 3, 503, "HTTP 503 Service Unavailable: down", {"ticket": task_id},
        created_at=datetime.now(UTC) - timedelta(minutes=minutes_ago)))
    return key


def test_dead_letters_page_lists_letters_with_their_history_and_the_commands(db_settings, client, monkeypatch,
                                                                              tmp_path):
    use_settings(monkeypatch, db_settings, tmp_path)
    assert open_page("dead_letters").info[0].value.startswith("No open dead letters")
    first, second = _letter(db_settings, "t1", 5), _letter(db_settings, "t2", 2)
    handled = _letter(db_settings, "t3", 1)
    dead_letters.record(client, dead_letters.find(client, handled), dead_letters.Event("discarded", "alice", "dup"))

    at = open_page("dead_letters")
    assert metrics(at) == {"Open dead letters": "2", "New in the last hour": "2"}
    assert [(r["key"], r["status"], r["attempts"], r["HTTP"]) for r in rows(at)] == [
        (second, "open", 3, 503), (first, "open", 3, 503)]
    assert any(second in c.value and "dead-letters replay" in c.value for c in at.code)
    assert any('"ticket": "t2"' in j.value or '"t2"' in j.value for j in at.json)

    at.radio(key="dead_letters_status").set_value("discarded")
    at.run()
    [row] = rows(at)
    assert (row["key"], row["done"]) == (handled, "discarded by alice")
    history = at.table[0].value.to_dict("records")
    assert [h["what"] for h in history] == ["dead-lettered", "discarded"] and history[1]["detail"] == "dup"


def test_steps_page_shows_cold_starts_and_queue_depth(db_settings, client, monkeypatch, tmp_path):
    use_settings(monkeypatch, db_settings, tmp_path)
    now = time.time_ns()
    spans = []
    for executor in ("host-1", "host-2"):  # two executor starts: one cold start each per route
        for i in range(6):
            cold = i == 0
            attrs = {"tracetune.pipeline": "scorer", "tracetune.step": "score", "tracetune.route": "small",
                     "tracetune.batch_size": "4", "tracetune.queue_ms": "3", "tracetune.queue_depth": str(i + 1)}
            if cold:
                attrs["tracetune.cold_start"] = "true"
            start = now - (60 - i) * 10**9 - len(spans)
            spans.append(span_row(start, trace_id=f"{len(spans):032x}", span_id=f"{len(spans) + 1:016x}",
                                  parent="ab" * 8, name="score", attrs=attrs, duration=(90 if cold else 10) * 10**6,
                                  resource={"service.instance.id": executor}))
            spans.append(span_row(start, trace_id=f"{len(spans) - 1:032x}", span_id=f"{len(spans) + 100:016x}",
                                  name="scorer", kind="SPAN_KIND_SERVER", attrs={"tracetune.pipeline": "scorer"},
                                  duration=12 * 10**6))
    client.insert("otel_traces", spans, column_names=COLUMNS)

    at = open_page("steps")
    assert any(s.value == "Cold starts and batch queues" for s in at.subheader)
    tables = [t.value.to_dict("records") for t in at.dataframe]
    [cold] = [t for t in tables if t and "cold starts" in t[0]]
    assert cold == [{"pipeline": "scorer", "step": "score", "route": "small", "cold starts": 2, "executors": 2,
                     "first request ms": 90.0, "slowest first ms": 90.0, "usual p50 ms": 10.0}]
    bars = [r for chart in charts(at) for r in chart_rows(chart) if "request" in r]
    assert sorted((r["request"], r["ms"]) for r in bars) == [("first after a start (slowest)", 90.0),
                                                             ("usual (p50)", 10.0)]
    [queue] = [t for t in tables if t and "deepest queue" in t[0]]
    assert queue[0]["deepest queue"] == 6 and queue[0]["batched requests"] == 12

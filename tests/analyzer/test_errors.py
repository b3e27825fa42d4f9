"""Error messages grouped by pipeline, step, kind and message, against spans built like the executor's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.spans import COLUMNS, span_row
from tracetune.analyzer import ERROR_COLUMNS, errors
from tracetune.analyzer.errors import ERROR_KIND_SQL

NOW = datetime.now(UTC).replace(microsecond=0)


def _task(n: int, at: datetime, steps: list[tuple[str, str]], failed: bool, root_attrs: dict[str, str] | None = None,
          root_message: str = "") -> list[list]:
    """A task: its root span and one span per (step, error message or '' for success)."""
    trace_id, start = f"{n:032x}", int(at.timestamp()) * 10**9
    common = {"tracetune.pipeline": "triage"}
    rows = [span_row(start, trace_id=trace_id, span_id=f"{n:08x}00000000", name="triage", kind="Server",
                     attrs=common | (root_attrs or {}), duration=10**7, status="Error" if failed else "Unset",
                     status_message=root_message)]
    for i, (step, message) in enumerate(steps):
        rows.append(span_row(start + i * 1000, trace_id=trace_id, span_id=f"{n:08x}{i + 1:08x}",
                             parent=f"{n:08x}00000000", name=step, attrs=common | {"tracetune.step": step},
                             duration=10**6, status="Error" if message else "Unset", status_message=message))
    return rows


def _seed(client) -> None:
    rows = []
    for n in range(6):  # refused for their input: the executor marks the task client-side
        rows += _task(n, NOW - timedelta(seconds=n + 1), [("normalize", "StepError: empty ticket: nothing to triage")],
                      True, {"tracetune.error_kind": "client"}, "StepError: empty ticket: nothing to triage")
    for n in range(6, 9):  # a dependency failed after retries: server-side, without a kind attribute
        rows += _task(n, NOW - timedelta(seconds=n + 1), [
            ("normalize", ""), ("escalate", "remote model failed, local answer kept: 429"),
            ("create_followup", "StepError: CRM refused after 3 attempts")], True,
            root_message="StepError: CRM refused after 3 attempts")
    for n in range(9, 13):  # the cascade failed but the task succeeded
        rows += _task(n, NOW - timedelta(seconds=n + 1), [("escalate", "remote model failed, local answer kept: 429")],
                      False)
    rows += _task(13, NOW - timedelta(seconds=2), [("normalize", "")], True, {"error.type": "400"})  # no message
    rows += _task(14, NOW - timedelta(seconds=3), [("normalize", "")], False)  # fine
    rows += _task(15, NOW - timedelta(hours=2), [("normalize", "StepError: old")], True)  # outside the window
    client.insert("otel_traces", rows, column_names=COLUMNS)


def test_errors_group_messages_by_step_and_kind(client):
    _seed(client)
    frame = errors(client, since="1h")
    assert list(frame.schema.items()) == list(ERROR_COLUMNS.items())
    got = {(r["step"], r["kind"], r["message"]): (r["count"], r["failed_tasks"]) for r in frame.iter_rows(named=True)}
    assert got == {
        ("normalize", "client", "StepError: empty ticket: nothing to triage"): (6, 6),
        ("escalate", "server", "remote model failed, local answer kept: 429"): (7, 0),  # survived: not failed tasks
        ("create_followup", "server", "StepError: CRM refused after 3 attempts"): (3, 3),
        ("", "client", "(no message)"): (1, 1),  # failed outside every step, a 4xx error.type
    }
    assert frame["count"].to_list() == sorted(frame["count"].to_list(), reverse=True)
    top = frame.row(0, named=True)
    assert top["example_trace_id"] in {f"{n:032x}" for n in range(6, 13)}
    assert NOW - timedelta(seconds=15) <= top["last_seen"] <= NOW

    client_only = errors(client, since="1h", kind="client")
    assert set(client_only["kind"]) == {"client"} and client_only["failed_tasks"].sum() == 7
    assert errors(client, since="1h", pipeline="nope").is_empty()
    assert errors(client, since="3h")["message"].to_list().count("StepError: old") == 1
    with pytest.raises(ValueError, match="error kind must be one of client, server"):
        errors(client, kind="user")


def test_the_rollup_classifies_errors_as_the_analyzer_does(client):
    """tracetune_task_errors_1m (a materialized view) and ERROR_KIND_SQL agree on every kind of failed task."""
    _seed(client)
    by_sql = dict(client.query(f"""
        SELECT {ERROR_KIND_SQL} AS kind, count() FROM otel_traces
        WHERE ParentSpanId = '' AND StatusCode = 'Error' GROUP BY kind""").result_rows)
    by_view = dict(client.query("SELECT error_kind, sum(errors) FROM tracetune_task_errors_1m GROUP BY error_kind")
                   .result_rows)
    assert by_sql == by_view == {"client": 7, "server": 4}

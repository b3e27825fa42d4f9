"""The executor's task API and /metrics as a web page or a careless client would meet them: no token, other
sites' `text/plain` posts, foreign Host names, big, deep and non-Unicode bodies; each a 4xx with one line,
and no task run."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ThreadServer
from tests.surfaces import check_bad_text, check_body_limit, check_browser_origins, check_host_allow_list, raw_request
from tracetune.executor import metrics
from tracetune.executor.api import create_app
from tracetune.executor.pipelines import Pipeline, Step

LIMIT = 64 * 1024
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def error(response: httpx.Response) -> str:
    return response.json()["error"]


def _tasks() -> float:
    return sum(s.value for family in text_string_to_metric_families(_scrape()) for s in family.samples
               if s.name == "tracetune_tasks_total" and s.labels.get("pipeline") == "echo")


def _scrape() -> str:
    from prometheus_client import generate_latest

    return generate_latest().decode()


@pytest.fixture
def executor() -> Iterator[str]:
    pipeline = Pipeline("echo", [Step("noop")], inputs={"text": str})
    with ThreadServer(create_app({pipeline.name: pipeline}, max_in_flight=8, token=TOKEN,
                                 max_body_bytes=LIMIT)) as server:
        yield server.url
    pipeline.close()


def test_task_calls_need_the_token(executor):
    url = f"{executor}/v1/pipelines/echo/tasks"
    before = _tasks()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        answer = httpx.post(url, json={"text": "hi"}, headers=headers)
        assert answer.status_code == 401 and "Bearer <executor token>" in error(answer), headers
        assert answer.headers["www-authenticate"] == "Bearer"
    for token in ("Bearer t0kén".encode("latin-1"), "Bearer ключ".encode(), b"Bearer \xff", b"Bearer t0ken\x80"):
        answer = httpx.post(url, json={"text": "hi"}, headers={"Authorization": token})
        assert answer.status_code == 401, token
    assert _tasks() == before  # nothing ran
    assert httpx.post(url, json={"text": "hi"}, headers=AUTH).status_code == 200
    assert _tasks() == before + 1


def test_an_executor_without_a_token_runs_no_task():
    pipeline = Pipeline("echo", [Step("noop")], inputs={"text": str})
    with ThreadServer(create_app({pipeline.name: pipeline}, token="")) as server:
        answer = httpx.post(f"{server.url}/v1/pipelines/echo/tasks", json={"text": "hi"}, headers=AUTH)
        assert answer.status_code == 403 and "TRACETUNE_EXECUTOR_TOKEN" in error(answer)
    pipeline.close()


def test_a_cross_site_text_plain_post_is_refused(executor):
    """What a page on any site can send without a preflight: a `text/plain` POST, no credentials."""
    url = f"{executor}/v1/pipelines/echo/tasks"
    before = _tasks()
    simple = {"Content-Type": "text/plain", "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
              "Sec-Fetch-Mode": "no-cors"}
    answer = httpx.post(url, content=b'{"text": "hi"}', headers=simple)
    assert answer.status_code == 403 and "evil.example" in error(answer)
    # Even with the token (a script that has it) and without browser headers, text/plain is no JSON.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        answer = httpx.post(url, content=b'{"text": "hi"}', headers={**AUTH, "Content-Type": content_type})
        assert answer.status_code == 415 and "application/json" in error(answer), content_type
    check_browser_origins(url, "POST", error, headers=AUTH, json={"text": "hi"})
    assert _tasks() == before + 1  # only the same-origin call ran


def test_every_route_answers_only_to_this_servers_names(executor):
    check_host_allow_list(f"{executor}/health", message=error)
    check_host_allow_list(f"{executor}/metrics", message=error)
    check_host_allow_list(f"{executor}/v1/pipelines/echo/tasks", "POST", error, headers=AUTH, json={"text": "hi"})


def test_bodies_past_the_limit_are_413(executor):
    url = f"{executor}/v1/pipelines/echo/tasks"
    before = _tasks()
    check_body_limit(url, LIMIT, error, AUTH)
    reply = raw_request(url, b"POST /v1/pipelines/echo/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nAuthorization: Bearer t0ken\r\nContent-Length: %d\r\n\r\n{"
                        % (100 * 1000 * 1000))
    assert reply.startswith(b"HTTP/1.1 413") and b"65536-byte limit" in reply
    assert _tasks() == before


def test_text_that_is_not_unicode_and_deep_json_are_400(executor):
    url = f"{executor}/v1/pipelines/echo/tasks"
    before = _tasks()
    check_bad_text(url, error, AUTH, fields={
        "surrogate in task_id": b'{"text": "hi", "task_id": "\\ud800"}',
        "surrogate in tenant": b'{"text": "hi", "tenant": "\\udc00x"}',
        "surrogate in a nested input": b'{"text": "hi", "extra": {"a": ["\\ud800"]}}',
    })
    assert _tasks() == before
    emoji = httpx.post(url, content=b'{"text": "\\ud83d\\ude00", "task_id": "t-\\ud83d\\ude00"}',
                       headers={**AUTH, "Content-Type": "application/json"})
    assert emoji.status_code == 200 and emoji.json()["task_id"] == "t-\N{GRINNING FACE}"


def test_metrics_are_served_at_metrics_itself(executor):
    metrics.TASKS_TOTAL.labels("echo", "ok").inc(0)
    plain = httpx.get(f"{executor}/metrics")
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "tracetune_tasks_total" in plain.text and "_created" not in plain.text
    open_metrics = httpx.get(f"{executor}/metrics", headers={"Accept": "application/openmetrics-text"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")

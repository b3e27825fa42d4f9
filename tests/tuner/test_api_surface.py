"""The tuner API as a web page or a careless client would meet it: foreign Host names, other sites, big and
broken bodies, bad tokens, absurd SLOs; each refused with a 4xx and one line, nothing stored."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ThreadServer
from tests.surfaces import check_bad_text, check_body_limit, check_browser_origins, check_host_allow_list, raw_request
from tests.tuner.test_api import SPEC, TOKEN, Tuner
from tracetune import store
from tracetune.tuner.api import create_app

LIMIT = 64 * 1024
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def detail(response: httpx.Response) -> str:
    return response.json()["detail"]


@pytest.fixture
def tuner(db_settings) -> Iterator[Tuner]:
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret", max_body_bytes=LIMIT)
    with ThreadServer(app) as server:
        tuner = Tuner(server.url, store.connect(db_settings, ensure_schema=False))
        assert tuner.register().status_code == 200
        yield tuner


def stored(tuner: Tuner) -> tuple:
    """Everything a write could leave behind."""
    return tuple(tuner.rows(f"SELECT count() FROM {table}")[0][0] for table in (
        "tracetune_config_versions", "tracetune_decisions", "tracetune_slos", "tracetune_feedback"))


def test_reads_and_writes_answer_only_to_this_servers_names(tuner):
    before = stored(tuner)
    for path in ("/v1/pipelines", "/v1/pipelines/triage/config", "/v1/pipelines/triage/decisions", "/v1/alerts",
                 "/metrics", "/docs", "/openapi.json"):
        check_host_allow_list(f"{tuner.url}{path}", message=None if path in ("/docs",) else detail)
    check_host_allow_list(f"{tuner.url}/v1/pipelines/triage/config", "PATCH", detail, headers=TOKEN,
                          json={"steps": {"classify": {"batch_max_size": 9}}})
    after = stored(tuner)
    assert after[0] == before[0] + 1 and after[2:] == before[2:]  # one version from the own-name PATCHes


def test_other_sites_pages_are_refused_even_with_a_token(tuner):
    before = stored(tuner)
    check_browser_origins(f"{tuner.url}/v1/pipelines/triage/config", "GET", detail)
    check_browser_origins(f"{tuner.url}/v1/pipelines/triage/freeze", "POST", detail, headers=TOKEN, json={})
    assert stored(tuner)[2:] == before[2:]
    # A link to /docs from another site opens: a top-level navigation cannot be read by the page that linked.
    navigate = httpx.get(f"{tuner.url}/docs", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert navigate.status_code == 200
    form = httpx.post(f"{tuner.url}/v1/pipelines/triage/freeze", content=b"reason=x",
                      headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                               "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 403  # a cross-site form post is no navigation we let through


def test_bodies_past_the_limit_are_413_and_not_stored(tuner):
    before = stored(tuner)
    for path, method in (("config", "PATCH"), ("config", "POST"), ("slo", "PUT"), ("feedback", "POST"),
                         ("freeze", "POST")):
        check_body_limit(f"{tuner.url}/v1/pipelines/triage/{path}", LIMIT, detail, TOKEN, method)
    assert stored(tuner) == before


def test_the_default_limit_refuses_a_100_mib_patch_before_reading_it(db_settings):
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as server:
        url = f"{server.url}/v1/pipelines/triage/config"
        reply = raw_request(url, b"PATCH /v1/pipelines/triage/config HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Authorization: Bearer s3cret\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n{" % (100 * 1024 * 1024))
        assert reply.startswith(b"HTTP/1.1 413") and b"1048576-byte limit" in reply, reply[:300]
        check_body_limit(url, 1024 * 1024, detail, TOKEN, "PATCH")


def test_reasons_are_sentences_not_documents(tuner):
    before = stored(tuner)
    long = "x" * 2001
    for method, path, body in (("PATCH", "config", {"steps": {"classify": {"batch_max_size": 9}}, "reason": long}),
                               ("POST", "config", {"steps": {}, "reason": long}),
                               ("POST", "rollback", {"reason": long}), ("POST", "freeze", {"reason": long})):
        answer = httpx.request(method, f"{tuner.url}/v1/pipelines/triage/{path}", json=body, headers=TOKEN)
        assert answer.status_code == 422 and "2000" in detail(answer), (path, answer.text[:200])
    assert stored(tuner) == before


def test_text_that_is_not_unicode_is_400_with_a_message(tuner):
    before = stored(tuner)
    url = f"{tuner.url}/v1/pipelines/triage"
    check_bad_text(f"{url}/config", detail, TOKEN, "PATCH", fields={
        "surrogate in reason": b'{"steps": {"classify": {"batch_max_size": 9}}, "reason": "\\ud800"}'})
    check_bad_text(f"{url}/freeze", detail, TOKEN, fields={"surrogate in reason": b'{"reason": "\\udfff"}'})
    check_bad_text(f"{url}/feedback", detail, TOKEN, fields={
        "surrogate in label": b'{"trace_id": "%s", "label": "\\ud83d"}' % TRACE.encode(),
        "surrogate in a list": b'[{"trace_id": "%s", "label": "ok", "source": "\\udc80"}]' % TRACE.encode()})
    check_bad_text(f"{url}/slo", detail, TOKEN, "PUT")
    assert stored(tuner) == before
    # A whole emoji (a surrogate pair in JSON) is text like any other.
    fine = httpx.post(f"{url}/feedback", headers=TOKEN,
                      content=b'{"trace_id": "%s", "label": "\\ud83d\\ude00"}' % TRACE.encode())
    assert fine.status_code == 415  # no Content-Type: refused for that, not for the text
    fine = httpx.post(f"{url}/feedback", headers={**TOKEN, "Content-Type": "application/json"},
                      content=b'{"trace_id": "%s", "label": "\\ud83d\\ude00"}' % TRACE.encode())
    assert fine.status_code == 200, fine.text
    assert tuner.rows("SELECT label FROM tracetune_feedback") == [("\N{GRINNING FACE}",)]


@pytest.mark.parametrize("token", ["Bearer s3crét".encode("latin-1"), "Bearer ключ".encode(), b"Bearer \xff\xfe",
                                   b"Bearer s3cret\xc3\xa9", b"bearer  s3cret\x80"])
def test_a_token_that_is_not_ascii_is_401_not_500(tuner, token):
    answer = httpx.patch(f"{tuner.url}/v1/pipelines/triage/config", headers={"Authorization": token},
                         json={"steps": {"classify": {"batch_max_size": 9}}})
    assert answer.status_code == 401 and "Bearer" in detail(answer)


def test_only_json_bodies_are_taken(tuner):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        answer = httpx.patch(f"{tuner.url}/v1/pipelines/triage/config", headers={**TOKEN, "Content-Type": content_type},
                             content=b'{"steps": {"classify": {"batch_max_size": 9}}}')
        assert answer.status_code == 415 and "application/json" in detail(answer), content_type
    typed = httpx.patch(f"{tuner.url}/v1/pipelines/triage/config", json={"steps": {"classify": {"batch_max_size": 9}}},
                        headers={**TOKEN, "Content-Type": "application/merge-patch+json"})
    assert typed.status_code == 200


@pytest.mark.parametrize("slo, field", [
    ({"p95_ms": 1e308}, "p95_ms"), ({"p99_ms": 1e300}, "p99_ms"), ({"p95_ms": 86_400_001}, "p95_ms"),
    ({"cost_per_1k": 1e308}, "cost_per_1k"), ({"cost_per_1k": 1e10}, "cost_per_1k"), ({"p95_ms": -1}, "p95_ms"),
])
def test_slo_values_outside_sane_bounds_are_422(tuner, slo, field):
    before = stored(tuner)
    for method in ("PUT", "PATCH"):
        answer = httpx.request(method, f"{tuner.url}/v1/pipelines/triage/slo", json=slo, headers=TOKEN)
        assert answer.status_code == 422 and f"`{field}`" in detail(answer), answer.text
    declared = httpx.put(f"{tuner.url}/v1/pipelines/odd/spec", headers=TOKEN, json={**SPEC.to_dict(), "slo": slo})
    assert declared.status_code == 422 and f"`{field}`" in detail(declared)
    assert stored(tuner) == before
    fine = httpx.put(f"{tuner.url}/v1/pipelines/triage/slo", json={"p95_ms": 86_400_000, "cost_per_1k": 1e9},
                     headers=TOKEN)
    assert fine.status_code == 200


def test_metrics_are_served_at_metrics_itself_without_created_series(tuner):
    plain = httpx.get(f"{tuner.url}/metrics")  # no redirect to follow
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family.type for family in text_string_to_metric_families(plain.text)}
    assert "tracetune_tuner_decisions" in families
    assert not [name for name in families if name.endswith("_created")]
    assert "_created" not in plain.text
    open_metrics = httpx.get(f"{tuner.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    assert httpx.get(f"{tuner.url}/metrics/").status_code in (307, 404)  # the old path is no second endpoint

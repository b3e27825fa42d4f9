"""The decision audit and tuner state over a real store; pin, rollback, freeze, feedback, /metrics and
the offline /docs through a real tuner server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import urljoin, urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ThreadServer
from tests.tuner.test_api import REFUSED_PATCHES, SPEC, TOKEN, Tuner
from tracetune import store
from tracetune.tuner import decisions
from tracetune.tuner.api import create_app
from tracetune.tuner.config import Knob, PipelineConfig
from tracetune.tuner.decisions import Decision, TunerState

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def tuner(db_settings) -> Iterator[Tuner]:
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as server:
        yield Tuner(server.url, store.connect(db_settings, ensure_schema=False))


def post(tuner: Tuner, path: str, body=None, pipeline: str = "triage", headers: dict | None = TOKEN) -> httpx.Response:
    return httpx.post(f"{tuner.url}/v1/pipelines/{pipeline}/{path}", json=body, headers=headers, timeout=30)


def get(tuner: Tuner, path: str, pipeline: str = "triage", **params) -> httpx.Response:
    return httpx.get(f"{tuner.url}/v1/pipelines/{pipeline}/{path}", params=params, timeout=30)


def served(response: httpx.Response) -> dict:
    """A config answer as the audit keeps it: without the canary and shadow parts (there are none in these tests)."""
    body = response.json()
    assert body.pop("canary") is None and body.pop("shadow") is None
    return body


def config_v(version: int, size: int) -> dict:
    return PipelineConfig("triage", version, {"classify": {"batch_max_size": size}}).to_dict()


# ---- decisions.py over the store --------------------------------------------------------------------

def test_record_observe_history_round_trip(client):
    at = datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    first = Decision("triage", "tune", 1, 2, config_v(1, 8), config_v(2, 16), "p95 over SLO",
                     predicted={"p95_ms": 410.5, "cost_per_1k": 0.12}, decided_at=at)
    # Two decisions in the same microsecond keep the order they were recorded in.
    second = Decision("triage", "canary_start", 2, 2, config_v(2, 16), config_v(2, 16), "canary 10%", decided_at=at)
    third = Decision("triage", "pin", 2, 3, config_v(2, 16), config_v(3, 32), "by hand", author="api")
    other = Decision("other", "tune", 1, 2, {}, {}, "elsewhere")
    for decision in (first, second, third, other):
        decisions.record(client, decision)

    decisions.observe(client, first.decision_id, {"p95_ms": 430.0, "cost_per_1k": 0.13})
    decisions.observe(client, first.decision_id, {"p95_ms": 420})  # later: this metric's value wins

    found = decisions.history(client, "triage")
    assert [d["decision_id"] for d in found] == [third.decision_id, second.decision_id, first.decision_id]
    oldest = found[-1]
    assert {k: v for k, v in oldest.items() if k != "observed"} == {
        "pipeline": "triage", "kind": "tune", "version_before": 1, "version_after": 2,
        "config_before": config_v(1, 8), "config_after": config_v(2, 16), "reason": "p95 over SLO",
        "predicted": {"p95_ms": 410.5, "cost_per_1k": 0.12}, "author": "tuner", "decision_id": first.decision_id,
        "decided_at": at, "summary": "p95 over SLO", "details": ""}
    assert oldest["observed"] == {"p95_ms": 420.0, "cost_per_1k": 0.13}
    assert found[0]["observed"] == {} and found[0]["author"] == "api" and found[0]["predicted"] == {}
    assert found[0]["decided_at"] == third.decided_at

    assert [d["decision_id"] for d in decisions.history(client, "triage", limit=1)] == [third.decision_id]
    assert decisions.last_decision(client, "triage")["decision_id"] == third.decision_id
    assert decisions.last_decision(client, "triage", ("tune", "rollback"))["observed"]["p95_ms"] == 420.0
    assert decisions.last_decision(client, "triage", ("freeze",)) is None
    assert decisions.last_decision(client, "nope") is None
    assert [d["decision_id"] for d in decisions.history(client, "other")] == [other.decision_id]

    with pytest.raises(LookupError, match="no decision 'missing'"):
        decisions.observe(client, "missing", {"p95_ms": 1})
    with pytest.raises(ValueError, match="kind 'guess'"):
        Decision("triage", "guess", 1, 1, {}, {}, "")
    with pytest.raises(ValueError, match="timezone"):
        Decision("triage", "tune", 1, 1, {}, {}, "", decided_at=datetime(2025, 1, 1))


def test_state_latest_wins(client):
    assert decisions.state(client, "triage") == TunerState()
    for frozen, pinned in ((True, False), (True, True), (False, True), (False, False), (True, False)):
        answered = decisions.set_state(client, "triage", frozen=frozen, pinned=pinned, author="me", reason=f"{frozen}")
        assert answered == TunerState(frozen, pinned, f"{frozen}", "me")
        assert decisions.state(client, "triage") == answered  # written back to back, the last one wins
    assert decisions.state(client, "other") == TunerState()


# ---- the API ------------------------------------------------------------------------------------------

def test_registration_and_patch_are_audited(tuner):
    tuner.register()
    [declared] = get(tuner, "decisions").json()
    assert (declared["kind"], declared["version_before"], declared["version_after"]) == ("declaration", 0, 1)
    assert declared["config_before"] == {} and declared["reason"] == "declared defaults"
    tuner.register()  # unchanged: no new version, no new decision
    assert len(get(tuner, "decisions").json()) == 1

    assert tuner.patch({"steps": {"classify": {"batch_max_size": 16}}, "reason": "evening peak"}).json()["version"] == 2
    assert tuner.patch({"steps": {"classify": {"batch_max_size": 16}}}).json()["version"] == 2  # no change
    change, _ = get(tuner, "decisions").json()
    assert (change["kind"], change["author"], change["reason"]) == ("change", "api", "evening peak")
    assert (change["version_before"], change["version_after"]) == (1, 2)
    assert change["config_before"]["steps"]["classify"]["batch_max_size"] == 8
    assert change["config_after"]["steps"]["classify"]["batch_max_size"] == 16
    assert get(tuner, "state").json() == {"pipeline": "triage", "frozen": False, "pinned": False, "reason": "",
                                          "author": ""}  # PATCH does not pin

    wider = replace(SPEC, steps={**SPEC.steps, "escalate": {"cascade_threshold": Knob("float", 0.45, 0, 1),
                                                            "max_tokens": Knob("int", 256, 1, 4096)}})
    assert tuner.register(wider).json()["version"] == 3
    latest = get(tuner, "decisions", limit=1).json()
    assert len(latest) == 1 and latest[0]["kind"] == "declaration" and "escalate.max_tokens" in latest[0]["reason"]
    assert get(tuner, "decisions", limit=0).status_code == 422
    assert get(tuner, "decisions", pipeline="nope").status_code == 404


def test_pin_sets_the_next_version_and_holds_it(tuner):
    tuner.register()
    for steps, field in REFUSED_PATCHES:
        refused = post(tuner, "config", {"steps": steps})
        assert refused.status_code == 422 and refused.json()["detail"].startswith(field), refused.json()
    for body in ({}, {"steps": [1]}, {"steps": {}, "reason": 3}, {"steps": {}, "extra": 1}, [1]):
        refused = post(tuner, "config", body)
        assert refused.status_code == 422 and isinstance(refused.json()["detail"], str), body
    assert tuner.rows("SELECT count() FROM tracetune_config_versions") == [(1,)]
    assert get(tuner, "state").json()["pinned"] is False  # nothing refused left a trace
    assert post(tuner, "config", {"steps": {"classify": {"batch_max_size": 32}}}, pipeline="nope").status_code == 404

    pinned = post(tuner, "config", {"steps": {"classify": {"batch_max_size": 32}}, "reason": "hold for the audit"})
    assert pinned.status_code == 200 and pinned.headers["etag"] == '"triage-v2"'
    config = PipelineConfig.from_dict(pinned.json())
    assert config.version == 2 and config.knob("classify", "batch_max_size") == 32
    assert config.knob("escalate", "cascade_threshold") == 0.45  # other knobs keep their values
    assert httpx.get(f"{tuner.url}/v1/pipelines/triage/config").json() == pinned.json()
    assert get(tuner, "state").json() == {"pipeline": "triage", "frozen": False, "pinned": True,
                                          "reason": "hold for the audit", "author": "api"}
    pin = get(tuner, "decisions").json()[0]
    assert (pin["kind"], pin["author"], pin["version_before"], pin["version_after"]) == ("pin", "api", 1, 2)
    assert pin["config_after"] == served(pinned) and pin["reason"] == "hold for the audit"

    held = post(tuner, "config", {"steps": {}})  # pin what is in force: no new version
    assert held.status_code == 200 and held.json()["version"] == 2
    assert [d["kind"] for d in get(tuner, "decisions").json()] == ["pin", "pin", "declaration"]

    unfrozen = post(tuner, "unfreeze", {"reason": "done"})
    assert unfrozen.json() == {"pipeline": "triage", "frozen": False, "pinned": False, "reason": "done",
                               "author": "api"}


def test_rollback_to_an_explicit_and_to_the_previous_version(tuner):
    tuner.register()
    v1 = served(httpx.get(f"{tuner.url}/v1/pipelines/triage/config"))
    missing = post(tuner, "rollback")
    assert missing.status_code == 404 and "no version before 1" in missing.json()["detail"]
    v2 = served(tuner.patch({"steps": {"classify": {"batch_max_size": 16, "route_weights": {"b": 1}}}}))
    v3 = served(tuner.patch({"steps": {"classify": {"batch_max_size": 64}}}))

    back = post(tuner, "rollback", {"version": 1, "reason": "p95 regressed"})
    assert back.status_code == 200 and back.headers["etag"] == '"triage-v4"'
    assert served(back) == {**v1, "version": 4}
    assert get(tuner, "state").json() == {"pipeline": "triage", "frozen": True, "pinned": False,
                                          "reason": "p95 regressed", "author": "api"}
    row = get(tuner, "decisions").json()[0]
    assert (row["kind"], row["version_before"], row["version_after"], row["reason"]) == ("rollback", 3, 4,
                                                                                         "p95 regressed")
    assert row["config_before"] == v3 and row["config_after"] == served(back)

    previous = post(tuner, "rollback")  # no body: the version before the current one (3)
    assert previous.status_code == 200 and served(previous) == {**v3, "version": 5}
    assert get(tuner, "decisions").json()[0]["reason"] == "rolled back to version 3"
    again = post(tuner, "rollback", {"version": 2})
    assert served(again) == {**v2, "version": 6}

    for version, status in ((99, 404), (0, 422), ("x", 422)):
        refused = post(tuner, "rollback", {"version": version})
        assert refused.status_code == status, version
        assert isinstance(refused.json()["detail"], str)
    assert "no version 99; its versions are 1 to 6" in post(tuner, "rollback", {"version": 99}).json()["detail"]
    assert post(tuner, "rollback", {"version": 1}, pipeline="nope").status_code == 404

    # The declaration narrows batch_max_size: version 6's 16 still fits, version 3's 64 no longer does.
    narrow = replace(SPEC, steps={**SPEC.steps, "classify": {**SPEC.steps["classify"],
                                                             "batch_max_size": Knob("int", 8, 1, 32, "items")}})
    assert tuner.register(narrow).json()["version"] == 6
    conflict = post(tuner, "rollback", {"version": 3})
    assert conflict.status_code == 409
    assert conflict.json()["detail"].startswith(
        "version 3 no longer fits the declaration (steps.classify.batch_max_size")
    assert tuner.rows("SELECT max(version) FROM tracetune_config_versions") == [(6,)]
    assert get(tuner, "decisions").json()[0]["kind"] == "rollback"  # nothing recorded for the refusal


def test_freeze_and_unfreeze(tuner):
    tuner.register()
    assert post(tuner, "freeze", pipeline="nope").status_code == 404
    assert get(tuner, "state", pipeline="nope").status_code == 404
    frozen = post(tuner, "freeze", {"reason": "incident 42"})
    assert frozen.status_code == 200
    assert frozen.json() == {"pipeline": "triage", "frozen": True, "pinned": False, "reason": "incident 42",
                             "author": "api"}
    assert get(tuner, "state").json() == frozen.json()
    post(tuner, "config", {"steps": {"classify": {"batch_max_size": 16}}})
    assert get(tuner, "state").json()["frozen"] is True and get(tuner, "state").json()["pinned"] is True
    assert post(tuner, "freeze", {"reason": 1}).status_code == 422

    unfrozen = post(tuner, "unfreeze")  # no body: a default reason
    assert unfrozen.json() == {"pipeline": "triage", "frozen": False, "pinned": False, "reason": "unfreeze by API",
                               "author": "api"}
    kinds = [(d["kind"], d["version_before"], d["version_after"]) for d in get(tuner, "decisions").json()]
    assert kinds == [("unfreeze", 2, 2), ("pin", 1, 2), ("freeze", 1, 1), ("declaration", 0, 1)]


def test_every_write_needs_the_token(tuner):
    tuner.register()
    writes = [("PUT", "spec", SPEC.to_dict()), ("PATCH", "config", {"steps": {"classify": {"batch_max_size": 16}}}),
              ("POST", "config", {"steps": {"classify": {"batch_max_size": 16}}}), ("POST", "rollback", None),
              ("POST", "freeze", None), ("POST", "unfreeze", None), ("PUT", "slo", {"p95_ms": 300}),
              ("POST", "feedback", {"trace_id": TRACE, "label": "billing"})]
    for method, path, body in writes:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = httpx.request(method, f"{tuner.url}/v1/pipelines/triage/{path}", json=body, headers=headers)
            assert refused.status_code == 401, (method, path, headers)
            assert refused.headers["www-authenticate"] == "Bearer"
    assert tuner.rows("SELECT count() FROM tracetune_decisions") == [(1,)]  # the registration only
    assert tuner.rows("SELECT count() FROM tracetune_tuner_state") == [(0,)]
    assert tuner.rows("SELECT count() FROM tracetune_feedback") == [(0,)]
    assert tuner.rows("SELECT count() FROM tracetune_config_versions") == [(1,)]


def test_feedback_is_stored_and_bad_items_are_named(tuner):
    tuner.register()
    one = post(tuner, "feedback", {"trace_id": TRACE.upper(), "label": "billing"})
    assert one.status_code == 200 and one.json() == {"pipeline": "triage", "stored": 1}
    many = [{"trace_id": f"{i + 1:032x}", "label": "outage", "step": "classify", "source": "agent-ui"}
            for i in range(1000)]
    assert post(tuner, "feedback", many).json() == {"pipeline": "triage", "stored": 1000}
    assert tuner.rows(f"SELECT pipeline, trace_id, step, label, source FROM tracetune_feedback "
                      f"WHERE trace_id = '{TRACE}'") == [("triage", TRACE, "", "billing", "")]
    assert tuner.rows("SELECT count(), uniqExact(trace_id) FROM tracetune_feedback WHERE step = 'classify' "
                      "AND source = 'agent-ui' AND label = 'outage'") == [(1000, 1000)]

    good = {"trace_id": TRACE, "label": "billing"}
    refused = [  # body, what its 422 names
        ([good, good, good, {**good, "trace_id": "xyz"}], "[3].trace_id"),
        ([good, {**good, "trace_id": "0" * 32}], "[1].trace_id"),
        ([good, {"trace_id": TRACE}], "[1].label"),
        ([{**good, "label": ""}], "[0].label"),
        ([{**good, "label": 7}], "[0].label"),
        ([{**good, "step": "nope"}], "[0].step"),
        ([{**good, "source": ["x"]}], "[0].source"),
        ([{**good, "tenant": "a"}], "[0].tenant"),
        ([good, "billing"], "[1]"),
        ({**good, "trace_id": TRACE[:-1]}, "trace_id"),
        ({"label": "billing"}, "trace_id"),
        ([], "send 1 to 1000"),
        ([good] * 1001, "send 1 to 1000"),
        ("billing", "body"),
    ]
    for body, named in refused:
        answer = post(tuner, "feedback", body)
        assert answer.status_code == 422, body
        assert answer.json()["detail"].startswith(named), answer.json()["detail"]
    url = f"{tuner.url}/v1/pipelines/triage/feedback"
    garbled = httpx.post(url, content=b"[{", headers={**TOKEN, "Content-Type": "application/json"})
    assert garbled.status_code == 422 and garbled.json()["detail"].startswith("body is not valid JSON")
    untyped = httpx.post(url, content=b'{"trace_id": "%s", "label": "x"}' % TRACE.encode(), headers=TOKEN)
    assert untyped.status_code == 415 and "Content-Type: application/json" in untyped.json()["detail"]
    assert post(tuner, "feedback", good, pipeline="nope").status_code == 404
    assert tuner.rows("SELECT count() FROM tracetune_feedback") == [(1001,)]  # nothing from refused calls


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_decisions_and_show_the_served_version(tuner):
    url = f"{tuner.url}/metrics"
    before = _metric(httpx.get(url, follow_redirects=True).text, "tracetune_tuner_decisions_total",
                     pipeline="triage", kind="pin")
    tuner.register()
    post(tuner, "config", {"steps": {"classify": {"batch_max_size": 32}}})
    post(tuner, "config", {"steps": {"classify": {"batch_max_size": 64}}})
    scraped = httpx.get(url, follow_redirects=True)
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert _metric(scraped.text, "tracetune_tuner_decisions_total", pipeline="triage", kind="pin") == before + 2
    assert _metric(scraped.text, "tracetune_tuner_config_version", pipeline="triage") == 3

    decisions.CONFIG_VERSION.labels("triage").set(0)
    httpx.get(f"{tuner.url}/v1/pipelines/triage/config")  # a read sets it too
    assert _metric(httpx.get(url, follow_redirects=True).text, "tracetune_tuner_config_version",
                   pipeline="triage") == 3


def test_docs_load_their_assets_from_the_tuner_itself(tuner):
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{tuner.url}{page}")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://|//[a-z]", html.text, re.IGNORECASE), page  # no CDN, no other host
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert any(a.endswith(".js") for a in assets), assets
        for asset in assets:
            url = urljoin(f"{tuner.url}{page}", asset)
            assert urlparse(url).netloc == urlparse(tuner.url).netloc
            answer = httpx.get(url)
            assert answer.status_code == 200, asset
            kind = answer.headers["content-type"]
            expected = {".js": "javascript", ".css": "text/css", ".png": "image/png"}[asset[asset.rindex("."):]]
            assert expected in kind and len(answer.content) > 1000, (asset, kind)
    assert '"validatorUrl": null' in httpx.get(f"{tuner.url}/docs").text


def test_openapi_documents_the_new_paths_with_their_errors(tuner):
    spec = httpx.get(f"{tuner.url}/openapi.json").json()
    paths = spec["paths"]
    expected = {  # path, method: error codes documented
        ("/v1/pipelines/{pipeline}/decisions", "get"): {"404", "422"},
        ("/v1/pipelines/{pipeline}/config", "post"): {"401", "403", "404", "422"},
        ("/v1/pipelines/{pipeline}/config", "patch"): {"401", "403", "404", "422"},
        ("/v1/pipelines/{pipeline}/config", "get"): {"304", "404"},
        ("/v1/pipelines/{pipeline}/rollback", "post"): {"401", "403", "404", "409", "422"},
        ("/v1/pipelines/{pipeline}/freeze", "post"): {"401", "404", "422"},
        ("/v1/pipelines/{pipeline}/unfreeze", "post"): {"401", "404", "422"},
        ("/v1/pipelines/{pipeline}/state", "get"): {"404"},
        ("/v1/pipelines/{pipeline}/feedback", "post"): {"401", "404", "422"},
    }
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, method, set(responses))
        for code in codes - {"304"}:
            assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        assert "200" in responses
    schemas = spec["components"]["schemas"]
    assert {"Config", "DecisionRow", "State", "Error", "PinBody", "RollbackBody"} <= set(schemas)
    assert paths["/v1/pipelines/{pipeline}/decisions"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]["items"] == {"$ref": "#/components/schemas/DecisionRow"}
    feedback = paths["/v1/pipelines/{pipeline}/feedback"]["post"]["requestBody"]["content"]["application/json"]
    assert len(feedback["schema"]["oneOf"]) == 2
    assert not any(p.startswith("/metrics") or p.startswith("/docs") for p in paths)


def test_a_decision_leads_with_one_sentence_of_rounded_figures():
    from tracetune.tuner.decisions import describe_change, sentence

    action = describe_change("escalate", "route_weights", {"small": 0.7, "large": 0.3}, {"small": 1.0, "large": 0.0})
    assert action == "Sent more of escalate to small (0.70 -> 1.00 of its traffic)"
    text = sentence([action], {"cost_per_1k": 0.0075, "quality": 0.941, "p95_ms": 180.4},
                    {"cost_per_1k": 0.0054, "quality": 0.93612}, {"p95_ms": 500.0, "quality_floor": 0.93})
    assert text == ("Sent more of escalate to small (0.70 -> 1.00 of its traffic): -0.0021 USD per 1k (-28%), "
                    "quality 0.936 against the 0.93 floor, p95 unchanged at 180 ms (target 500 ms)")
    assert "{" not in text and "\n" not in text
    two = sentence([describe_change("escalate", "cascade_threshold", 0.6, 0.45),
                    describe_change("classify", "cache_enabled", False, True)], {"p95_ms": 620.0}, {"p95_ms": 300.0},
                   {"p95_ms": 500.0})
    assert two == ("Escalated fewer tasks (escalate threshold 0.6 -> 0.45); turned classify's cache on: "
                   "p95 620 -> 300 ms (target 500 ms)")


def test_tuner_history_lists_each_decision_in_a_sentence_with_predicted_against_observed(tmp_path, db_settings,
                                                                                          client):
    import json as json_mod
    import os
    import subprocess
    import sys

    from tracetune.tuner import versions
    from tracetune.tuner.config import Knob, PipelineSpec

    versions.register(client, PipelineSpec("triage", {"escalate": {"cascade_threshold": Knob("float", 0.6, 0, 1)}}))
    reason = ("Escalated fewer tasks (escalate threshold 0.6 -> 0.45): -0.0021 USD per 1k (-28%), quality 0.936 "
              "against the 0.93 floor, p95 unchanged at 180 ms (target 500 ms)\nescalate: cheapest threshold ...")
    tuned = Decision("triage", "tune", 1, 2, config_v(1, 8), config_v(2, 8), reason,
                     predicted={"before.cost_per_1k": 0.0075, "cost_per_1k": 0.0054, "before.p95_ms": 180.4,
                                "quality": 0.93612, "evidence.rate": 15.0})
    decisions.record(client, tuned)
    decisions.observe(client, tuned.decision_id, {"cost_per_1k": 0.00561, "p95_ms": 176.0, "quality": 0.9391})
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}, **db_settings.as_env(),
           "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tracetune", "tuner", "history", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    table = run("--pipeline", "triage")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100 and "…" not in table.stdout, table.stdout
    text = " ".join(" ".join(line.strip("│ ").split()) for line in lines)
    assert "Escalated fewer tasks" in text and "cheapest threshold" not in text  # the sentence, not the workings
    assert "cost/1k 0.0075 -> 0.0054 / 0.0056" in table.stdout and "p95 ms 180 -> - / 176" in table.stdout
    assert "quality - -> 0.936 / 0.939" in table.stdout
    (row,) = json_mod.loads(run("--pipeline", "triage", "--json").stdout)
    assert row["summary"] == reason.split("\n")[0] and row["kind"] == "tune"
    assert row["figures"]["cost_per_1k"] == {"before": 0.0075, "predicted": 0.0054, "observed": 0.00561}
    unknown = run("--pipeline", "nope")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith("Error: unknown pipeline 'nope'"), unknown.stderr

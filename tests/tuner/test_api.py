"""Tuner API over a real store: registration, config with ETag / If-None-Match, PATCH by knob name, SLOs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import httpx
import pytest

from tests.servers import ThreadServer
from tracetune import store
from tracetune.analyzer import SLO, save_slo
from tracetune.tuner import versions
from tracetune.tuner.api import create_app
from tracetune.tuner.config import Knob, PipelineConfig, PipelineSpec

TOKEN = {"Authorization": "Bearer s3cret"}
SPEC = PipelineSpec("triage", {
    "clean": {},
    "classify": {"batch_max_size": Knob("int", 8, 1, 1024, "items"),
                 "route_weights": Knob("weights", {"a": 0.5, "b": 0.5}),
                 "cache_enabled": Knob("bool", True)},
    "escalate": {"cascade_threshold": Knob("float", 0.45, 0, 1)},
}, {"p95_ms": 500.0})


@dataclass
class Tuner:
    url: str
    client: store.Client

    def register(self, spec: PipelineSpec = SPEC, headers: dict | None = TOKEN) -> httpx.Response:
        return httpx.put(f"{self.url}/v1/pipelines/{spec.pipeline}/spec", json=spec.to_dict(), headers=headers)

    def patch(self, body, pipeline: str = "triage", headers: dict | None = TOKEN) -> httpx.Response:
        return httpx.patch(f"{self.url}/v1/pipelines/{pipeline}/config", json=body, headers=headers, timeout=30)

    def rows(self, sql: str) -> list[tuple]:
        return self.client.query(sql).result_rows


@pytest.fixture
def tuner(db_settings) -> Iterator[Tuner]:
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as server:
        yield Tuner(server.url, store.connect(db_settings, ensure_schema=False))


def test_registration_serves_the_declared_defaults_with_etag(tuner):
    assert tuner.register(headers=None).status_code == 401
    assert tuner.register(headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{tuner.url}/v1/pipelines").json() == []  # nothing stored by a refused call

    registered = tuner.register()
    assert registered.status_code == 200
    served = PipelineConfig.from_dict(registered.json())
    assert served == SPEC.defaults() and served.version == 1
    assert registered.headers["etag"] == served.etag
    assert versions.latest(tuner.client, "triage") == served  # stored in ClickHouse

    url = f"{tuner.url}/v1/pipelines/triage/config"
    first = httpx.get(url)
    assert first.status_code == 200 and first.headers["etag"] == served.etag
    assert PipelineConfig.from_dict(first.json()) == served
    again = httpx.get(url, headers={"If-None-Match": served.etag})
    assert again.status_code == 304 and again.content == b""

    # A version written to ClickHouse by someone else is what the next poll gets.
    newer = replace(served, version=2, steps={**served.steps, "classify": {**served.steps["classify"],
                                                                           "batch_max_size": 32}})
    versions.save_next(tuner.client, newer, author="test", reason="bigger batches")
    changed = httpx.get(url, headers={"If-None-Match": served.etag})
    assert changed.status_code == 200 and changed.headers["etag"] == newer.etag != served.etag
    assert PipelineConfig.from_dict(changed.json()).knob("classify", "batch_max_size") == 32

    assert PipelineSpec.from_dict(httpx.get(f"{tuner.url}/v1/pipelines/triage/spec").json()) == SPEC
    listed = httpx.get(f"{tuner.url}/v1/pipelines").json()
    assert [(p["pipeline"], p["version"]) for p in listed] == [("triage", 2)]

    for path in ("config", "spec"):
        missing = httpx.get(f"{tuner.url}/v1/pipelines/nope/{path}")
        assert missing.status_code == 404
        assert "'nope'" in missing.json()["detail"] and "known: triage" in missing.json()["detail"]
    paths = httpx.get(f"{tuner.url}/openapi.json").json()["paths"]
    assert {"/v1/pipelines/{pipeline}/spec", "/v1/pipelines/{pipeline}/config", "/v1/pipelines/{pipeline}/slo"} \
        <= set(paths)


def test_re_registration_keeps_the_version_and_a_changed_declaration_reconciles(tuner):
    assert tuner.register().json()["version"] == 1
    again = tuner.register()
    assert again.status_code == 200 and again.json()["version"] == 1 and again.headers["etag"] == '"triage-v1"'
    assert tuner.rows("SELECT count() FROM tracetune_pipeline_specs") == [(1,)]
    assert tuner.rows("SELECT count() FROM tracetune_config_versions") == [(1,)]

    tuned = tuner.patch({"steps": {"classify": {"batch_max_size": 64}}, "reason": "evening peak"})
    assert tuned.json()["version"] == 2
    wider = replace(SPEC, steps={**SPEC.steps, "classify": {
        **SPEC.steps["classify"], "batch_max_wait_ms": Knob("float", 5.0, 0, 10_000, "ms")}})
    changed = tuner.register(wider)
    assert changed.status_code == 200
    config = PipelineConfig.from_dict(changed.json())
    assert config.version == 3 and changed.headers["etag"] == '"triage-v3"'
    assert config.knob("classify", "batch_max_wait_ms") == 5.0
    assert config.knob("classify", "batch_max_size") == 64  # the tuned value is kept
    [(author, reason)] = tuner.rows("SELECT author, reason FROM tracetune_config_versions WHERE version = 3")
    assert author == "tracetune" and "classify.batch_max_wait_ms" in reason
    assert tuner.rows("SELECT count() FROM tracetune_pipeline_specs") == [(2,)]
    assert PipelineSpec.from_dict(httpx.get(f"{tuner.url}/v1/pipelines/triage/spec").json()) == wider
    assert httpx.get(f"{tuner.url}/v1/pipelines/triage/config").headers["etag"] == '"triage-v3"'


def test_registration_stores_the_declared_slo_unless_one_is_set(tuner):
    url = f"{tuner.url}/v1/pipelines/triage/slo"
    assert httpx.get(url).status_code == 404
    tuner.register()
    assert httpx.get(url).json()["p95_ms"] == 500.0  # from the declaration

    slo = {"p95_ms": 400, "p99_ms": 900, "error_rate": 0.01}
    assert httpx.put(url, json=slo).status_code == 401
    assert httpx.put(url, json=slo, headers={"Authorization": "Bearer wrong"}).status_code == 401
    bad = httpx.put(url, json={"p95_ms": -1}, headers=TOKEN)
    assert bad.status_code == 422 and "p95_ms" in bad.json()["detail"]
    ok = httpx.put(url, json=slo, headers=TOKEN)
    assert ok.status_code == 200 and ok.json()["version"] == 2

    # An executor restarting with another declared SLO does not overwrite the one the owner set.
    assert tuner.register(replace(SPEC, slo={"p95_ms": 250.0})).status_code == 200
    kept = httpx.get(url).json()
    assert (kept["p95_ms"], kept["p99_ms"], kept["error_rate"]) == (400, 900, 0.01)
    assert tuner.rows("SELECT count() FROM tracetune_slos") == [(2,)]
    assert httpx.get(f"{tuner.url}/v1/pipelines/other/slo").status_code == 404


def test_patch_changes_knobs_by_name(tuner):
    tuner.register()
    assert tuner.patch({"steps": {"classify": {"batch_max_size": 16}}}, headers=None).status_code == 401

    changed = tuner.patch({"steps": {"classify": {"batch_max_size": 16, "route_weights": {"b": 1}},
                                     "escalate": {"cascade_threshold": 0.6}}, "reason": "evening peak"})
    assert changed.status_code == 200 and changed.headers["etag"] == '"triage-v2"'
    assert PipelineConfig.from_dict(changed.json()) == PipelineConfig("triage", 2, {
        "classify": {"batch_max_size": 16, "route_weights": {"a": 0.0, "b": 1.0}, "cache_enabled": True},
        "escalate": {"cascade_threshold": 0.6}})
    assert httpx.get(f"{tuner.url}/v1/pipelines/triage/config").json() == changed.json()
    [(author, reason)] = tuner.rows("SELECT author, reason FROM tracetune_config_versions WHERE version = 2")
    assert (author, reason) == ("api", "evening peak")

    same = tuner.patch({"steps": {"classify": {"batch_max_size": 16.0}}})
    assert same.status_code == 200 and same.json()["version"] == 2 and same.headers["etag"] == '"triage-v2"'
    assert tuner.rows("SELECT count() FROM tracetune_config_versions") == [(2,)]


REFUSED_PATCHES = [  # steps of a PATCH body, and the field its 422 names first
    ({"classify": {"nope": 1}}, "steps.classify.nope"),
    ({"classify": {"batch_max_size": 0}}, "steps.classify.batch_max_size"),
    ({"classify": {"batch_max_size": 2.5}}, "steps.classify.batch_max_size"),
    ({"classify": {"cache_enabled": "no"}}, "steps.classify.cache_enabled"),
    ({"classify": {"route_weights": {"c": 1}}}, "steps.classify.route_weights"),
    ({"escalate": {"cascade_threshold": 1.5}}, "steps.escalate.cascade_threshold"),
    ({"route": {"x": 1}}, "steps.route"),
    ({"clean": {"x": 1}}, "steps.clean"),
    ({"classify": 16}, "steps.classify"),
]


def test_patch_refuses_what_the_declaration_does_not_allow(tuner):
    tuner.register()
    for steps, field in REFUSED_PATCHES:
        refused = tuner.patch({"steps": steps})
        assert refused.status_code == 422, steps
        assert refused.json()["detail"].startswith(field), refused.json()["detail"]
    assert tuner.rows("SELECT count() FROM tracetune_config_versions") == [(1,)]


def test_patch_refuses_malformed_bodies_and_unknown_pipelines(tuner):
    tuner.register()
    for body in ({}, {"steps": {}}, {"steps": [1]}, {"classify": {"batch_max_size": 16}},
                 {"steps": {"classify": {"batch_max_size": 16}}, "reason": 3}, [1]):
        refused = tuner.patch(body)
        assert refused.status_code == 422, body
    garbled = httpx.patch(f"{tuner.url}/v1/pipelines/triage/config", content=b"{not json",
                          headers={**TOKEN, "Content-Type": "application/json"})
    assert garbled.status_code == 422 and "not valid JSON" in garbled.json()["detail"]
    untyped = httpx.patch(f"{tuner.url}/v1/pipelines/triage/config", content=b"{not json", headers=TOKEN)
    assert untyped.status_code == 415 and "application/json" in untyped.json()["detail"]
    missing = tuner.patch({"steps": {"classify": {"batch_max_size": 16}}}, pipeline="nope")
    assert missing.status_code == 404 and "known: triage" in missing.json()["detail"]
    assert tuner.rows("SELECT count() FROM tracetune_config_versions") == [(1,)]


def test_concurrent_patches_take_distinct_consecutive_versions(tuner):
    tuner.register()

    def patch(size: int) -> int:
        answer = tuner.patch({"steps": {"classify": {"batch_max_size": size}}, "reason": f"size {size}"})
        assert answer.status_code == 200, answer.text
        return answer.json()["version"]

    with ThreadPoolExecutor(20) as pool:
        answered = list(pool.map(patch, range(100, 120)))
    assert sorted(answered) == list(range(2, 22))
    stored = tuner.rows("SELECT version, config FROM tracetune_config_versions ORDER BY version")
    assert [version for version, _ in stored] == list(range(1, 22))
    # Each version holds the size its request set: no request's change was lost or applied twice.
    sizes = {version: PipelineConfig.from_dict(json.loads(config)).knob("classify", "batch_max_size")
             for version, config in stored}
    assert sorted(sizes[v] for v in range(2, 22)) == list(range(100, 120))


def test_a_malformed_declaration_is_refused_and_stores_nothing(tuner):
    data = SPEC.to_dict()
    data["steps"]["classify"]["x"] = {"kind": "nope", "default": 1}
    refused = httpx.put(f"{tuner.url}/v1/pipelines/triage/spec", json=data, headers=TOKEN)
    assert refused.status_code == 422 and "steps.classify.x" in refused.json()["detail"]

    bad_slo = httpx.put(f"{tuner.url}/v1/pipelines/triage/spec", json={**SPEC.to_dict(), "slo": {"p95_ms": -1}},
                        headers=TOKEN)
    assert bad_slo.status_code == 422 and "p95_ms" in bad_slo.json()["detail"]
    not_object = httpx.put(f"{tuner.url}/v1/pipelines/triage/spec", json=[1], headers=TOKEN)
    assert not_object.status_code == 422
    assert tuner.rows("SELECT count() FROM tracetune_pipeline_specs") == [(0,)]
    assert httpx.get(f"{tuner.url}/v1/pipelines/triage/config").status_code == 404


def test_slo_writes_merge_replace_delete_and_refuse_unknown_pipelines(tuner):
    url = f"{tuner.url}/v1/pipelines/triage/slo"
    unknown = httpx.put(f"{tuner.url}/v1/pipelines/triag/slo", json={"p95_ms": 400}, headers=TOKEN)
    assert unknown.status_code == 404 and "known: none yet" in unknown.json()["detail"]
    tuner.register()
    unknown = httpx.patch(f"{tuner.url}/v1/pipelines/triag/slo", json={"p95_ms": 400}, headers=TOKEN)
    assert unknown.status_code == 404 and "'triag' is not declared" in unknown.json()["detail"]
    assert "known: triage" in unknown.json()["detail"]
    assert tuner.rows("SELECT count() FROM tracetune_slos WHERE pipeline = 'triag'") == [(0,)]
    # One set under a misspelled name before names were checked can still be removed.
    save_slo(tuner.client, SLO(pipeline="triag", p95_ms=400), "old build")
    assert httpx.delete(f"{tuner.url}/v1/pipelines/triag/slo", headers=TOKEN).json()["deleted"] is True
    gone = httpx.delete(f"{tuner.url}/v1/pipelines/triag/slo", headers=TOKEN)
    assert gone.status_code == 404 and "known: triage" in gone.json()["detail"]

    full = {"p95_ms": 400, "p99_ms": 900, "error_rate": 0.01, "cost_per_1k": 0.5, "quality_floor": 0.9}
    assert httpx.put(url, json=full, headers=TOKEN).json()["unset"] == []
    # PATCH merges: one objective changes, null removes one, the others stay.
    assert httpx.patch(url, json={"p95_ms": 300}).status_code == 401
    patched = httpx.patch(url, json={"p95_ms": 300, "cost_per_1k": None}, headers=TOKEN)
    assert patched.status_code == 200, patched.text
    kept = httpx.get(url).json()
    assert (kept["p95_ms"], kept["p99_ms"], kept["error_rate"], kept["cost_per_1k"], kept["quality_floor"]) == (
        300, 900, 0.01, None, 0.9)
    refused = httpx.patch(url, json={"p99_ms": 100}, headers=TOKEN)  # below p95: the merged SLO is checked
    assert refused.status_code == 422 and "p99_ms" in refused.json()["detail"]
    # PUT replaces, and says what is no longer set.
    replaced = httpx.put(url, json={"p95_ms": 450}, headers=TOKEN).json()
    assert replaced["replaced"] is True and replaced["unset"] == ["p99_ms", "error_rate", "quality_floor"]
    assert "no longer set: p99_ms, error_rate, quality_floor" in replaced["note"]
    assert httpx.get(url).json()["p99_ms"] is None

    # DELETE removes it; a restarting executor's declaration does not bring it back.
    assert httpx.delete(url).status_code == 401
    deleted = httpx.delete(url, headers=TOKEN)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert httpx.get(url).status_code == 404
    assert httpx.delete(url, headers=TOKEN).status_code == 404
    tuner.register()
    assert httpx.get(url).status_code == 404

    # Versions stay unique when owners write at once.
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda ms: httpx.put(url, json={"p95_ms": ms}, headers=TOKEN, timeout=30),
                                range(300, 320)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    written = [a.json()["version"] for a in answers]
    assert len(set(written)) == 20
    assert tuner.rows("SELECT count(), uniqExact(version) FROM tracetune_slos WHERE pipeline = 'triage'") == [
        (max(written), max(written))]


def test_alerts_and_silences_through_the_api(tuner):
    from tracetune.analyzer.alerts import Condition, Engine

    url = f"{tuner.url}/v1/alerts"
    assert httpx.get(url).json() == []
    body = {"matchers": ["pipeline=shop", {"name": "severity", "value": "page|ticket", "isRegex": True}],
            "duration": "2h", "comment": "deploying"}
    assert httpx.post(f"{url}/silences", json=body).status_code == 401
    for bad, fragment in (({**body, "matchers": ["pipeline"]}, "NAME=VALUE"),
                          ({**body, "matchers": [{"name": "x", "value": "(", "isRegex": True}]}, "regular expression"),
                          ({**body, "duration": None}, "either endsAt"),
                          ({**body, "duration": "soon"}, "duration"),
                          ({**body, "matchers": []}, "matchers")):
        refused = httpx.post(f"{url}/silences", json=bad, headers=TOKEN)
        assert refused.status_code == 422 and fragment in refused.json()["detail"], (bad, refused.text)
    made = httpx.post(f"{url}/silences", json=body, headers=TOKEN)
    assert made.status_code == 200 and made.json()["status"]["state"] == "active", made.text
    silence_id = made.json()["id"]
    assert [s["id"] for s in httpx.get(f"{url}/silences").json()] == [silence_id]

    engine = Engine(tuner.client, [])
    engine.evaluate([Condition("slo_burn", {"alertname": "SLOBurnRate", "pipeline": "shop", "slo": "availability",
                                            "severity": "page", "rule": "slo_burn"}, {"summary": "burning"}, 20.0)])
    (firing,) = httpx.get(url).json()
    assert firing["labels"]["pipeline"] == "shop" and firing["state"] == "firing"
    assert firing["silenced_by"] == [silence_id]
    assert httpx.get(url, params={"state": "pending"}).json() == []
    assert httpx.get(url, params={"state": "nope"}).status_code == 422

    assert httpx.delete(f"{url}/silences/{silence_id}").status_code == 401
    ended = httpx.delete(f"{url}/silences/{silence_id}", headers=TOKEN)
    assert ended.status_code == 200 and ended.json()["status"]["state"] == "expired"
    assert httpx.get(url).json()[0]["silenced_by"] == []
    assert httpx.delete(f"{url}/silences/nope", headers=TOKEN).status_code == 404
    assert httpx.get(f"{url}/deliveries").json() == []

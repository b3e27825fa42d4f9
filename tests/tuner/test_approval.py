"""Approval modes on a real store and a real tuner API server on 127.0.0.1: in `approve` mode nothing changes
until an operator approves, an approval applies exactly the proposal (a canary of it, or the change), a
rejection, an expiry and a stale proposal are recorded, `observe` never changes config, and every write
needs the token and the API's Host and Origin rules. The loop is `tune_once`, the hook the tuner's loop
thread runs; tests/e2e/test_approval.py runs the same through the `tracetune tuner` process and the CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest

from tests.servers import ThreadServer
from tests.surfaces import check_browser_origins
from tests.tuner.test_loop import SLO_SHOP, SPEC, _spans
from tracetune import store
from tracetune.analyzer import load_prices, publish_prices, save_slo
from tracetune.tuner import approval, canary, decisions, versions
from tracetune.tuner.api import create_app
from tracetune.tuner.config import Approval, ConfigError, PipelineConfig, PipelineSpec
from tracetune.tuner.loop import LoopSettings, tune_once

TOKEN = {"Authorization": "Bearer s3cret"}
LOOP = LoopSettings(min_requests=100, cooldown_seconds=0, window_seconds=30, canary_share=0.2)


@dataclass
class Tuner:
    url: str
    client: store.Client
    client_settings: object = None

    def declare(self, approval_policy: dict | None) -> httpx.Response:
        spec = SPEC.to_dict() | ({"approval": approval_policy} if approval_policy is not None else {})
        return httpx.put(f"{self.url}/v1/pipelines/shop/spec", json=spec, headers=TOKEN, timeout=30)

    def pending(self) -> list[dict]:
        answer = httpx.get(f"{self.url}/v1/proposals", params={"status": "pending", "pipeline": "shop"}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def answer(self, number: int, verb: str, headers: dict | None = TOKEN, by: str = "alice",
               reason: str = "checked") -> httpx.Response:
        return httpx.post(f"{self.url}/v1/proposals/{number}/{verb}", json={"by": by, "reason": reason},
                          headers=headers, timeout=30)

    def kinds(self) -> list[str]:
        return [d["kind"] for d in decisions.history(self.client, "shop")]


@pytest.fixture
def tuner(db_settings) -> Iterator[Tuner]:
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as server:
        client = store.connect(db_settings, ensure_schema=False)
        save_slo(client, SLO_SHOP, "test")
        publish_prices(client, load_prices())
        yield Tuner(server.url, client, db_settings)


def _proposed(tuner: Tuner, settings: LoopSettings = LOOP) -> dict:
    """Traffic whose inputs repeat (the loop proposes turning score's cache on), one look of the loop, and
    the proposal it left waiting."""
    _spans(tuner.client, 400, distinct=100)
    made = tune_once(tuner.client, "shop", settings)
    assert made is not None and made.kind == "proposal", made
    [waiting] = tuner.pending()
    assert waiting["changes"]["score"]["cache_enabled"] is True
    assert made.reason.startswith(f"Waiting for approval (proposal {waiting['number']}, until ")
    return waiting


def test_in_approve_mode_no_knob_changes_until_approval_and_then_exactly_the_proposal_as_a_canary(tuner):
    assert tuner.declare({"mode": "approve"}).status_code == 200
    policy = httpx.get(f"{tuner.url}/v1/pipelines/shop/approval").json()
    assert (policy["mode"], policy["source"]) == ("approve", "declaration")
    waiting = _proposed(tuner)
    assert waiting["summary"].startswith("Turned score's cache on") and waiting["predicted"]["before.requests"] == 400
    assert waiting["waits_for"].startswith("approve mode") and waiting["canary_share"] == 0.2
    # Looks of the loop while it waits change nothing and propose nothing more.
    for _ in range(2):
        assert tune_once(tuner.client, "shop", LOOP) is None
    assert versions.latest(tuner.client, "shop").version == 1 and canary.running(tuner.client, "shop") is None
    assert len(tuner.pending()) == 1 and tuner.kinds() == ["proposal", "declaration"]
    served = httpx.get(f"{tuner.url}/v1/pipelines/shop/config").json()
    assert served["version"] == 1 and served["canary"] is None

    number = waiting["number"]
    assert tuner.answer(number, "approve", headers=None).status_code == 401
    assert tuner.answer(number, "approve", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert tuner.answer(number, "approve", headers={**TOKEN, "Origin": "http://evil.example"}).status_code == 403
    assert tuner.answer(number, "approve", headers={**TOKEN, "Host": "evil.example"}).status_code == 403
    assert tuner.answer(number, "approve", reason="").status_code == 422  # why is part of the audit
    # Every other site's page is refused even with the token (the own origin gets as far as the 422).
    check_browser_origins(f"{tuner.url}/v1/proposals/{number}/approve", "POST", lambda a: a.json()["detail"],
                          headers=TOKEN, json={"by": "mallory", "reason": ""})
    assert [p["number"] for p in tuner.pending()] == [number] and canary.running(tuner.client, "shop") is None

    approved = tuner.answer(number, "approve", reason="cache is safe for score")
    assert approved.status_code == 200, approved.text
    assert approved.json()["proposal"]["status"] == "approved"
    trial = canary.running(tuner.client, "shop")
    base = versions.latest(tuner.client, "shop")
    assert base.version == 1 and trial is not None and trial.share == 0.2 and trial.base_version == 1
    assert trial.config.steps == SPEC.merge(base, waiting["changes"]).steps  # exactly the proposal, nothing else
    served = httpx.get(f"{tuner.url}/v1/pipelines/shop/config").json()
    assert served["canary"]["version"] == trial.version and served["canary"]["steps"] == trial.config.steps
    history = decisions.history(tuner.client, "shop")
    started, approval_row = history[0], history[1]
    assert started["kind"] == "canary_start" and started["version_after"] == trial.version
    assert started["predicted"] == waiting["predicted"]  # judged and remembered as the loop's own canary
    assert approval_row["kind"] == "proposal_approve" and approval_row["author"] == "alice"
    assert approval_row["reason"].startswith(f"Proposal {number} approved by alice: cache is safe for score")
    assert tuner.answer(number, "approve").status_code == 409  # once
    assert tuner.answer(number, "reject").status_code == 409


def test_an_approval_without_canaries_applies_the_proposal_to_every_task(tuner):
    assert tuner.declare({"mode": "approve"}).status_code == 200
    waiting = _proposed(tuner, replace(LOOP, canary_share=0))
    assert waiting["canary_share"] == 0
    assert tuner.answer(waiting["number"], "approve").status_code == 200
    in_force = versions.latest(tuner.client, "shop")
    assert in_force.version == 2 and in_force.steps == SPEC.merge(SPEC.defaults(), waiting["changes"]).steps
    assert tuner.kinds()[:2] == ["tune", "proposal_approve"]


def test_a_rejection_is_recorded_and_the_same_move_is_not_proposed_again(tuner):
    assert tuner.declare({"mode": "approve"}).status_code == 200
    waiting = _proposed(tuner)
    assert tuner.answer(waiting["number"], "reject", headers=None).status_code == 401
    rejected = tuner.answer(waiting["number"], "reject", by="bob", reason="cache hides a bug we are chasing")
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["proposal"]["status"] == "rejected"
    row = decisions.history(tuner.client, "shop")[0]
    assert row["kind"] == "proposal_reject" and row["author"] == "bob"
    assert row["reason"].startswith(f"Proposal {waiting['number']} rejected by bob: cache hides a bug")
    assert tune_once(tuner.client, "shop", LOOP) is None  # the rejected move stays out of the next plan
    assert tuner.pending() == [] and versions.latest(tuner.client, "shop").version == 1
    assert canary.running(tuner.client, "shop") is None
    assert tuner.answer(waiting["number"], "approve").status_code == 409


def test_a_proposal_nobody_answers_expires_is_recorded_and_can_no_longer_be_approved(tuner):
    assert tuner.declare({"mode": "approve"}).status_code == 200
    waiting = _proposed(tuner, replace(LOOP, approval_expiry_seconds=1.0))
    time.sleep(1.5)
    assert tuner.pending() == []  # past its time it is no longer offered
    expired = approval.expire_due(tuner.client)  # as the loop does every interval
    assert [d.kind for d in expired] == ["proposal_expire"]
    assert expired[0].reason.startswith(f"Proposal {waiting['number']} expired unanswered")
    assert approval.expire_due(tuner.client) == []  # once
    row = decisions.history(tuner.client, "shop")[0]  # in the audit, with who (the tuner) and why
    assert (row["kind"], row["author"]) == ("proposal_expire", "tuner") and "expired unanswered" in row["reason"]
    answer = tuner.answer(waiting["number"], "approve")
    assert answer.status_code == 409 and "expired" in answer.json()["detail"]
    assert versions.latest(tuner.client, "shop").version == 1 and canary.running(tuner.client, "shop") is None
    assert httpx.get(f"{tuner.url}/v1/proposals/{waiting['number']}").json()["status"] == "expired"
    again = tune_once(tuner.client, "shop", LOOP)  # the loop proposes again, as a new proposal
    assert again is not None and again.kind == "proposal"
    assert [p["number"] for p in tuner.pending()] == [waiting["number"] + 1]


def test_a_stale_proposal_is_not_applied_blindly(tuner):
    """The config changed by hand while the proposal waited: approving it applies nothing and says why."""
    assert tuner.declare({"mode": "approve"}).status_code == 200
    waiting = _proposed(tuner)
    hand = httpx.patch(f"{tuner.url}/v1/pipelines/shop/config", headers=TOKEN, json={
        "steps": {"escalate": {"max_concurrency": 4}}, "reason": "provider asked us to slow down"})
    assert hand.status_code == 200 and hand.json()["version"] == 2
    answer = tuner.answer(waiting["number"], "approve")
    assert answer.status_code == 409, answer.text
    assert "stale" in answer.json()["detail"] and "version 1 and version 2 is in force" in answer.json()["detail"]
    in_force = versions.latest(tuner.client, "shop")
    assert in_force.version == 2 and in_force.steps["score"]["cache_enabled"] is False
    assert canary.running(tuner.client, "shop") is None
    row = decisions.history(tuner.client, "shop")[0]
    assert row["kind"] == "proposal_stale" and row["author"] == "alice" and "change by api" in row["reason"]
    assert approval.proposal(tuner.client, waiting["number"]).status == "stale"


def test_observe_mode_records_proposals_and_never_changes_config(tuner):
    assert tuner.declare(None).status_code == 200
    body = {"mode": "observe", "reason": "watch first", "by": "carol"}
    assert httpx.put(f"{tuner.url}/v1/pipelines/shop/approval", json=body).status_code == 401
    assert httpx.put(f"{tuner.url}/v1/pipelines/shop/approval", json=body,
                     headers={**TOKEN, "Origin": "http://evil.example"}).status_code == 403
    assert approval.policy(tuner.client, "shop").approval.mode == "auto"
    changed = httpx.put(f"{tuner.url}/v1/pipelines/shop/approval", json=body, headers=TOKEN)
    assert changed.status_code == 200 and changed.json()["source"] == "api"
    assert decisions.history(tuner.client, "shop")[0]["kind"] == "approval_mode"
    _spans(tuner.client, 400, distinct=100)
    first = tune_once(tuner.client, "shop", LOOP)
    assert first is not None and first.kind == "proposal" and first.reason.startswith("Observed only (proposal 1)")
    for _ in range(3):
        assert tune_once(tuner.client, "shop", LOOP) is None  # the same proposal is recorded once
    assert versions.latest(tuner.client, "shop").version == 1 and canary.running(tuner.client, "shop") is None
    assert tuner.pending() == []
    [observed] = httpx.get(f"{tuner.url}/v1/proposals", params={"status": "observed"}).json()
    assert observed["changes"]["score"]["cache_enabled"] is True and observed["predicted"]
    assert tuner.answer(observed["number"], "approve").status_code == 409  # observe never applies
    assert versions.latest(tuner.client, "shop").version == 1


def test_in_auto_mode_a_marked_change_class_waits_and_an_unmarked_one_goes_ahead(tuner):
    assert tuner.declare({"mode": "auto", "knobs": ["score.cache_enabled"]}).status_code == 200
    waiting = _proposed(tuner)
    assert waiting["waits_for"] == "score.cache_enabled is marked for approval"
    assert versions.latest(tuner.client, "shop").version == 1
    body = {"mode": "auto", "knobs": ["max_concurrency"], "reason": "only concurrency needs a person"}
    assert httpx.put(f"{tuner.url}/v1/pipelines/shop/approval", json=body, headers=TOKEN).status_code == 200
    assert tuner.answer(waiting["number"], "reject").status_code == 200
    approval.set_policy(tuner.client, SPEC, Approval("auto"), "test", "")
    # Rejected moves stay out for an hour; with the memory spent, auto goes ahead as before.
    made = tune_once(tuner.client, "shop", replace(LOOP, rejected_memory_seconds=0))
    assert made is not None and made.kind == "canary_start"


def test_marked_change_classes():
    config = PipelineConfig("shop", 3, {"score": {"cache_ttl_seconds": 600.0, "cache_enabled": False},
                                        "classify": {"route_weights": {"a": 0.8, "b": 0.2}}})
    rules = Approval("auto", ("route_weights",), 0.3)
    assert approval.marked(rules, config, {"score": {"cache_ttl_seconds": 700.0}}) == []  # 17%
    assert approval.marked(rules, config, {"score": {"cache_ttl_seconds": 900.0}}) == [
        "score.cache_ttl_seconds moves 50%, more than 30%"]
    assert approval.marked(rules, config, {"classify": {"route_weights": {"a": 0.7, "b": 0.3}}}) == [
        "classify.route_weights is marked for approval"]
    assert approval.marked(Approval("auto", max_change=0.3), config,
                           {"classify": {"route_weights": {"a": 0.4, "b": 0.6}}}) == [
        "classify.route_weights moves 40%, more than 30%"]  # 40% of traffic moves
    assert approval.marked(Approval("auto", max_change=0.3), config, {"score": {"cache_enabled": True}}) == []


def test_the_declaration_carries_the_policy_and_bad_ones_are_refused(tuner):
    spec = replace(SPEC, approval=Approval("auto", ("escalate.cascade_threshold",), 0.25))
    assert PipelineSpec.from_dict(spec.to_dict()) == spec
    assert "approval" not in SPEC.to_dict()  # a spec without a policy reads as it did before
    with pytest.raises(ConfigError, match="approval.mode must be one of auto, approve, observe"):
        Approval.from_dict({"mode": "yolo"})
    for bad, said in (({"mode": "sometimes"}, "approval.mode"), ({"mode": "auto", "knobs": ["nope"]}, "'nope'"),
                      ({"mode": "auto", "max_change": 0}, "max_change"), ({"mode": "auto", "who": 1}, "who")):
        answer = tuner.declare(bad)
        assert answer.status_code == 422 and said in answer.json()["detail"], (bad, answer.text)
    assert tuner.declare({"mode": "approve"}).status_code == 200
    assert approval.policy(tuner.client, "shop").approval.mode == "approve"
    # The operator's change holds over a redeployed executor declaring the same policy ...
    approval.set_policy(tuner.client, SPEC, Approval("observe"), "ops", "quiet week")
    time.sleep(0.01)
    assert tuner.declare({"mode": "approve"}).status_code == 200
    assert approval.policy(tuner.client, "shop").approval.mode == "observe"
    # ... and a declaration that changes its policy wins over it.
    time.sleep(0.01)
    assert tuner.declare({"mode": "auto", "knobs": ["cache_enabled"]}).status_code == 200
    found = approval.policy(tuner.client, "shop")
    assert (found.approval.mode, found.approval.knobs, found.source) == ("auto", ("cache_enabled",), "declaration")


def test_on_call_is_told_when_a_waiting_proposal_restores_a_missed_objective(tuner):
    """The analyzer's `TunerProposalWaiting` rule reads the proposals table: a pending proposal restoring a
    missed objective is a condition (with its runbook), an answered one or one restoring nothing is not."""
    from datetime import UTC, datetime

    from tracetune.analyzer import SLO, alerts

    assert tuner.declare({"mode": "approve"}).status_code == 200
    waiting = _proposed(tuner)
    assert waiting["violated"] == [] and alerts.proposal_conditions(tuner.client, datetime.now(UTC)) == []
    assert tuner.answer(waiting["number"], "reject", reason="later").status_code == 200
    save_slo(tuner.client, SLO(pipeline="shop", p95_ms=20.0, quality_floor=0.8), "test")  # 30 ms tasks miss it
    made = tune_once(tuner.client, "shop", replace(LOOP, rejected_memory_seconds=0))
    assert made is not None and made.kind == "proposal"
    [missing] = tuner.pending()
    assert missing["violated"] == ["p95"] and missing["summary"].startswith("Restoring p95 first.")
    [condition] = alerts.proposal_conditions(tuner.client, datetime.now(UTC), external_url="http://dash")
    assert condition.labels == {"alertname": "TunerProposalWaiting", "pipeline": "shop",
                                "proposal": str(missing["number"]), "severity": "page", "rule": "tuner_proposal"}
    assert condition.annotations["runbook_url"] == "docs/runbooks.md#tuner-proposal-waiting"
    assert f"tracetune tuner approve {missing['number']}" in condition.annotations["description"]
    assert condition.annotations["summary"] == f"shop: tuner proposal {missing['number']} restores p95 and waits " \
                                               "for approval"
    assert tuner.answer(missing["number"], "approve").status_code == 200
    assert alerts.proposal_conditions(tuner.client, datetime.now(UTC)) == []  # answered: resolved


RACER = """
import sys, time
from tracetune import store
from tracetune.base.settings import load
from tracetune.tuner import approval
number, verb, who, start = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
client = store.connect(load(), ensure_schema=False)
answer = approval.approve if verb == "approve" else approval.reject
time.sleep(max(0.0, start - time.time()))
try:
    answer(client, number, who, "race")
    print("done")
except approval.ApprovalError as exc:
    print(exc.status)
"""


def test_replicas_answering_one_proposal_at_once_end_it_once(tuner, tmp_path):
    """Four processes (as four tuner replicas, sharing no lock) approve and reject one proposal at the same
    moment: one answer is recorded and acted on, every other is told it was decided, and every reader sees
    the one outcome."""
    import os
    import subprocess
    import sys

    assert tuner.declare({"mode": "approve"}).status_code == 200
    number = _proposed(tuner)["number"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")},
           **tuner.client_settings.as_env()}
    start = time.time() + 4  # after every process has imported and connected
    verbs = ("approve", "reject", "approve", "reject")
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(number), verb, f"r{i}", str(start)], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i, verb in enumerate(verbs)]
    outs = [racer.communicate(timeout=120) for racer in racers]
    said = [out.strip().splitlines()[-1] if out.strip() else f"crashed: {err[-300:]}" for out, err in outs]
    assert sorted(said) == ["409", "409", "409", "done"], said
    winner = said.index("done")
    found = approval.proposal(tuner.client, number)
    assert (found.status, found.decided_by) == ({"approve": "approved", "reject": "rejected"}[verbs[winner]],
                                                f"r{winner}")
    answers = [k for k in tuner.kinds() if k in ("proposal_approve", "proposal_reject")]
    assert answers == [f"proposal_{verbs[winner]}"]
    assert (canary.running(tuner.client, "shop") is not None) == (verbs[winner] == "approve")
    assert tuner.answer(number, "approve").status_code == 409  # ended: nobody acts on it again

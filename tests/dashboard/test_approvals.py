"""The Tuner page's approvals: waiting proposals listed with their sentence and changes, and approve or reject
only through the tuner's API with the token the operator pasted, after a review step (a real tuner API
server on 127.0.0.1 over the test's store)."""

from __future__ import annotations

from dataclasses import replace

from tests.dashboard.test_app import click, open_page, run, use_settings
from tests.servers import ThreadServer
from tests.tuner.test_loop import SLO_SHOP, SPEC, _spans
from tracetune import store
from tracetune.analyzer import load_prices, publish_prices, save_slo
from tracetune.tuner import approval, canary, decisions, versions
from tracetune.tuner.api import create_app
from tracetune.tuner.config import Approval
from tracetune.tuner.loop import LoopSettings, tune_once


def test_tuner_page_lists_waiting_proposals_and_approves_one_with_the_token_after_a_review(db_settings, client,
                                                                                          monkeypatch, tmp_path):
    versions.register(client, replace(SPEC, approval=Approval("approve")))
    save_slo(client, SLO_SHOP, "test")
    publish_prices(client, load_prices())
    _spans(client, 400, distinct=100)
    made = tune_once(client, "shop", LoopSettings(min_requests=100, cooldown_seconds=0, window_seconds=30))
    assert made is not None and made.kind == "proposal"
    [waiting] = approval.proposals(client, "shop", "pending")
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as tuner:
        use_settings(monkeypatch, db_settings.replace(tuner_port=tuner.port), tmp_path)
        at = open_page("tuner", pipeline="shop")
        assert any("Approval mode: approve (from the declaration)" in c.value for c in at.caption)
        assert at.warning[0].value.startswith("1 proposal of the tuner waits for an operator")
        [listed] = at.table[0].value.to_dict("records")
        assert listed["#"] == str(waiting.number) and listed["sentence"].startswith("Turned score's cache on")
        assert "score.cache_enabled off → on" in listed["what changes"]

        at.radio(key="tuner_action").set_value("approve")
        run(at)
        assert at.selectbox(key="tuner_proposal_shop").value == waiting.number
        assert "tuner_review" not in [b.key for b in at.button]  # who and why first
        at.text_input(key="tuner_reason").input("cache is safe for score")
        at.text_input(key="tuner_by").input("dana")
        run(at)
        click(at, "tuner_review")
        review = [w.value for w in at.warning if w.value.startswith("Approve shop")]
        assert review == [f"Approve shop: proposal {waiting.number}: {waiting.summary}. These knob values change:"]
        assert canary.running(client, "shop") is None  # nothing happens before the confirm
        click(at, "tuner_confirm")  # no token pasted: nothing is sent
        assert at.error[0].value == "Paste the tuner token first: nothing was sent."

        at.text_input(key="tuner_token").input("wrong")
        click(at, "tuner_review")
        click(at, "tuner_confirm")
        assert at.error[0].value.startswith("The tuner refused (401): ")
        assert canary.running(client, "shop") is None and approval.proposal(client, waiting.number).status == "pending"

        at.text_input(key="tuner_token").input("s3cret")
        click(at, "tuner_review")
        click(at, "tuner_confirm")
        trial = canary.running(client, "shop")
        assert trial is not None and trial.config.steps == SPEC.merge(versions.latest(client, "shop"),
                                                                      waiting.changes).steps
        assert at.success[0].value == f"Done: proposal {waiting.number} approved; shop's canary version " \
                                      f"{trial.version} is on trial."
        row = decisions.history(client, "shop", 2)[1]
        assert (row["kind"], row["author"]) == ("proposal_approve", "dana")
        assert not any(w.value.startswith("1 proposal") for w in at.warning)  # read again: none waits now


def test_every_decision_kind_reads_in_words_on_the_tuner_page():
    from tracetune.dashboard.tuner import KIND_WORDS

    assert set(KIND_WORDS) == set(decisions.KINDS)

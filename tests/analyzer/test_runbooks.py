"""Every alert rule's runbook_url points at a section of docs/runbooks.md that exists."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from tracetune.analyzer import alerts

ROOT = Path(__file__).resolve().parents[2]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_rule_has_a_runbook_section_that_exists():
    text = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = _anchors(text)
    assert set(alerts.RUNBOOK_URLS) == set(alerts.RULES)
    for rule, url in alerts.RUNBOOK_URLS.items():
        path, _, anchor = url.partition("#")
        assert path == "docs/runbooks.md" and anchor in anchors, (rule, url, sorted(anchors))
    for section in ("dead-letters", "store-down", "full-disk", "rollback-by-hand", "model-quality-degradation",
                    "llm-provider-rate-limits-429", "tuner-canary-rolled-back"):
        assert section in anchors
    for link in re.findall(r"\]\(#([^)]+)\)", text):  # links inside the page resolve too
        assert link in anchors, link


def test_every_condition_carries_its_runbook_url():
    drift = pl.DataFrame([{"pipeline": "p", "step": "classify", "feature": "category", "statistic": "js",
                           "value": 0.4, "p_value": float("nan"), "n_current": 600, "n_reference": 6000,
                           "status": "drift"}])
    [condition] = alerts.drift_conditions(drift)
    assert condition.annotations["runbook_url"] == "docs/runbooks.md#feature-drift"
    [cost] = alerts.cost_conditions({"p": 2.0}, {"p": 1.0})
    assert cost.annotations["runbook_url"] == alerts.RUNBOOK_URLS["cost"]


def test_a_runbook_base_url_makes_every_runbook_url_a_link_slack_and_pagerduty_show():
    from datetime import UTC, datetime

    from tracetune.analyzer.receivers.pagerduty import PagerDutyReceiver
    from tracetune.analyzer.receivers.slack import SlackReceiver

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    [cost] = alerts.cost_conditions({"p": 2.0}, {"p": 1.0})
    firing, _ = alerts.advance({}, [cost], now)
    firing, _ = alerts.advance(firing, [cost], now.replace(minute=10))  # past the rule's 5 minutes
    timing = alerts.Timing(group_wait=0, group_interval=60, repeat_interval=600)
    [plain] = alerts.group_notifications(firing.values(), {}, [], now.replace(minute=10), timing)
    assert plain.alerts[0]["annotations"]["runbook_url"] == "docs/runbooks.md#cost-over-budget"
    base = "https://git.example.com/ops/tracetune/blob/main/"
    [linked] = alerts.group_notifications(firing.values(), {}, [], now.replace(minute=10), timing,
                                          runbook_base_url=base)
    url = "https://git.example.com/ops/tracetune/blob/main/docs/runbooks.md#cost-over-budget"
    assert linked.alerts[0]["annotations"]["runbook_url"] == url
    assert linked.alertmanager()["commonAnnotations"]["runbook_url"] == url
    [slack] = SlackReceiver("slack", "https://hooks.slack.com/services/T/B/X", "").payloads(linked)
    assert f"<{url}|Runbook>" in str(slack["blocks"])
    assert "Runbook" not in str(SlackReceiver("slack", "https://hooks.slack.com/services/T/B/X", "")
                                .payloads(plain)[0]["blocks"])  # a path in the repository is no link
    [event] = PagerDutyReceiver("pagerduty", "R0UTINGKEY0000000000000000000000").payloads(linked)
    assert {"href": url, "text": "Runbook"} in event["links"]

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

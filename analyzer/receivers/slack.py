"""Slack incoming webhooks: a readable summary as `text` plus Block Kit `blocks`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tracetune.analyzer.receivers.base import UrlReceiver
from tracetune.analyzer.receivers.notification import Notification

__all__ = ["SlackReceiver"]


def _slack_escape(text: str) -> str:
    """Slack mrkdwn treats only &, < and > specially; they must be sent as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_SLACK_ALERT_BLOCKS = 10  # Slack allows 50 blocks; a long group ends with "and N more"


@dataclass(frozen=True)
class SlackReceiver(UrlReceiver):
    """A Slack incoming webhook: a readable summary as `text` plus Block Kit `blocks`."""

    kind: ClassVar[str] = "slack"

    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        title = notification.title()
        lines = []
        blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": title[:150]}}]
        for alert in notification.alerts[:_SLACK_ALERT_BLOCKS]:
            labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
            summary = annotations.get("summary") or labels.get("alertname", "alert")
            icon = ":red_circle:" if alert.get("status") == "firing" else ":large_green_circle:"
            parts = [f"{icon} *{_slack_escape(summary)}* ({alert.get('status', '')})"]
            if annotations.get("description"):
                parts.append(_slack_escape(annotations["description"]))
            parts.append(" ".join(f"`{_slack_escape(k)}={_slack_escape(v)}`" for k, v in sorted(labels.items())))
            links = [f"<{alert['generatorURL']}|Open in tracetune>"] if alert.get("generatorURL") else []
            if annotations.get("runbook_url", "").startswith(("http://", "https://")):
                links.append(f"<{annotations['runbook_url']}|Runbook>")
            if links:
                parts.append(" · ".join(links))
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(parts)[:3000]}})
            lines.append(f"- {summary} ({alert.get('status', '')})")
        more = len(notification.alerts) - _SLACK_ALERT_BLOCKS + notification.truncated_alerts
        if more > 0:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"and {more} more"}]})
            lines.append(f"and {more} more")
        return [{"text": "\n".join([title, *lines]), "blocks": blocks}]

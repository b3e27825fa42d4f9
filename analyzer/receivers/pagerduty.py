"""PagerDuty Events API v2: one event per alert, trigger and resolve by the alert's fingerprint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from tracetune.analyzer.receivers.base import Receiver, check_url
from tracetune.analyzer.receivers.notification import Notification

__all__ = ["PagerDutyReceiver", "pagerduty_severity"]


_PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
_PAGERDUTY_SEVERITY_OF = {"page": "critical", "ticket": "warning"}


def pagerduty_severity(label: str | None) -> str:
    """tracetune's severity label → PagerDuty's: page → critical, ticket → warning; PagerDuty's own
    four values pass through; anything else is info."""
    value = (label or "").lower()
    return value if value in _PAGERDUTY_SEVERITIES else _PAGERDUTY_SEVERITY_OF.get(value, "info")


@dataclass(frozen=True)
class PagerDutyReceiver(Receiver):
    """PagerDuty Events API v2: one event per alert, trigger while firing, resolve when resolved,
    `dedup_key` = the alert's fingerprint. The routing key is added at send time, never stored."""

    kind: ClassVar[str] = "pagerduty"
    name: str
    routing_key: str
    url: str = "https://events.pagerduty.com/v2/enqueue"
    secret: str = ""

    def __post_init__(self) -> None:
        check_url(self.kind, self.url)
        if not self.routing_key:
            raise ValueError("pagerduty receiver needs a routing key (the service's Events API v2 integration key)")

    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        events = []
        for alert in notification.alerts:
            labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
            dedup_key = str(alert.get("fingerprint") or notification.group_key)[:255]
            if alert.get("status") == "resolved":
                events.append({"event_action": "resolve", "dedup_key": dedup_key})
                continue
            summary = annotations.get("summary") or " ".join(
                [labels.get("alertname", "alert"), *(f"{k}={v}" for k, v in sorted(labels.items())
                                                     if k != "alertname")])
            event: dict[str, Any] = {
                "event_action": "trigger",
                "dedup_key": dedup_key,
                "payload": {
                    "summary": summary[:1024],
                    "source": labels.get("pipeline") or "tracetune",
                    "severity": pagerduty_severity(labels.get("severity")),
                    "component": labels.get("step") or labels.get("pipeline") or "tracetune",
                    "custom_details": {"labels": labels, "annotations": annotations,
                                       "group_key": notification.group_key},
                },
                "client": "tracetune",
            }
            for name, label in (("group", "pipeline"), ("class", "alertname")):
                if labels.get(label):
                    event["payload"][name] = labels[label]
            if alert.get("startsAt"):
                event["payload"]["timestamp"] = alert["startsAt"]
            if notification.external_url:
                event["client_url"] = notification.external_url
            links = [{"href": alert["generatorURL"], "text": "Open in tracetune"}] if alert.get("generatorURL") else []
            if annotations.get("runbook_url", "").startswith(("http://", "https://")):
                links.append({"href": annotations["runbook_url"], "text": "Runbook"})
            if links:
                event["links"] = links
            events.append(event)
        return events

    def request(self, body: str) -> tuple[str, bytes]:
        return self.url, json.dumps({"routing_key": self.routing_key, **json.loads(body)},
                                    separators=(",", ":")).encode()

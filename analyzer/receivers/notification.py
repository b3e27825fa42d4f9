"""The notification the rules engine hands to delivery, in Alertmanager's terms, and its two renderings
every receiver starts from: the Alertmanager v4 webhook body and the default subject line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Notification"]


@dataclass(frozen=True)
class Notification:
    """One group notification as the rules engine hands it over, in Alertmanager's terms.

    `alerts` are dicts already in Alertmanager v4 alert shape (status, labels, annotations, startsAt,
    endsAt, generatorURL, fingerprint); `receiver` is the route name written into the webhook body.
    """

    receiver: str
    group_key: str
    status: str  # firing (some alert fires) | resolved (all resolved)
    alerts: list[dict[str, Any]]
    group_labels: dict[str, str] = field(default_factory=dict)
    common_labels: dict[str, str] = field(default_factory=dict)
    common_annotations: dict[str, str] = field(default_factory=dict)
    external_url: str = ""
    truncated_alerts: int = 0
    notification_reason: str = "first notification"  # Alertmanager's NotifyReason words
    route_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("firing", "resolved"):
            raise ValueError(f"Notification.status must be 'firing' or 'resolved', got {self.status!r}")

    def alertmanager(self) -> dict[str, Any]:
        """The body Alertmanager's webhook_config POSTs (version 4), field for field and in its order
        (notify/webhook `Message`: template `Data`, then version, groupKey, truncatedAlerts)."""
        return {
            "receiver": self.receiver,
            "status": self.status,
            "alerts": [dict(alert) for alert in self.alerts],
            "notification_reason": self.notification_reason,
            "groupLabels": dict(self.group_labels),
            "commonLabels": dict(self.common_labels),
            "commonAnnotations": dict(self.common_annotations),
            "routeLabels": dict(self.route_labels),
            "externalURL": self.external_url,
            "version": "4",
            "groupKey": self.group_key,
            "truncatedAlerts": int(self.truncated_alerts),
        }

    def title(self) -> str:
        """Alertmanager's default subject: `[FIRING:2] <group label values> (<other common label values>)`."""
        firing = sum(1 for a in self.alerts if a.get("status") == "firing")
        head = f"[FIRING:{firing}]" if self.status == "firing" else "[RESOLVED]"
        values = [v for _, v in sorted(self.group_labels.items())]
        extra = [v for k, v in sorted(self.common_labels.items()) if k not in self.group_labels]
        return " ".join([head, *values, *([f"({' '.join(extra)})"] if extra else [])])

"""Any tool that takes Alertmanager webhooks (webhook_config): the v4 body, unchanged, signed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tracetune.analyzer.receivers.base import UrlReceiver
from tracetune.analyzer.receivers.notification import Notification

__all__ = ["WebhookReceiver"]


@dataclass(frozen=True)
class WebhookReceiver(UrlReceiver):
    """Any tool that takes Alertmanager webhooks: the Alertmanager v4 body, unchanged."""

    kind: ClassVar[str] = "webhook"

    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        return [notification.alertmanager()]

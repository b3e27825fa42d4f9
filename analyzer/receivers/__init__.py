"""Where alert notifications go, one module per integration (as Alertmanager keeps them): `webhook`
(the Alertmanager v4 body), `slack`, `pagerduty`; `base` holds what every receiver is, `signing` the
Standard Webhooks signatures, `notification` what the rules engine hands over.

A new integration is a module here with a frozen dataclass subclassing `Receiver` (or `UrlReceiver`
when it POSTs each stored body to one URL), a `kind`, `payloads()` and `request()`; it is re-exported
below and, if settings turn it on, made in `receivers_from_settings`. The outbox and the sending loop
are apart (analyzer/outbox.py, analyzer/delivery.py) and know receivers only through `Receiver`.
"""

from __future__ import annotations

from tracetune.analyzer.receivers.base import Receiver, UrlReceiver
from tracetune.analyzer.receivers.notification import Notification
from tracetune.analyzer.receivers.pagerduty import PagerDutyReceiver, pagerduty_severity
from tracetune.analyzer.receivers.signing import new_secret, sign
from tracetune.analyzer.receivers.slack import SlackReceiver
from tracetune.analyzer.receivers.webhook import WebhookReceiver
from tracetune.base.settings import Settings

__all__ = ["Notification", "Receiver", "UrlReceiver", "WebhookReceiver", "SlackReceiver", "PagerDutyReceiver",
           "pagerduty_severity", "receivers_from_settings", "sign", "new_secret"]


def receivers_from_settings(settings: Settings) -> list[Receiver]:
    """The receivers the settings turn on (`alert_webhook_url`, `alert_slack_url`,
    `alert_pagerduty_routing_key`), each signing with the alert secret."""
    wanted = [settings.alert_webhook_url, settings.alert_slack_url, settings.alert_pagerduty_routing_key]
    if not any(wanted):
        return []
    secret = settings.alert_secret()
    receivers: list[Receiver] = []
    if settings.alert_webhook_url:
        receivers.append(WebhookReceiver("webhook", settings.alert_webhook_url, secret))
    if settings.alert_slack_url:
        receivers.append(SlackReceiver("slack", settings.alert_slack_url, secret))
    if settings.alert_pagerduty_routing_key:
        receivers.append(PagerDutyReceiver("pagerduty", settings.alert_pagerduty_routing_key,
                                           settings.alert_pagerduty_url, secret))
    return receivers

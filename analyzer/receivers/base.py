"""What every receiver is: the bodies it stores for a notification, the request it sends for one, and the
Standard Webhooks headers (signed when it has a secret)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from tracetune.analyzer.receivers.notification import Notification
from tracetune.analyzer.receivers.signing import sign

__all__ = ["Receiver", "UrlReceiver", "check_url"]

_USER_AGENT = "tracetune-alerts"


class Receiver(ABC):
    """Where notifications go. `payloads` is what the outbox stores (no secrets); `request` what is sent.

    `name` finds the receiver again when a restarted process resumes its pending deliveries; with a
    `secret` (whsec_...) every request is signed per Standard Webhooks.
    """

    kind: ClassVar[str] = ""
    name: str
    secret: str

    @abstractmethod
    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        """The bodies to send for `notification` (one, or one per alert)."""

    @abstractmethod
    def request(self, body: str) -> tuple[str, bytes]:
        """(url, exact bytes to POST) for a stored body."""

    def headers(self, delivery_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """JSON content type and, with a secret, `webhook-id`, `webhook-timestamp`, `webhook-signature`."""
        stamp = int(time.time() if now is None else now)
        headers = {"content-type": "application/json", "user-agent": _USER_AGENT, "webhook-id": delivery_id,
                   "webhook-timestamp": str(stamp)}
        if self.secret:
            headers["webhook-signature"] = sign(self.secret, delivery_id, stamp, body)
        return headers


def check_url(kind: str, url: str) -> None:
    parts = httpx.URL(url)
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ValueError(f"{kind} receiver URL must be an http(s) URL, got {url!r}")


@dataclass(frozen=True)
class UrlReceiver(Receiver):
    """A receiver that POSTs each stored body as it is to one URL (checked when it is made)."""

    name: str
    url: str
    secret: str = ""

    def __post_init__(self) -> None:
        check_url(self.kind, self.url)

    def request(self, body: str) -> tuple[str, bytes]:
        return self.url, body.encode()

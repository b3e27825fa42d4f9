"""Standard Webhooks signatures (symmetric): `whsec_` secrets and the `webhook-signature` value."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["new_secret", "sign"]

_SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and the base64 of 24 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _secret_key(secret: str) -> bytes:
    raw = secret[len(_SECRET_PREFIX):] if secret.startswith(_SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError("a webhook secret must be whsec_ followed by base64 (make one with delivery.new_secret())")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """`v1,<base64 HMAC-SHA256>` of `{msg_id}.{timestamp}.{body}`: the `webhook-signature` value."""
    payload = body.encode() if isinstance(body, str) else body
    content = f"{msg_id}.{int(timestamp)}.".encode() + payload
    digest = hmac.new(_secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()

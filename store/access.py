"""Who may use the embedded store, and from where (what each user may run: store/policy.py).

Two locks, each checked before a request reaches the engine:
- **Users**: `default` (read and write) and `reader` (ClickHouse `readonly = 2`: reads and
  settings, no writes), each with a password, given as ClickHouse accepts credentials (HTTP basic,
  `X-ClickHouse-User`/`X-ClickHouse-Key`, or `user`/`password` parameters).
- **Where from**: the `Host` header must name the bound address (a web page cannot reach the store
  through a rebound DNS name), and a browser request from any other origin is refused.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tracetune.base import serving


class AccessDenied(Exception):
    """A request refused before it reaches the engine, with ClickHouse's code, name and HTTP status."""

    def __init__(self, message: str, code: int, name: str, status: int):
        super().__init__(f"Code: {code}. DB::Exception: {message}. ({name})")
        self.code = code
        self.status = status


@dataclass(frozen=True)
class User:
    name: str
    password: str
    readonly: int  # ClickHouse's `readonly`: 0 everything, 2 reads and settings only


class Users:
    """The store's users and their passwords; compares in constant time."""

    def __init__(self, users: Iterable[User]):
        self._users = {user.name: user for user in users}

    def authenticate(self, name: str, password: str) -> User:
        user = self._users.get(name)
        expected = user.password if user else "\0never"
        if not hmac.compare_digest(password.encode(), expected.encode()) or user is None:
            raise AccessDenied(f"{name}: Authentication failed: password is incorrect, or there is no user "
                               "with such name", 516, "AUTHENTICATION_FAILED", 401)
        return user


def credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, str]:
    """(user, password) from one of the three places ClickHouse reads them; mixing them is an error."""
    basic = headers.get("authorization", "")
    header_user = headers.get("x-clickhouse-user")
    header_key = headers.get("x-clickhouse-key")
    param_user, param_password = params.get("user"), params.get("password")
    given = [bool(basic), header_user is not None or header_key is not None,
             param_user is not None or param_password is not None]
    if sum(given) > 1:
        raise AccessDenied("Invalid authentication: it is not allowed to use more than one of the Authorization "
                           "header, X-ClickHouse-User/Key headers and user/password parameters", 516,
                           "AUTHENTICATION_FAILED", 401)
    if basic:
        scheme, _, value = basic.partition(" ")
        if scheme.lower() != "basic":
            raise AccessDenied(f"Unsupported authentication scheme {scheme!r}: use Basic", 516,
                               "AUTHENTICATION_FAILED", 401)
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AccessDenied("Malformed Basic authorization header", 516, "AUTHENTICATION_FAILED", 401) from None
        return user or "default", password
    if given[1]:
        return header_user or "default", header_key or ""
    return param_user or "default", param_password or ""


def allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """Names the Host header may carry for this bind address (the rule every HTTP surface shares)."""
    return serving.allowed_hosts(bind_host)


def check_origin(headers: Mapping[str, str], hosts: frozenset[str] | None) -> None:
    """Refuse a rebound DNS name (Host) and any cross-site browser request (Origin, Sec-Fetch-Site), as
    ClickHouse's ACCESS_DENIED. Unlike the APIs, not even a top-level navigation passes: a link in a page
    would run the query in its URL with the browser's remembered credentials."""
    try:
        # the store answers to its bind address only: the `allowed_hosts` setting the APIs offer does not apply
        serving.check_origin("GET", headers, hosts, navigation_allowed=False, hint="")  # no method passes a link
    except serving.Refused as exc:
        message = exc.message
        raise AccessDenied(message[:1].upper() + message[1:], 497, "ACCESS_DENIED", exc.status) from None



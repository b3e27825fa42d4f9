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
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(authority: str) -> str:
    """`host` of `host:port` / `[v6]:port`, lower case."""
    parsed = urlsplit("//" + authority)
    try:
        return (parsed.hostname or "").lower()
    except ValueError:
        return ""


def allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """Names the Host header may carry for this bind address; None: any (bound to every interface)."""
    if bind_host in ("0.0.0.0", "::", ""):
        return None
    names = {bind_host.lower().strip("[]")}
    if _loopback(bind_host):
        names |= {"localhost", "127.0.0.1", "::1"}
    return frozenset(names)


def check_origin(headers: Mapping[str, str], hosts: frozenset[str] | None) -> None:
    """Refuse a rebound DNS name (Host) and any cross-site browser request (Origin, Sec-Fetch-Site)."""
    host = _hostname(headers.get("host", ""))
    if hosts is not None and host not in hosts:
        raise AccessDenied(f"Host {headers.get('host', '')!r} is not this server's address; connect to "
                           f"{' or '.join(sorted(hosts))}", 497, "ACCESS_DENIED", 403)
    origin = headers.get("origin")
    if origin is not None:
        origin_host = _hostname(urlsplit(origin).netloc) if origin != "null" else ""
        if not origin_host or (hosts is not None and origin_host not in hosts) or origin_host != host:
            raise AccessDenied(f"Requests from the web page at {origin!r} are refused: the store accepts browser "
                               "requests only from its own origin", 497, "ACCESS_DENIED", 403)
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise AccessDenied("Cross-site browser requests are refused", 497, "ACCESS_DENIED", 403)



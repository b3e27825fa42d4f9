"""The rules behind every HTTP surface's Guard, as pure functions: which Host names, which origins, which JSON."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_settings
from tracetune.base.serving import LOOPBACK_HOSTS, Refused, allowed_hosts, check_json, check_origin


def test_allowed_hosts_follow_the_bind_address_and_the_settings(tmp_path):
    assert allowed_hosts("127.0.0.1") == LOOPBACK_HOSTS
    assert allowed_hosts("::1") == LOOPBACK_HOSTS
    assert allowed_hosts("10.0.0.5") == {"10.0.0.5"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None
    assert allowed_hosts("127.0.0.1", ["Tuner.Internal", " "]) == LOOPBACK_HOSTS | {"tuner.internal"}
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    settings = make_settings(tmp_path, allowed_hosts="proxy.example, other.example",
                             tuner_endpoint="http://tuner:8700")
    assert settings.host_names == ["proxy.example", "other.example", "tuner"]


@pytest.mark.parametrize("headers", [
    {"host": "evil.example:8700"}, {"host": ""}, {},
    {"host": "127.0.0.1:8700", "origin": "http://evil.example"},
    {"host": "127.0.0.1:8700", "origin": "null"},
    {"host": "127.0.0.1:8700", "origin": "http://localhost:8700"},
    {"host": "127.0.0.1:8700", "sec-fetch-site": "cross-site"},
    {"host": "127.0.0.1:8700", "sec-fetch-site": "same-site", "sec-fetch-mode": "cors"},
])
def test_foreign_hosts_and_origins_are_refused(headers):
    with pytest.raises(Refused) as refused:
        check_origin("POST", headers, LOOPBACK_HOSTS)
    assert refused.value.status == 403 and "\n" not in refused.value.message


@pytest.mark.parametrize("method, headers", [
    ("GET", {"host": "127.0.0.1:8700"}),
    ("POST", {"host": "localhost:8700", "origin": "http://localhost:8700", "sec-fetch-site": "same-origin"}),
    ("GET", {"host": "[::1]:8700", "sec-fetch-site": "none"}),
    ("GET", {"host": "127.0.0.1:8700", "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}),
])
def test_own_names_and_top_level_navigations_pass(method, headers):
    check_origin(method, headers, LOOPBACK_HOSTS)


def test_a_cross_site_navigation_is_only_let_through_for_get():
    with pytest.raises(Refused):
        check_origin("POST", {"host": "127.0.0.1", "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"},
                     LOOPBACK_HOSTS)


def test_json_depth_and_surrogates_are_named():
    check_json(json.loads("[" * 64 + "]" * 64))
    with pytest.raises(Refused, match="more than 64 levels"):
        check_json(json.loads("[" * 65 + "]" * 65))
    with pytest.raises(Refused, match=r"body\.a\[1\] holds a lone UTF-16 surrogate \(\\ud800 at character 2\)"):
        check_json({"a": ["ok", "ab\ud800"]})
    with pytest.raises(Refused, match=r"key '\\udc00x'"):
        check_json({"\udc00x": 1})
    with pytest.raises(Refused) as refused:
        check_json({"\ud800": {"b": "\udfff"}})
    refused.value.message.encode("utf-8")  # the message itself is valid text


@pytest.mark.parametrize("value", ["http://tuner.example", "tuner.example:8700", "a b", "x/y"])
def test_allowed_hosts_must_be_names(tmp_path, value):
    from tracetune.base.settings import SettingsError

    with pytest.raises(SettingsError, match="allowed_hosts: .* is not a host name"):
        make_settings(tmp_path, allowed_hosts=value)

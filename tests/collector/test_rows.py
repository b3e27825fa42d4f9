"""Attribute values as pdata's Value.AsString() writes them (what the contrib clickhouseexporter stores)."""

from __future__ import annotations

import math

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from tracetune.collector.rows import value_string


def _array(*values: AnyValue) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=list(values)))


def _map(**values: AnyValue) -> AnyValue:
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in values.items()]))


@pytest.mark.parametrize("value, stored", [
    (AnyValue(string_value="plain <&>"), "plain <&>"),
    (AnyValue(bool_value=True), "true"),
    (AnyValue(int_value=-2**63), "-9223372036854775808"),
    (AnyValue(double_value=1.0), "1"),
    (AnyValue(double_value=0.25), "0.25"),
    (AnyValue(double_value=-0.0), "-0"),
    (AnyValue(double_value=1e20), "100000000000000000000"),
    (AnyValue(double_value=1e21), "1e+21"),
    (AnyValue(double_value=1.5e-7), "1.5e-7"),
    (AnyValue(double_value=1e-6), "0.000001"),
    (AnyValue(double_value=math.nan), "json: unsupported value: NaN"),
    (AnyValue(bytes_value=b"\x00\xffhi"), "AP9oaQ=="),  # base64, no JSON quotes
    (AnyValue(), ""),
    (_array(AnyValue(int_value=1), AnyValue(double_value=2.0), AnyValue(string_value="<&\u2028")),
     '[1,2,"<&\\u2028"]'),  # no HTML escaping (pdata's SetEscapeHTML(false)); U+2028 escaped as Go always does
    (_array(AnyValue(bytes_value=b"hi"), AnyValue()), '["aGk=",null]'),
    (_map(b=AnyValue(bool_value=False), a=_array()), '{"a":[],"b":false}'),  # keys sorted, as Go's encoding/json
    # pdata: `jsonStr, _ := json.Marshal(v.Slice().AsRaw())`; Go refuses NaN and ±Inf, so the whole value is ""
    (_array(AnyValue(int_value=1), AnyValue(double_value=math.nan)), ""),
    (_map(a=_array(AnyValue(double_value=math.inf))), ""),
])
def test_value_string_is_pdata_as_string(value, stored):
    assert value_string(value) == stored

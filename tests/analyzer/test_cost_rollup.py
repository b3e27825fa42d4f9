"""Cost per 1k from the rollups equals the raw-span computation on the same traffic."""

from __future__ import annotations

import time

import pytest

from tests.spans import COLUMNS, span_row
from tracetune import analyzer

PRICES = analyzer.PriceTable(
    version="test-1", currency="USD",
    models={"m-large": analyzer.prices.ModelPrice(2.0, 8.0)},
    routes={"fp32": 0.01, "int8": 0.004, "llm": 0.0, "crm": 0.0},
    calls={"create_followup": 0.002},
)


def span(trace: str, span_id: str, parent: str, name: str, start: int, duration: int, attrs: dict,
         links: list[tuple[str, str]] = ()) -> list:
    return span_row(start, trace_id=trace, span_id=span_id, parent=parent, name=name, attrs=attrs, duration=duration,
                    links=links)


@pytest.fixture
def traffic(client):
    now = time.time_ns() - 30 * 10**9
    rows, classify_spans = [], []
    for i in range(40):
        trace = f"{i + 1:032x}"
        base = {"tracetune.pipeline": "triage", "tracetune.tenant": "acme" if i % 2 else "globex"}
        rows.append(span(trace, f"{i:08x}00000000", "", "triage", now + i * 1000, 50_000_000, base))
        route = "fp32" if i % 4 else "int8"
        sid = f"{i:08x}00000001"
        classify = {**base, "tracetune.step": "classify", "tracetune.route": route}
        if i % 5:  # batched (cache misses): compute comes from the batch span
            classify["tracetune.batch_size"] = "4"
            classify_spans.append((trace, sid, route))
        rows.append(span(trace, sid, f"{i:08x}00000000", "classify", now + i * 1000, 3_000_000 + i * 1000, classify))
        if i % 3 == 0:
            rows.append(span(trace, f"{i:08x}00000002", f"{i:08x}00000000", "escalate", now + i * 1000, 400_000_000,
                             {**base, "tracetune.step": "escalate", "tracetune.route": "llm",
                              "gen_ai.request.model": "m-large", "gen_ai.usage.input_tokens": str(100 + i),
                              "gen_ai.usage.output_tokens": "7"}))
        if i % 4 == 1:
            rows.append(span(trace, f"{i:08x}00000003", f"{i:08x}00000000", "create_followup", now + i * 1000,
                             20_000_000, {**base, "tracetune.step": "create_followup", "tracetune.route": "crm"}))
    # Batch spans: groups of 4 same-route requests, each its own trace, linked to the steps it served.
    for route in ("fp32", "int8"):
        served = [(t, s) for t, s, r in classify_spans if r == route]
        for b in range(0, len(served), 4):
            group = served[b:b + 4]
            rows.append(span(f"{0xbbbb0000 + b:032x}", f"{b:012x}{route[:4].encode().hex()}"[:16], "",
                             "batch classify", now, 8_000_000 + b * 100_000,
                             {"tracetune.batch_size": str(len(group)), "tracetune.batch_of": "classify",
                              "tracetune.batch_pipeline": "triage", "tracetune.route": route}, group))
    client.insert("otel_traces", rows, column_names=COLUMNS)


@pytest.mark.parametrize("by", [("pipeline",), ("pipeline", "step"), ("step", "route"), ("model",)])
def test_rollup_cost_equals_raw_cost(client, traffic, by):
    raw = analyzer.cost_per_1k(client, "10m", by=by, prices=PRICES).sort(list(by))
    rollup = analyzer.cost_per_1k(client, "10m", by=by, prices=PRICES, source="rollup").sort(list(by))
    assert raw.height == rollup.height > 0
    assert raw[list(by)].to_dicts() == rollup[list(by)].to_dicts()
    for column in ("requests", "input_tokens", "output_tokens"):
        assert raw[column].to_list() == rollup[column].to_list(), column
    for column in ("compute_seconds", "token_cost", "compute_cost", "call_cost", "cost", "cost_per_1k"):
        assert rollup[column].to_list() == pytest.approx(raw[column].to_list(), rel=1e-9), column
    assert set(rollup["price_version"]) == {"test-1"}


def test_rollup_cost_refuses_tenant(client, traffic):
    with pytest.raises(ValueError, match="source='raw'"):
        analyzer.cost_per_1k(client, "10m", by=("tenant",), prices=PRICES, source="rollup")


def test_a_step_priced_per_call_counts_as_priced_on_any_route_raw_and_rollup(client):
    """create_followup has a per-call price: on a route the table does not list it still costs its call, and
    is not reported unpriced; a step with neither a call price nor a listed route is."""
    now = time.time_ns() - 20 * 10**9
    rows = []
    for i, (step, route) in enumerate([("create_followup", "crm-eu"), ("create_followup", "crm-eu"),
                                       ("lookup", "crm-eu")]):
        trace = f"{0xc0ffee00 + i:032x}"
        base = {"tracetune.pipeline": "calls"}
        rows.append(span(trace, f"{i:08x}0000000a", "", "calls", now + i, 10_000_000, base))
        rows.append(span(trace, f"{i:08x}0000000b", f"{i:08x}0000000a", step, now + i, 5_000_000,
                         {**base, "tracetune.step": step, "tracetune.route": route}))
    client.insert("otel_traces", rows, column_names=COLUMNS)
    for source in ("raw", "rollup"):
        by_step = {r["step"]: r for r in analyzer.cost_per_1k(client, "10m", by=("pipeline", "step"), pipeline="calls",
                                                             prices=PRICES, source=source).iter_rows(named=True)}
        assert by_step["create_followup"]["unpriced_spans"] == 0, source
        assert by_step["create_followup"]["call_cost"] == pytest.approx(2 * PRICES.calls["create_followup"]), source
        assert by_step["lookup"]["unpriced_spans"] == 1, source

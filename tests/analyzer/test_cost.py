"""Cost per request and per 1k requests against figures worked out by hand, and prices.toml checks."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from tests.spans import COLUMNS, span_row
from tracetune import store
from tracetune.analyzer.cost import cost_over_time, cost_per_1k, cost_per_request
from tracetune.analyzer.prices import DEFAULT_PRICES_PATH, ModelPrice, PricesError, PriceTable, current, load, publish

MS = 1_000_000

PRICES = PriceTable(
    version="test-1", currency="USD",
    models={"standin-llm-1": ModelPrice(0.5, 1.5), "gpt-4o-mini": ModelPrice(0.15, 0.6)},
    routes={"fp32": 0.001, "int8": 0.0005, "llm": 0.0},
    calls={"crm_followup": 0.002, "openai": 0.0001},
)


def span(trace: str, span_id: str, parent: str, start_ms: float, end_ms: float, attrs: dict, name: str = "",
         base: int = 0, links: tuple = ()) -> list:
    start = base + int(start_ms * MS)
    return span_row(start, trace_id=trace, span_id=span_id, parent=parent,
                    name=name or attrs.get("tracetune.step", "span"), attrs=attrs,
                    duration=int((end_ms - start_ms) * MS), links=links)


def root(trace: str, pipeline: str, tenant: str, base: int, end_ms: float = 1000) -> list:
    attrs = {"tracetune.pipeline": pipeline, "tracetune.config_version": "3"}
    if tenant:
        attrs["tracetune.tenant"] = tenant
    return span(trace, f"{trace}-root", "", 0, end_ms, attrs, name=pipeline, base=base)


def step(trace: str, name: str, start_ms: float, end_ms: float, base: int, pipeline: str = "triage",
         route: str = "", batch_size: int = 0) -> list:
    attrs = {"tracetune.pipeline": pipeline, "tracetune.step": name}
    if route:
        attrs["tracetune.route"] = route
    if batch_size:
        attrs["tracetune.batch_size"] = str(batch_size)
    return span(trace, f"{trace}-{name}", f"{trace}-root", start_ms, end_ms, attrs, base=base)


def llm(trace: str, start_ms: float, end_ms: float, base: int, model: str, provider: str, tokens_in: int,
        tokens_out: int) -> list:
    return span(trace, f"{trace}-respond", f"{trace}-root", start_ms, end_ms, {
        "tracetune.pipeline": "triage", "tracetune.step": "respond", "tracetune.route": "llm",
        "gen_ai.request.model": model, "gen_ai.provider.name": provider,
        "gen_ai.usage.input_tokens": str(tokens_in), "gen_ai.usage.output_tokens": str(tokens_out)}, base=base)


def seed(client) -> None:
    """Five triage requests, one search request, one batch span and one request outside the window.

    Hand-worked costs at PRICES (self time × route price, batch 80 ms / 4 = 20 ms each at int8):
      t1 acme    embed fp32 self 400-150 ms = 0.00025 | classify batched 0.00001 |
                 respond standin 1000 in + 500 out = 0.00125 | crm_followup per call 0.002  -> 0.00351
      t2 acme    embed 100 ms = 0.0001 | classify 0.00001 | respond gpt-4o-mini 2000/100 = 0.00036
                 + openai per call 0.0001                                                   -> 0.00057
      t3 globex  embed 0.0001 | classify 0.00001                                            -> 0.00011
      t4 globex  classify 0.00001 | respond with an unpriced model                         -> 0.00001
      t5 acme    no steps                                                                   -> 0
      s1         search embed fp32 200 ms                                                   -> 0.0002
    """
    now = time.time_ns() - 60 * 10**9
    rows = [
        root("t1", "triage", "acme", now),
        step("t1", "embed", 0, 400, now, route="fp32"),
        span("t1", "t1-tok", "t1-embed", 50, 150, {}, name="tokenize", base=now),  # overlapping children:
        span("t1", "t1-io", "t1-embed", 100, 200, {}, name="read", base=now),  # 150 ms covered
        step("t1", "classify", 400, 600, now, route="int8", batch_size=4),
        llm("t1", 600, 900, now, "standin-llm-1", "standin", 1000, 500),
        step("t1", "crm_followup", 900, 950, now),
        root("t2", "triage", "acme", now + 10 * MS),
        step("t2", "embed", 0, 100, now + 10 * MS, route="fp32"),
        step("t2", "classify", 100, 300, now + 10 * MS, route="int8"),
        llm("t2", 300, 700, now + 10 * MS, "gpt-4o-mini", "openai", 2000, 100),
        root("t3", "triage", "globex", now + 20 * MS),
        step("t3", "embed", 0, 100, now + 20 * MS, route="fp32"),
        step("t3", "classify", 100, 300, now + 20 * MS, route="int8"),
        root("t4", "triage", "globex", now + 30 * MS),
        step("t4", "classify", 0, 300, now + 30 * MS, route="int8"),
        llm("t4", 300, 400, now + 30 * MS, "mystery-model", "", 100, 0),
        root("t5", "triage", "acme", now + 40 * MS, end_ms=5),
        root("s1", "search", "", now + 50 * MS),
        step("s1", "embed", 0, 200, now + 50 * MS, pipeline="search", route="fp32"),
        # One batch span (its own trace, as the executor's batcher emits it) served four classify steps.
        span("b1", "b1-batch", "", 150, 230, {"tracetune.batch_size": "4"}, name="batch classify", base=now,
             links=tuple((t, f"{t}-classify") for t in ("t1", "t2", "t3", "t4"))),
        # Two hours old: outside every window used below.
        root("old", "triage", "acme", now - 7200 * 10**9),
        llm("old", 0, 100, now - 7200 * 10**9, "standin-llm-1", "standin", 10**9, 10**9),
    ]
    client.insert("otel_traces", rows, column_names=COLUMNS)


@pytest.fixture(scope="module")
def seeded(store_settings):
    """One database for the read-only cost tests, seeded once, with PRICES published."""
    settings = store_settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")
    client = store.connect(settings)
    seed(client)
    publish(client, PRICES)
    return client


def by_key(frame: pl.DataFrame, *keys: str) -> dict:
    return {tuple(row[k] for k in keys) if len(keys) > 1 else row[keys[0]]: row
            for row in frame.iter_rows(named=True)}


def test_cost_per_request_matches_the_hand_worked_figures(seeded):
    frame = cost_per_request(seeded, "5m", pipeline="triage")
    rows = by_key(frame, "trace_id")
    assert set(rows) == {"t1", "t2", "t3", "t4", "t5"}
    t1 = rows["t1"]
    assert t1["token_cost"] == pytest.approx(0.00125)
    assert t1["compute_seconds"] == pytest.approx(0.25 + 0.02 + 0.3 + 0.05)  # self times + batch share
    assert t1["compute_cost"] == pytest.approx(0.00025 + 0.00001)
    assert t1["call_cost"] == pytest.approx(0.002)
    assert t1["cost"] == pytest.approx(0.00351)
    assert t1["tenant"] == "acme" and t1["steps"] == 4 and t1["input_tokens"] == 1000
    assert rows["t2"]["cost"] == pytest.approx(0.00057) and rows["t2"]["call_cost"] == pytest.approx(0.0001)
    assert rows["t3"]["cost"] == pytest.approx(0.00011)
    assert rows["t4"]["cost"] == pytest.approx(0.00001) and rows["t4"]["unpriced_spans"] == 1
    assert rows["t5"]["cost"] == 0 and rows["t5"]["steps"] == 0
    assert set(frame["price_version"]) == {"test-1"} and set(frame["currency"]) == {"USD"}
    assert frame["timestamp"].dtype == pl.Datetime("us", "UTC")
    assert cost_per_request(seeded, "5m", limit=2).height == 2


def test_cost_per_1k_by_pipeline_and_tenant(seeded):
    frame = cost_per_1k(seeded, "5m")
    rows = by_key(frame, "pipeline")
    assert rows["triage"]["requests"] == 5 and rows["triage"]["cost"] == pytest.approx(0.0042)
    assert rows["triage"]["cost_per_1k"] == pytest.approx(1000 * 0.0042 / 5)
    assert rows["search"]["requests"] == 1 and rows["search"]["cost_per_1k"] == pytest.approx(0.2)
    assert set(frame["price_version"]) == {"test-1"}
    # The per-1k figure is 1000 × the mean cost of a request.
    requests = cost_per_request(seeded, "5m", pipeline="triage")
    assert rows["triage"]["cost_per_1k"] == pytest.approx(1000 * requests["cost"].mean())

    tenants = by_key(cost_per_1k(seeded, "5m", by="tenant", pipeline="triage"), "tenant")
    assert tenants["acme"]["requests"] == 3 and tenants["acme"]["cost_per_1k"] == pytest.approx(1000 * 0.00408 / 3)
    assert tenants["globex"]["requests"] == 2 and tenants["globex"]["cost_per_1k"] == pytest.approx(0.06)


def test_cost_per_1k_by_route_and_model_adds_up_to_the_pipeline(seeded):
    routes = by_key(cost_per_1k(seeded, "5m", by=("route",), pipeline="triage"), "route")
    assert set(routes) == {"fp32", "int8", "llm", ""}
    assert all(row["requests"] == 5 for row in routes.values())  # every row is per triage request
    assert routes["fp32"]["cost_per_1k"] == pytest.approx(1000 * 0.00045 / 5)
    assert routes["int8"]["compute_seconds"] == pytest.approx(4 * 0.02)  # the batch share, not the span
    assert routes["int8"]["cost_per_1k"] == pytest.approx(1000 * 0.00004 / 5)
    assert routes["llm"]["cost_per_1k"] == pytest.approx(1000 * 0.00171 / 5)
    assert routes[""]["call_cost"] == pytest.approx(0.002)
    assert sum(row["cost_per_1k"] for row in routes.values()) == pytest.approx(1000 * 0.0042 / 5)

    models = by_key(cost_per_1k(seeded, "5m", by=["model"], pipeline="triage"), "model")
    assert models["standin-llm-1"]["token_cost"] == pytest.approx(0.00125)
    assert models["gpt-4o-mini"]["token_cost"] == pytest.approx(0.00036)
    assert models["mystery-model"]["cost"] == 0 and models["mystery-model"]["unpriced_spans"] == 1

    mixed = by_key(cost_per_1k(seeded, "5m", by=("tenant", "route"), pipeline="triage"), "tenant", "route")
    assert mixed[("acme", "fp32")]["requests"] == 3
    assert mixed[("acme", "fp32")]["cost_per_1k"] == pytest.approx(1000 * 0.00035 / 3)
    assert mixed[("globex", "int8")]["cost_per_1k"] == pytest.approx(1000 * 0.00002 / 2)

    everything = cost_per_1k(seeded, "5m", by=())
    assert everything["requests"].to_list() == [6] and everything["cost"][0] == pytest.approx(0.0044)

    with pytest.raises(ValueError, match="cannot group cost by 'color'"):
        cost_per_1k(seeded, "5m", by=("color",))


def test_cost_over_time_and_explicit_prices(seeded):
    series = cost_over_time(seeded, "5m", bucket_seconds=3600, pipeline="triage")
    assert series["requests"].sum() == 5 and series["cost"].sum() == pytest.approx(0.0042)
    assert set(series["price_version"]) == {"test-1"}
    assert series["bucket"].dtype == pl.Datetime("us", "UTC")

    doubled = PriceTable(
        version="test-2x", currency="USD",
        models={k: ModelPrice(2 * v.input_per_1m, 2 * v.output_per_1m) for k, v in PRICES.models.items()},
        routes={k: 2 * v for k, v in PRICES.routes.items()}, calls={k: 2 * v for k, v in PRICES.calls.items()})
    frame = cost_per_1k(seeded, "5m", pipeline="triage", prices=doubled)
    assert frame["cost_per_1k"].to_list() == [pytest.approx(2 * 1000 * 0.0042 / 5)]
    assert frame["price_version"].to_list() == ["test-2x"]

    assert cost_per_request(seeded, "5m", pipeline="nope").is_empty()
    empty = cost_over_time(seeded, "1s", pipeline="nope")
    assert empty.is_empty() and "price_version" in empty.columns


def test_publish_is_idempotent_and_current_is_the_latest(client):
    with pytest.raises(PricesError, match="no price table is published"):
        cost_per_1k(client, "5m")
    assert current(client) is None
    assert publish(client, PRICES) is True
    assert publish(client, PRICES) is False
    assert client.query("SELECT count() FROM tracetune_prices").result_rows[0][0] == 1
    assert current(client) == PRICES
    changed = PriceTable(version="test-1", currency="USD", routes={"fp32": 1.0})
    with pytest.raises(PricesError, match="already published with different prices; bump `version`"):
        publish(client, changed)
    newer = PriceTable(version="test-2", currency="EUR", routes={"fp32": 1.0})
    assert publish(client, newer) is True
    assert current(client) == newer
    assert cost_per_1k(client, "5m")["price_version"].dtype == pl.Utf8


def test_the_shipped_prices_toml_loads():
    table = load(DEFAULT_PRICES_PATH)
    assert table.version and table.currency == "USD"
    assert table.models["standin-small"].output_per_1m > 0 and table.models["standin-large"].output_per_1m > 0
    assert {"fp32", "int8", "llm", "llm-small", "llm-large"} <= set(table.routes) and "create_followup" in table.calls
    assert len(table.hash) == 64


def test_the_hash_follows_the_numbers_not_the_layout(tmp_path: Path):
    a = tmp_path / "a.toml"
    a.write_text('version = "v1"\ncurrency = "USD"\n[routes.fp32]\ncore_second = 1\n[models.m]\n'
                 'input_per_1m = 2\noutput_per_1m = 3\n')
    b = tmp_path / "b.toml"
    b.write_text('# same prices, other layout\ncurrency = "USD"\nversion = "v1"\n'
                 'models = { m = { output_per_1m = 3.0, input_per_1m = 2.0 } }\nroutes.fp32.core_second = 1.0\n')
    assert load(a).hash == load(b).hash
    b.write_text(b.read_text().replace("3.0", "3.5"))
    assert load(a).hash != load(b).hash


BASE = 'version = "v1"\ncurrency = "USD"\n'


@pytest.mark.parametrize("text, message", [
    ('currency = "USD"\n', "`version` must be a quoted, non-empty string"),
    ('version = 2026-11-01\ncurrency = "USD"\n', "`version` must be a quoted"),
    ('version = "v1"\ncurrency = "dollars"\n', "`currency` must be a three-letter"),
    ('version = "v1"\n', "`currency` must be a three-letter"),
    (BASE + 'colour = "red"\n', "unknown key `colour`"),
    (BASE + '[models."gpt-4o-mini"]\ninput_per_1m = -1\noutput_per_1m = 1\n',
     "`models.gpt-4o-mini.input_per_1m` must be a number >= 0, got -1"),
    (BASE + '[models.m]\ninput_per_1m = "cheap"\noutput_per_1m = 1\n', "`models.m.input_per_1m` must be a number"),
    (BASE + '[models.m]\ninput_per_1m = true\noutput_per_1m = 1\n', "`models.m.input_per_1m` must be a number"),
    (BASE + '[models.m]\ninput_per_1m = 1\n', "`models.m.output_per_1m` is missing"),
    (BASE + '[models.m]\ninput_per_1m = 1\noutput_per_1m = 1\ninptu_per_1m = 2\n',
     "unknown key `models.m.inptu_per_1m`"),
    (BASE + '[routes.fp32]\ncore_seconds = 0.1\n', "unknown key `routes.fp32.core_seconds`"),
    (BASE + '[routes]\nfp32 = 0.1\n', "`routes.fp32` must be a table with core_second"),
    (BASE + '[calls.crm]\nper_call = inf\n', "`calls.crm.per_call` must be a number >= 0"),
    (BASE + 'models = 3\n', "`models` must be a table"),
    (BASE + '[models.m\n', "not valid TOML"),
])
def test_prices_toml_errors_are_one_line_and_name_the_key(tmp_path: Path, text: str, message: str):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PricesError) as caught:
        load(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("prices.toml: ")


def test_a_missing_prices_file_says_so(tmp_path: Path):
    with pytest.raises(PricesError, match="cannot read the price table"):
        load(tmp_path / "nowhere.toml")


# ---- the shipped prices and the demo they price -----------------------------------------------------

def test_the_stand_in_tiers_cost_what_the_real_models_of_their_tiers_cost():
    table = load(DEFAULT_PRICES_PATH)
    assert table.models["standin-small"] == table.models["gpt-4o-mini"] == ModelPrice(0.15, 0.60)
    assert table.models["standin-large"] == table.models["gpt-4o"] == ModelPrice(2.50, 10.00)
    # The same cores run both variants: int8 is cheaper by taking fewer seconds, not by a lower rate.
    assert table.routes["fp32"] == table.routes["int8"] > 0


def test_every_model_and_route_the_demo_writes_is_priced():
    from tracetune.demo import standins, triage

    table = load(DEFAULT_PRICES_PATH)
    assert set(standins.MODELS) <= set(table.models)
    assert {*triage.VARIANTS, *triage.LLM_TIERS, "llm", "crm"} <= set(table.routes)
    assert all(table.routes[route] == 0 for route in (*triage.LLM_TIERS, "llm", "crm"))  # paid per token / call


def test_with_the_demo_defaults_tokens_are_the_cost_and_the_pricier_tier_most_of_it(client):
    """100 requests shaped like a minute of the demo at its default knobs (docs/cost.md): classify on
    fp32 / int8 at 80/20, 11 tickets escalated (8 to the small tier, 3 to the large, 90 tokens in and 2
    out each), 22 urgent ones filing a CRM follow-up. At the shipped prices, by hand:
      tokens   8 × (90 × 0.15 + 2 × 0.60) / 1e6 = 0.0001176   3 × (90 × 2.50 + 2 × 10) / 1e6 = 0.000735
      compute  (80 × 11 ms + 20 × 5.5 ms) × 0.0000118 / s = 0.000011682
      calls    22 × 0.0000035 = 0.000077                                    total 0.000941282
    """
    table = load(DEFAULT_PRICES_PATH)
    now = time.time_ns() - 60 * 10**9
    rows = []
    for i in range(100):
        trace, base = f"d{i:03d}", now + i * MS
        rows += [root(trace, "ticket_triage", "", base),
                 step(trace, "classify", 0, 11 if i < 80 else 5.5, base, "ticket_triage", "fp32" if i < 80 else "int8")]
        if i % 9 == 0 and i < 99:  # 11 escalations; tickets 0, 36 and 72 go to the large tier
            tier = "large" if i % 4 == 0 and i < 90 else "small"
            rows.append(span(trace, f"{trace}-escalate", f"{trace}-root", 20, 400, {
                "tracetune.pipeline": "ticket_triage", "tracetune.step": "escalate", "tracetune.route": f"llm-{tier}",
                "gen_ai.request.model": f"standin-{tier}", "gen_ai.provider.name": "openai_compatible",
                "gen_ai.usage.input_tokens": "90", "gen_ai.usage.output_tokens": "2"}, base=base))
        if i % 9 == 1 or i % 9 == 4:  # 22 follow-ups
            rows.append(step(trace, "create_followup", 400, 425, base, "ticket_triage", "crm"))
    client.insert("otel_traces", rows, column_names=COLUMNS)

    by_route = by_key(cost_per_1k(client, "5m", by=("step", "route"), prices=table), "step", "route")
    assert by_route[("escalate", "llm-small")]["spans"] == 8 and by_route[("escalate", "llm-large")]["spans"] == 3
    assert by_route[("create_followup", "crm")]["spans"] == 22
    total = cost_per_1k(client, "5m", by="pipeline", prices=table).row(0, named=True)
    assert total["requests"] == 100 and total["unpriced_spans"] == 0
    assert total["cost"] == pytest.approx(0.000941282)
    assert total["token_cost"] / total["cost"] > 0.9  # tokens decide the cost...
    assert by_route[("escalate", "llm-large")]["cost"] / total["cost"] > 0.75  # ...the tier weights most of it
    assert total["call_cost"] / total["cost"] < 0.1 and total["compute_cost"] / total["cost"] < 0.02

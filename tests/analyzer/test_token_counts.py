"""An LLM call's tokens are counted once: by a tool summing `gen_ai.usage.*` over every span, and by the
rollup, the analyzer's cost and the tuner's calibration, whoever wrote the spans (this executor, an older
one, an app of its own). The spans come from the executor's real ChatClient against the stand-in LLM."""

from __future__ import annotations

import pytest

from tests.spans import COLUMNS, LLM_GENERATIONS, llm_traces
from tracetune import analyzer
from tracetune.analyzer.cost import cost_per_request
from tracetune.tuner.calibration import LATENCY_SQL

MODEL = "standin-small"
PRICES = analyzer.PriceTable(version="test-1", currency="USD", models={MODEL: analyzer.prices.ModelPrice(0.15, 0.6)},
                             routes={}, calls={})
TEXTS = ["I was charged twice for my pro subscription", "the parcel never arrived and tracking is stuck",
         "I cannot log in since the update", "please cancel my plan at the end of the month",
         "the app crashes when I open settings"]

# What a GenAI-aware tool (Langfuse, Phoenix) or a user's own SQL adds up: usage on every span of the traces.
GENAI_USAGE_SQL = """
SELECT sum(toUInt64OrZero(SpanAttributes['gen_ai.usage.input_tokens'])),
       sum(toUInt64OrZero(SpanAttributes['gen_ai.usage.output_tokens']))
FROM otel_traces WHERE ServiceName = 'llm-traces'
"""
ROLLUP_SQL = """
SELECT sum(input_tokens), sum(output_tokens), sumIf(input_tokens, kind = 'step'), sumIf(output_tokens, kind = 'step')
FROM {table} WHERE pipeline = 'answers'
"""


@pytest.fixture(scope="module")
def traces() -> dict[str, tuple[list, tuple[int, int]]]:
    return {generation: llm_traces(TEXTS, generation, model=MODEL) for generation in LLM_GENERATIONS}


def test_summing_genai_usage_over_every_span_of_executor_traces_counts_each_call_once(client, traces):
    rows, tokens = traces["executor"]
    client.insert("otel_traces", rows, column_names=COLUMNS)
    assert client.query(GENAI_USAGE_SQL).result_rows == [tokens]
    assert tokens[0] > 10 * len(TEXTS) and tokens[1] >= len(TEXTS)


@pytest.mark.parametrize("generation", LLM_GENERATIONS)
def test_the_rollup_cost_and_calibration_count_each_call_once(client, traces, generation):
    """Every row of both rollups, the raw and rollup cost, and the calibration's tokens per call."""
    rows, (tokens_in, tokens_out) = traces[generation]
    client.insert("otel_traces", rows, column_names=COLUMNS)
    for table in ("tracetune_spans_1m", "tracetune_spans_1h"):
        assert client.query(ROLLUP_SQL.replace("{table}", table)).result_rows == [
            (tokens_in, tokens_out, tokens_in, tokens_out)], table

    requests = cost_per_request(client, "10m", pipeline="answers", prices=PRICES)
    assert requests.height == len(TEXTS)
    assert (requests["input_tokens"].sum(), requests["output_tokens"].sum()) == (tokens_in, tokens_out)
    token_cost = (tokens_in * 0.15 + tokens_out * 0.6) / 1e6
    assert requests["token_cost"].sum() == pytest.approx(token_cost, rel=1e-9)
    for source in ("raw", "rollup"):
        [row] = analyzer.cost_per_1k(client, "10m", by=("pipeline", "step"), pipeline="answers", prices=PRICES,
                                     source=source).to_dicts()
        assert (row["step"], row["requests"], row["input_tokens"], row["output_tokens"]) == (
            "draft", len(TEXTS), tokens_in, tokens_out), source
        assert row["token_cost"] == pytest.approx(token_cost, rel=1e-9), source
        assert row["cost_per_1k"] == pytest.approx(1000 * token_cost / len(TEXTS), rel=1e-9), source

    [(step, _, spans, input_tokens, output_tokens, model)] = [
        (r[0], r[1], r[2], r[5], r[6], r[7])
        for r in client.query(LATENCY_SQL, parameters={"pipeline": "answers", "window": 600}).result_rows]
    assert (step, spans, model) == ("draft", len(TEXTS), MODEL)
    assert (input_tokens, output_tokens) == pytest.approx((tokens_in / len(TEXTS), tokens_out / len(TEXTS)))

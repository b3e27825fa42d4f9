"""Raw-span questions of the Steps page read only granules that can hold their answer: the span attribute key
index (idx_span_attr_key) skips every granule without a batched span or a cold start, so those two questions cost
next to nothing over traffic that has neither, and answer the same as a full read over traffic that has them."""

from __future__ import annotations

import re
import time

import numpy as np

from tests.spans import COLUMNS, span_row
from tracetune import analyzer
from tracetune.analyzer import stats

SPANS = 20_000  # a few granules (8192 rows each)


def _seed(client, attrs_of) -> None:
    now = time.time_ns()
    rows = [span_row(now - 600 * 10**9 + i * 10**6, trace_id=f"{i // 4:032x}", parent="p" if i % 4 else "",
                     name="classify", attrs=attrs_of(i), duration=(1 + i % 7) * 10**6) for i in range(SPANS)]
    client.insert("otel_traces", rows, column_names=COLUMNS)


def _plan(client, sql: str) -> str:
    return "\n".join(r[0] for r in client.query("EXPLAIN indexes = 1 " + sql,
                                                parameters={"window_seconds": 3600, "pipeline": ""}).result_rows)


def _granules_after_key_index(client, sql: str) -> tuple[int, int]:
    """(granules left, granules before) at the span attribute key index, from EXPLAIN indexes = 1."""
    plan = _plan(client, sql)
    found = re.search(r"Name: idx_span_attr_key.*?Granules: (\d+)/(\d+)", plan, re.S)
    assert found, plan
    return int(found.group(1)), int(found.group(2))


def test_batching_and_cold_starts_skip_granules_without_their_attributes(client):
    _seed(client, lambda i: {"tracetune.pipeline": "p", "tracetune.step": "classify", "tracetune.route": "fp32"})
    left, before = _granules_after_key_index(client, stats.BATCHING_SQL)
    assert before >= 2 and left == 0
    # cold starts: the guard (a scalar subquery over the key index) folds the window's filter to a constant 0,
    # so the spans are never read
    assert re.search(r"Filter column: 0\n.*ReadFromMergeTree", _plan(client, stats.COLD_STARTS_SQL), re.S)
    assert analyzer.batching(client, "1h").is_empty() and analyzer.cold_starts(client, "1h").is_empty()


def test_with_batched_spans_and_cold_starts_the_answers_are_the_full_reads(client):
    def attrs(i: int) -> dict[str, str]:
        a = {"tracetune.pipeline": "p", "tracetune.step": "classify", "tracetune.route": "fp32"}
        if i % 4 and i < 3000:
            a |= {"tracetune.batch_size": str(1 + i % 5), "tracetune.queue_ms": str(i % 11)}
        if i in (5, 9_001):
            a["tracetune.cold_start"] = "true"
        return a

    _seed(client, attrs)
    batched = analyzer.batching(client, "1h").row(0, named=True)
    step_spans = [i for i in range(SPANS) if i % 4]
    assert batched["batched_spans"] == len([i for i in step_spans if i < 3000])
    assert batched["batch_size_max"] == 5
    cold = analyzer.cold_starts(client, "1h").row(0, named=True)
    warm = sorted((1 + i % 7) for i in step_spans if i not in (5, 9_001))
    assert cold["cold_starts"] == 2 and cold["cold_ms_max"] == max(1 + 5 % 7, 1 + 9_001 % 7)
    assert cold["warm_ms_p50"] == float(np.percentile(warm, 50))  # every warm span counted, not only the cold granules

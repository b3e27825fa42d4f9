"""Batcher bounds and links, no request lost or answered twice; cache TTL, LRU bound."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracetune.executor.batcher import Batcher
from tracetune.executor.cache import TTLCache, normalise


def _tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_batches_respect_max_size_and_every_request_is_answered_once():
    tracer, exporter = _tracing()
    calls: list[list[int]] = []
    lock = threading.Lock()

    def run(items):
        with lock:
            calls.append(list(items))
        time.sleep(0.002)
        return [i * 10 for i in items]

    batcher = Batcher("double", run, max_size=8, max_wait_ms=20, tracer=tracer)

    def request(i: int):
        with tracer.start_as_current_span(f"req-{i}") as span:
            result = batcher.submit(i).result(10)
            return i, result, span.get_span_context().span_id

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(request, range(400)))
    batcher.close()

    assert sorted(i for i, _, _ in results) == list(range(400))
    assert all(r.value == i * 10 for i, r, _ in results)
    served = [i for call in calls for i in call]
    assert sorted(served) == list(range(400))  # each request ran exactly once
    assert max(len(c) for c in calls) <= 8
    assert any(len(c) > 1 for c in calls)  # under concurrency, requests did share batches
    for _i, r, _ in results:
        assert 1 <= r.batch_size <= 8 and r.queue_ms >= 0

    # One batch span per batch, linked to exactly the request spans it served.
    batch_spans = [s for s in exporter.get_finished_spans() if s.name == "batch double"]
    assert len(batch_spans) == len(calls)
    linked = [link.context.span_id for s in batch_spans for link in s.links]
    assert sorted(linked) == sorted(sid for _, _, sid in results)
    assert all(s.attributes["tracetune.batch_size"] == len(s.links) for s in batch_spans)


def test_a_lone_request_waits_at_most_max_wait():
    batcher = Batcher("solo", lambda items: items, max_size=64, max_wait_ms=30)
    result = batcher.submit("x").result(5)
    batcher.close()
    assert result.batch_size == 1
    assert 25 <= result.queue_ms  # waited for company, then ran alone


def test_reconfigure_applies_to_queued_requests_and_failures_reach_every_waiter():
    gate = threading.Event()
    sizes = []

    def run(items):
        gate.wait(5)
        sizes.append(len(items))
        if "bad" in items:
            raise ValueError("model exploded")
        return items

    batcher = Batcher("b", run, max_size=1, max_wait_ms=0)
    first = batcher.submit("a")  # occupies the worker until the gate opens
    time.sleep(0.05)
    queued = [batcher.submit(str(i)) for i in range(6)]
    batcher.configure(max_size=3, max_wait_ms=0)
    gate.set()
    assert first.result(5).value == "a" and [f.result(5).value for f in queued] == [str(i) for i in range(6)]
    assert sizes == [1, 3, 3]
    failing = [batcher.submit("ok"), batcher.submit("bad")]
    for f in failing:
        try:
            f.result(5)
        except ValueError as exc:
            assert "exploded" in str(exc)
        else:
            raise AssertionError("failure was not delivered")
    batcher.close()


def test_cache_ttl_lru_and_normalisation():
    now = [0.0]
    cache = TTLCache(max_entries=2, ttl_seconds=10, clock=lambda: now[0])
    cache.put(normalise("Hello   World"), 1)
    assert cache.get(normalise("hello world")) == 1
    now[0] = 10.5
    assert cache.get("hello world") is TTLCache.MISSING  # expired
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now most recent
    cache.put("c", 3)  # evicts b, the least recently used
    assert cache.get("b") is TTLCache.MISSING and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2 and cache.hits == 4 and cache.misses == 2


def test_length_bucketing_batches_only_one_length_bucket():
    gate = threading.Event()
    batches: list[list[int]] = []

    def run(items):
        gate.wait(5)
        batches.append(list(items))
        return items

    batcher = Batcher("len", run, max_size=8, max_wait_ms=0, length=lambda n: n, bucket_by_length=True)
    first = batcher.submit(5)  # occupies the worker until the gate opens
    time.sleep(0.05)
    lengths = [100, 3, 120, 7, 110, 12, 9, 125]  # buckets of 16 tokens: long ones together, short ones together
    futures = [batcher.submit(n) for n in lengths]
    gate.set()
    results = [f.result(5) for f in futures]
    first.result(5)
    batcher.close()
    assert sorted(r.value for r in results) == sorted(lengths)  # nobody lost
    assert batches[1:] == [[100, 110], [3, 7, 12, 9], [120, 125]]  # oldest first, then its own bucket only
    by_value = {r.value: r for r in results}
    assert by_value[100].padding_ratio == (110 - 100) / (2 * 110)
    assert batcher.padding_waste[0] < batcher.padding_waste[1]


def test_cache_configure_shortens_the_ttl_of_stored_entries_and_trims_to_the_new_bound():
    now = [0.0]
    cache = TTLCache(max_entries=3, ttl_seconds=100, clock=lambda: now[0])
    for key in ("a", "b", "c"):
        cache.put(key, key.upper())
    now[0] = 40.0
    assert cache.get("c") == "C"
    cache.configure(ttl_seconds=30)  # stored at 0: past a 30 s TTL now
    assert cache.get("c") is TTLCache.MISSING
    cache.put("c", "C")
    assert cache.get("c") == "C"  # stored at 40: fresh under the new TTL
    cache.configure(max_entries=1)  # keeps the most recent only
    assert len(cache) == 1 and cache.get("c") == "C"
    cache.configure(ttl_seconds=-5, max_entries=0)  # clamped: nothing kept past its storing instant, one entry
    assert (cache.ttl_seconds, cache.max_entries) == (0.0, 1)
    assert cache.get("c") is TTLCache.MISSING

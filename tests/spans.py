"""One builder for `otel_traces` rows in tests: the columns of the collector's COLUMNS, by keyword."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from tracetune.collector.rows import COLUMNS

__all__ = ["COLUMNS", "LLM_GENERATIONS", "demo_traffic", "llm_traces", "span_row"]


def span_row(start: int, *, trace_id: str = "cd" * 16, span_id: str | None = None, parent: str = "",
             name: str = "span", kind: str = "SPAN_KIND_INTERNAL", service: str = "svc",
             attrs: dict[str, str] | None = None, duration: int = 0, status: str = "STATUS_CODE_UNSET",
             status_message: str = "", resource: dict[str, str] | None = None, scope: tuple[str, str] = ("", ""),
             links: Iterable[tuple[str, str]] = ()) -> list[Any]:
    """A span as a row for `client.insert("otel_traces", rows, column_names=COLUMNS)`.

    `start` and `duration` are nanoseconds; the span id defaults to one derived from `start`;
    `links` are (trace id, span id) pairs.
    """
    links = list(links)
    values = {
        "Timestamp": start, "TraceId": trace_id,
        "SpanId": span_id if span_id is not None else f"{start % (1 << 63):016x}",
        "ParentSpanId": parent, "TraceState": "", "SpanName": name, "SpanKind": kind, "ServiceName": service,
        "ResourceAttributes": resource or {}, "ScopeName": scope[0], "ScopeVersion": scope[1],
        "SpanAttributes": attrs or {}, "Duration": duration, "StatusCode": status, "StatusMessage": status_message,
        "Events.Timestamp": [], "Events.Name": [], "Events.Attributes": [],
        "Links.TraceId": [t for t, _ in links], "Links.SpanId": [s for _, s in links],
        "Links.TraceState": ["" for _ in links], "Links.Attributes": [{} for _ in links],
    }
    return [values[column] for column in COLUMNS]


def demo_traffic(start: datetime, seconds: float, drifts: Sequence[tuple[str, float, float]] = (), seed: int = 1,
                 rate: float = 20.0, jitter: float = 0.0) -> list[list[Any]]:
    """Tasks as the demo load generator draws them (tracetune.demo.load.TicketSource: duplicates, invalid
    tickets) as spans like ticket_triage's: a root span, normalize (text_length, word_count), classify
    (category, latency growing with the text), prioritize (priority, a 0.02 ms step that gets ~0.005 ms
    slower on long texts). drifts: (kind, from second, until second) injected in that span of the run.
    jitter: the sd of a per-10-second log-factor on every latency (CPU contention of a shared machine)."""
    import random

    import numpy as np

    from tracetune.demo.load import Drift, LoadPlan, TicketSource, arrivals

    plan = LoadPlan(rate=rate, duration=seconds, seed=seed)
    rng, lat = random.Random(seed), np.random.default_rng(seed)
    rows: list[list[Any]] = []
    plain = TicketSource(plan, rng)
    drifted = TicketSource(LoadPlan(rate=rate, duration=seconds, seed=seed,
                                    drifts=[Drift(kind, 0.0) for kind, _, _ in drifts]), rng)
    contention = np.exp(lat.normal(0.0, jitter, int(seconds // 10) + 1)) if jitter else np.ones(int(seconds // 10) + 1)
    for n, t in enumerate(arrivals(plan, rng)):
        source = drifted if any(begin <= t < end for _, begin, end in drifts) else plain
        ticket, _, _ = source.draw(t)
        text = " ".join(ticket.text.split())
        slow = float(contention[int(t // 10)])
        at = int((start + timedelta(seconds=t)).timestamp() * 1e9)
        trace, common = f"{seed:08x}{n:024x}", {"tracetune.pipeline": "ticket_triage"}
        steps = [("normalize", {"tracetune.feature.text_length": str(len(text)),
                                "tracetune.feature.word_count": str(len(text.split()))},
                  lat.lognormal(np.log(0.03), 0.3) * slow)]
        if text:
            priority = "P2" if ticket.category in ("login", "bug") else "P3"
            steps += [("classify", {"tracetune.feature.category": ticket.category},
                       lat.lognormal(np.log(4.0 * (1 + len(text) / 1500)), 0.3) * slow),
                      ("prioritize", {"tracetune.feature.priority": priority},
                       lat.lognormal(np.log(0.02 + len(text) * 1e-5), 0.2) * slow)]
        offset = 0
        for i, (step, features, ms) in enumerate(steps):
            rows.append(span_row(at + offset, trace_id=trace, span_id=f"{n:08x}{i + 1:08x}", parent=f"{n:016x}",
                                 name=step, attrs=common | {"tracetune.step": step} | features,
                                 duration=int(ms * 1e6)))
            offset += int(ms * 1e6)
        rows.append(span_row(at, trace_id=trace, span_id=f"{n:016x}", name="ticket_triage", kind="SPAN_KIND_SERVER",
                             attrs=dict(common), duration=offset))
    return rows


LLM_GENERATIONS = ("executor", "older_executor", "own_app")
"""Who wrote an LLM call's spans (llm_traces): this executor; an executor from before `tracetune.llm.*` (its
step span carried the call's `gen_ai.usage.*` beside the CLIENT span's); an app of its own as the README shows
it (the span naming the step is the call, with `gen_ai.usage.*`, and there is no CLIENT span)."""


def llm_traces(texts: Sequence[str], generation: str = "executor", pipeline: str = "answers",
               model: str = "standin-small") -> tuple[list[list[Any]], tuple[int, int]]:
    """A one-step executor pipeline (step `draft`) asks the OpenAI-compatible stand-in, a real HTTP server,
    to classify each text: its spans as the collector stores them, written as `generation` wrote them, and
    the calls' total (input, output) tokens as the model answered them."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.servers import ThreadServer
    from tracetune.collector.rows import convert
    from tracetune.demo.corpus import CATEGORIES
    from tracetune.demo.standins import create_llm_app
    from tracetune.executor import Pipeline, Step
    from tracetune.executor.llm import ChatClient

    if generation not in LLM_GENERATIONS:
        raise ValueError(f"generation must be one of {LLM_GENERATIONS}, got {generation!r}")
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "llm-traces"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    answers = []
    with ThreadServer(create_llm_app(latency_ms=0, rate_limit_rps=0)) as llm, \
            ChatClient(llm.url, model, tracer=tracer) as chat:
        steps = [Step("draft", lambda task: answers.append(chat.classify(task.text, CATEGORIES)))]
        app = Pipeline(pipeline, steps, tracer=tracer)
        for text in texts:
            app.run(text)
        app.close()
    provider.shutdown()
    rows = convert(encode_spans(exporter.get_finished_spans())).rows
    kind, attributes = COLUMNS.index("SpanKind"), COLUMNS.index("SpanAttributes")
    if generation != "executor":
        if generation == "own_app":
            rows = [row for row in rows if row[kind] != "Client"]
        for row in rows:
            attrs = row[attributes]
            for side in ("input", "output"):
                if f"tracetune.llm.{side}_tokens" in attrs:
                    attrs[f"gen_ai.usage.{side}_tokens"] = attrs.pop(f"tracetune.llm.{side}_tokens")
    return rows, (sum(a.input_tokens for a in answers), sum(a.output_tokens for a in answers))

"""One builder for `otel_traces` rows in tests: the columns of the collector's COLUMNS, by keyword."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from tracetune.collector.rows import COLUMNS

__all__ = ["COLUMNS", "demo_traffic", "span_row"]


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

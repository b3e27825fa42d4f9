"""One builder for `otel_traces` rows in tests: the columns of the collector's COLUMNS, by keyword."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tracetune.collector.rows import COLUMNS

__all__ = ["COLUMNS", "span_row"]


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

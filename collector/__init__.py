"""OTLP collector: receive spans, turn them into otel_traces rows, write them in batches."""

from __future__ import annotations

from tracetune.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings) -> None:
    """Run the OTLP/HTTP receiver on settings.collector_port until stopped, then flush."""
    import store
    from collector.receivers import create_app
    from collector.writer import SpanWriter
    from tracetune.serving import serve as serve_app

    store.connect(settings, wait=60)  # schema in place before the first insert
    writer = SpanWriter(
        lambda: store.connect(settings, ensure_schema=False),
        batch_rows=settings.collector_batch_rows,
        flush_seconds=settings.collector_flush_seconds,
        max_queue_rows=settings.collector_max_queue_rows,
        spill_dir=settings.home / "spill",
    ).start()
    try:
        serve_app(create_app(writer, settings.collector_max_body_bytes), settings.bind_host,
                  settings.collector_port)
    finally:
        writer.stop()

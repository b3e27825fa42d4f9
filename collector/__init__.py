"""OTLP collector: receive spans over HTTP and gRPC, log them durably, write them to ClickHouse in batches."""

from __future__ import annotations

import logging

from tracetune.base.settings import Settings

__all__ = ["serve"]

log = logging.getLogger("tracetune.collector")


def serve(settings: Settings) -> None:
    """Run the OTLP/HTTP and OTLP/gRPC receivers until stopped, then write what is queued.

    Acknowledged spans live in `<home>/wal` until ClickHouse has them, so a crash or an outage loses
    nothing: the next start replays them. A full disk at start is no reason not to start: requests are
    refused (503) until the log has room, /health and /metrics answer. SIGTERM ends the process within
    `collector_stop_seconds`: requests in flight get a fifth of it, the writer most of the rest, and what
    it could not write stays in the log.
    """
    import time

    from tracetune import store
    from tracetune.base.serving import allowed_hosts
    from tracetune.base.serving import serve as serve_app
    from tracetune.collector.converter import ConversionProcess
    from tracetune.collector.ingest import Ingest
    from tracetune.collector.receivers import create_app
    from tracetune.collector.wal import WriteAheadLog
    from tracetune.collector.writer import SpanWriter

    conversion = ConversionProcess() if settings.collector_convert_process else None
    try:
        if conversion is not None:
            conversion.start()  # its imports overlap the store's start-up and the log's replay
        store.connect(settings, wait=60)  # schema in place before the first insert
        wal = WriteAheadLog(settings.home / "wal", max_bytes=settings.collector_wal_max_bytes,
                            segment_bytes=settings.collector_wal_segment_bytes)
        writer = SpanWriter(
            lambda: store.connect(settings, ensure_schema=False), wal,
            batch_rows=settings.collector_batch_rows,
            flush_seconds=settings.collector_flush_seconds,
            max_queue_rows=settings.collector_max_queue_rows,
            to_arrow=conversion.convert if conversion is not None else None,
        )
        ingest = Ingest(wal, writer)
        ingest.replay()
        if conversion is not None:
            conversion.start(wait=30.0)
    except BaseException:
        if conversion is not None:
            conversion.close()
        raise
    writer.start()
    grpc_server = None
    budget = settings.collector_stop_seconds
    grace = budget / 5  # requests in flight; the writer gets what is left, less a margin for the exit itself
    try:
        from tracetune.collector.grpc import serve_grpc

        token = settings.secret("collector")
        grpc_server = serve_grpc(ingest, settings.bind_host, settings.collector_grpc_port,
                                 max_message_bytes=settings.collector_max_body_bytes, token=token)
        app = create_app(ingest, settings.collector_max_body_bytes, settings.collector_body_timeout_seconds, token,
                         hosts=allowed_hosts(settings.bind_host, settings.host_names))
        serve_app(app, settings.bind_host, settings.collector_port, timeout_graceful_shutdown=max(1, round(grace)))
    finally:
        stopping = time.monotonic()
        grpc_stopped = grpc_server.stop(grace) if grpc_server is not None else None
        writer_seconds = max(0.5, budget - 2 * grace - 1.0)
        log.warning("stopping: writing what is queued for up to %.1f s", writer_seconds)
        writer.stop(writer_seconds)
        if grpc_stopped is not None:
            grpc_stopped.wait(max(0.0, grace - (time.monotonic() - stopping)))
        wal.close()
        if conversion is not None:
            conversion.close()

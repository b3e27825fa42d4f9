"""What the benchmarks share to run real processes: free ports and a clean stop."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_store(prefix: str):
    """An embedded store of its own in a new temporary home: (settings, its process, a client with an hour's
    timeout for the long inserts); stop it with stop_process."""
    import tempfile
    from pathlib import Path

    return _store_on(Path(tempfile.mkdtemp(prefix=prefix)), timeout=3600)


def open_store(home):
    """The embedded store of an existing home (e.g. a bench arm's, kept with --keep) on a free port, for reading
    what that run left: (settings, its process, a client); stop it with stop_process."""
    from pathlib import Path

    home = Path(home)
    if not (home / "data").is_dir():
        raise FileNotFoundError(f"{home} holds no store data (a bench arm's home has a data/ folder)")
    return _store_on(home, timeout=600)


def _store_on(home, timeout: float):
    """The embedded store of `home` started on free ports: (settings, its process, a client with `timeout`)."""
    import os
    import sys

    from tracetune import store

    settings = isolated_settings(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    proc = subprocess.Popen([sys.executable, "-m", "tracetune", "store"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = store.connect(settings, wait=60)
    except BaseException:
        stop_process(proc)
        raise
    client.timeout = timeout
    return settings, proc, client


def isolated_settings(home, **overrides):
    """Settings on free ports under `home`, ignoring any tracetune.toml or TRACETUNE_* of the caller."""
    from tracetune.base import settings

    ports = {name: free_port() for name in ("store_port", "collector_port", "collector_grpc_port", "tuner_port",
                                            "executor_port", "dashboard_port", "llm_port", "crm_port")}
    return settings.load(config_file=home / "none.toml", environ={}, home=str(home), **ports, **overrides)


# Traces of five spans: a root (the task) and four steps, 4 pipelines x 2 routes x 6 tenants, lognormal
# durations per step, an LLM step with GenAI token counts, cache lookups on embed, timestamps over the
# last 24 h, 2% errors.
GENERATE_SQL = """
INSERT INTO otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
                         SpanAttributes, Duration, StatusCode, StatusMessage)
SELECT
    now64(9) - toIntervalNanosecond(cityHash64(trace, 1) % 86400000000000) + toIntervalNanosecond(position * 1000)
        AS Timestamp,
    lower(hex(cityHash64(trace, {seed:UInt64}))) || lower(hex(cityHash64(trace, 2))) AS TraceId,
    lower(hex(cityHash64(number, {seed:UInt64}, 7))) AS SpanId,
    if(position = 0, '', lower(hex(cityHash64(trace * 5, {seed:UInt64}, 7)))) AS ParentSpanId,
    if(position = 0, pipeline, step) AS SpanName,
    if(position = 0, 'Server', 'Internal') AS SpanKind,
    'bench-executor' AS ServiceName,
    if(position = 0,
       map('tracetune.pipeline', pipeline, 'tracetune.tenant', tenant),
       mapConcat(map('tracetune.pipeline', pipeline, 'tracetune.step', step, 'tracetune.tenant', tenant,
                     'tracetune.route', if(step = 'generate', 'llm', route),
                     'tracetune.feature.lang', ['en', 'de', 'fr'][cityHash64(trace, 6) % 3 + 1]),
                 if(step = 'embed', map('tracetune.cache', if(rand(5) % 10 < 3, 'hit', 'miss')), map()),
                 if(step = 'generate',
                    map('gen_ai.request.model', 'standin-small',
                        'gen_ai.usage.input_tokens', toString(200 + rand(7) % 300),
                        'gen_ai.usage.output_tokens', toString(5 + rand(8) % 40)),
                    map()))) AS SpanAttributes,
    toUInt64(exp(log(step_ms * 1e6) + 0.7 * randNormal(0, 1, number))) AS Duration,
    if(rand(3) % 100 < 2, 'Error', 'Unset') AS StatusCode,
    if(StatusCode = 'Error', 'step failed', '') AS StatusMessage
FROM (
    SELECT number, intDiv(number, 5) AS trace, number % 5 AS position,
        ['triage', 'search', 'summarize', 'extract'][trace % 4 + 1] AS pipeline,
        ['', 'normalize', 'embed', 'classify', 'generate'][position + 1] AS step,
        [420.0, 0.05, 4.0, 1.5, 350.0][position + 1] AS step_ms,
        ['fp32', 'int8'][cityHash64(trace, 3) % 2 + 1] AS route,
        ['acme', 'globex', 'initech', 'umbrella', 'hooli', 'stark'][cityHash64(trace, 4) % 6 + 1] AS tenant
    FROM numbers({start:UInt64}, {count:UInt64})
)
"""


def generate_spans(client, upto: int, already: int = 0, chunk: int = 1_000_000, console=None,
                   label: str = "generating spans") -> int:
    """Insert spans (GENERATE_SQL, seed 42) from `already` up to `upto` inside the engine, so the materialized
    views fill the rollups as ingest would; a progress bar on `console`; returns `upto`."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=upto - already)
        while already < upto:
            count = int(min(chunk, upto - already))
            client.command(GENERATE_SQL, parameters={"start": already, "count": count, "seed": 42})
            already += count
            bar.advance(task, count)
    for rollup in ("tracetune_spans_1m", "tracetune_spans_1h"):  # what background merges do over time
        client.command(f"OPTIMIZE TABLE {rollup} FINAL")
    return upto

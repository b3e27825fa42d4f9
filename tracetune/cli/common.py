"""What every command shares: one-line user errors, the settings, a store client, and checks of the
window and pipeline options a user types."""

from __future__ import annotations

import json

import click

from tracetune.base import settings as settings_mod
from tracetune.base.settings import Settings, SettingsError


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2 (as click's usage errors), no traceback."""

    exit_code = 2


def load_settings(ctx: click.Context, discover: bool = True, **overrides) -> Settings:
    """The command's settings; with `discover`, what they leave unset comes from the running stack (one line on
    stderr says which, unless it is this folder's own)."""
    from dataclasses import fields
    from pathlib import Path

    try:
        s = settings_mod.load(ctx.obj.get("config"), discover=discover, **overrides)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    used = next((s.origin(f.name) for f in fields(s) if s.origin(f.name).startswith(settings_mod.STACK_ORIGIN)), "")
    if used and s.home.resolve() != (Path.cwd() / ".tracetune").resolve():
        click.echo(f"tracetune: using {used}", err=True)
    return s


def json_rows(frame) -> str:
    """A frame as JSON rows: NaN and infinities become null (they are not JSON), times ISO strings."""
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps([clean(row) for row in frame.to_dicts()], indent=2, default=str)


# Pipelines that ever sent spans (the hourly rollup keeps them longest), were declared with the tuner or have an SLO.
KNOWN_PIPELINES_SQL = """
SELECT pipeline FROM tracetune_spans_1h WHERE pipeline != '' GROUP BY pipeline
UNION DISTINCT
SELECT pipeline FROM tracetune_config_versions GROUP BY pipeline
UNION DISTINCT
SELECT pipeline FROM tracetune_slos GROUP BY pipeline
"""


def check_pipeline(client, pipeline: str) -> None:
    """UserError naming the known pipelines when --pipeline names none of them (rather than an empty table)."""
    if not pipeline:
        return
    known = sorted({row[0] for row in client.query(KNOWN_PIPELINES_SQL).result_rows})
    if pipeline not in known:
        raise UserError(f"unknown pipeline {pipeline!r}; known: {', '.join(known) or 'none yet (send traffic first)'}")


def settle(s: Settings, patience: float = 10.0) -> None:
    """Wait (up to `patience` s, saying so on stderr) for spans the collector has acknowledged but not yet
    written, so `python app.py && tracetune stats` sees the app's spans; no collector running: no wait."""
    import time

    import httpx

    def queued() -> int:
        try:
            return int(httpx.get(f"{s.collector_url}/health", timeout=1.0).json().get("queued_rows") or 0)
        except (httpx.HTTPError, ValueError, AttributeError):
            return 0

    waiting, deadline = queued(), time.monotonic() + patience
    if not waiting:
        return
    click.echo(f"waiting for {waiting:,} spans the collector has acknowledged but not written yet (up to "
               f"{patience:g} s)", err=True)
    while waiting and time.monotonic() < deadline:
        time.sleep(0.25)
        waiting = queued()
    if waiting:
        click.echo(f"{waiting:,} spans still queued in the collector; they are not in this answer yet", err=True)


def connect(s: Settings, readonly: bool = False):
    """A store client; `readonly` reads as the store's read-only user (nothing the command does can write)."""
    from tracetune import store as store_mod

    try:
        return store_mod.connect(s, readonly=readonly)
    except SettingsError as exc:  # e.g. a password file others can read
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to reach ClickHouse gets the same one-line answer
        where = s.store_url if s.embedded else s.clickhouse_url
        raise UserError(f"cannot reach ClickHouse at {where}: {str(exc).splitlines()[0]} "
                        "(is `tracetune up` running?)") from None


def check_window(since: str, option: str = "--since") -> None:
    from tracetune import analyzer
    try:
        analyzer.parse_window(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def prices_table(s: Settings, client):
    from tracetune import analyzer
    try:
        table = analyzer.load_prices(s.prices_file) if s.prices_file else analyzer.load_prices()
        analyzer.publish_prices(client, table)
    except analyzer.PricesError as exc:
        raise UserError(str(exc)) from None
    return table


def tuner_call(s: Settings, method: str, path: str, body: dict | None = None, params: dict | None = None,
               timeout: float = 60.0):
    """A call to the tuner's API with its write token: the answer, or UserError when the tuner cannot be reached."""
    import httpx

    try:
        return httpx.request(method, f"{s.tuner_url}{path}", json=body, params=params, timeout=timeout,
                             headers={"Authorization": f"Bearer {s.secret('tuner')}"})
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the tuner at {s.tuner_url} ({type(exc).__name__}): is `tracetune up` "
                        "running?") from None


def answer_detail(response) -> str:
    """The one line an API error answer carries (its `detail`), else the start of its text."""
    try:
        return str(response.json().get("detail") or response.text)
    except (ValueError, AttributeError):
        return response.text[:300]

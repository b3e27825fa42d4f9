"""`tracetune alerts list|silence|deliveries|test`."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from urllib.parse import urlsplit

import click

from tracetune.cli.common import UserError, connect, load_settings


@click.group()
def alerts() -> None:
    """Firing alerts, silences, deliveries and a test alert."""


def _since(moment: str | None) -> str:
    return (moment or "")[:19].replace("T", " ")


@alerts.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also pending alerts and those resolved in the last hour.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def alerts_list(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """Firing alerts (and, with --all, pending and recently resolved ones), silenced ones marked."""
    from rich.table import Table

    from tracetune.analyzer import alerts as alerting
    from tracetune.terminal import console

    client = connect(load_settings(ctx), readonly=True)
    silences = alerting.list_silences(client)
    now = datetime.now(UTC)
    rows = [{**alert.to_dict(), "silenced_by": alert.silenced_by(silences, now)}
            for alert in sorted(alerting.current_alerts(client).values(), key=lambda a: (a.state, a.active_at))
            if alert.state == "firing" or show_all]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"alerts ({'all' if show_all else 'firing'})", title_justify="left")
    for column in ("state", "alert", "pipeline", "severity", "since", "summary"):
        table.add_column(column, overflow="fold")
    for row in rows:
        state = row["state"] + (" (silenced)" if row["silenced_by"] else "")
        table.add_row(state, row["labels"].get("alertname", ""), row["labels"].get("pipeline", ""),
                      row["labels"].get("severity", ""), _since(row["resolved_at"] or row["fired_at"]
                                                                or row["active_at"]),
                      row["annotations"].get("summary", ""))
    console().print(table if rows else "no alerts" + ("" if show_all else " firing"))


@alerts.command("silence")
@click.argument("matchers", nargs=-1, metavar="[NAME=VALUE | NAME!=VALUE | NAME=~REGEX]...")
@click.option("--for", "duration", default="2h", show_default=True, help="How long: 30m, 2h, 1d.")
@click.option("--comment", default="", help="Why (kept with the silence).")
@click.option("--list", "show", is_flag=True, help="List silences instead (active, pending, ended in the last day).")
@click.option("--expire", metavar="ID", default=None, help="End the silence with this id now.")
@click.pass_context
def alerts_silence(ctx: click.Context, matchers: tuple[str, ...], duration: str, comment: str, show: bool,
                   expire: str | None) -> None:
    """Keep matching alerts out of notifications for a while, e.g. `pipeline=ticket_triage severity=ticket`."""
    import getpass
    from datetime import timedelta

    from tracetune import analyzer
    from tracetune.analyzer import alerts as alerting

    s = load_settings(ctx)
    if show:
        for silence in alerting.list_silences(connect(s, readonly=True)):
            info = silence.to_dict()
            click.echo(f"{silence.silence_id}  {info['status']['state']:8} until {_since(info['endsAt'])}  "
                       f"{' '.join(str(m) for m in silence.matchers)}  {silence.comment}")
        return
    if expire:
        try:
            ended = alerting.expire_silence(connect(s), expire)
        except LookupError as exc:
            raise UserError(f"{exc}; `tracetune alerts silence --list` shows them") from None
        click.echo(f"silence {ended.silence_id} ended")
        return
    if not matchers:
        raise UserError("give at least one matcher, e.g. `tracetune alerts silence pipeline=ticket_triage --for 2h`")
    try:
        parsed = [alerting.Matcher.parse(m) for m in matchers]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        seconds = analyzer.parse_window(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None
    silence = alerting.add_silence(connect(s), parsed, datetime.now(UTC) + timedelta(seconds=seconds),
                                   created_by=getpass.getuser(), comment=comment)
    click.echo(f"silence {silence.silence_id}: {' '.join(str(m) for m in parsed)} until "
               f"{_since(silence.to_dict()['endsAt'])} UTC")


@alerts.command("deliveries")
@click.option("--status", type=click.Choice(["pending", "retrying", "delivered", "failed"]), default=None,
              help="Only deliveries in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column (ids, group key, times, the body sent).")
@click.pass_context
def alerts_deliveries(ctx: click.Context, status: str | None, limit: int, as_json: bool, wide: bool) -> None:
    """The delivery log: each notification per receiver, its attempts, last answer and state."""
    import polars as pl

    from tracetune.analyzer import delivery
    from tracetune.terminal import console, frame_table

    rows = delivery.deliveries(connect(load_settings(ctx), readonly=True), limit=limit, status=status)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    elif rows:
        console(wide).print(frame_table(pl.DataFrame(rows, infer_schema_length=None), "alert deliveries, newest first",
                                        ("created_at", "receiver", "status", "attempts", "http_status", "error"), wide))
    else:
        console().print("no deliveries yet")


@alerts.command("test")
@click.pass_context
def alerts_test(ctx: click.Context) -> None:
    """Send a test alert to every configured receiver now and say what each answered."""
    from tracetune.analyzer import alerts as alerting
    from tracetune.analyzer import delivery

    s = load_settings(ctx)
    receivers = delivery.receivers_from_settings(s)
    config = ctx.obj.get("config") or os.environ.get("TRACETUNE_CONFIG") or "tracetune.toml"
    if not receivers:
        raise UserError(f"no alert receiver is configured in {config} or TRACETUNE_ALERT_* (what the analyzer "
                        "reads); set alert_webhook_url, alert_slack_url or alert_pagerduty_routing_key in "
                        f"{config} so the analyzer and this command both use it")
    setting = {"webhook": "alert_webhook_url", "slack": "alert_slack_url", "pagerduty": "alert_pagerduty_routing_key"}
    for receiver in receivers:
        where = s._origin.get(setting[receiver.kind], "default")
        url = urlsplit(getattr(receiver, "url", ""))  # the host only for Slack: its path is the secret
        target = f"{url.scheme}://{url.netloc}" + (url.path if receiver.kind == "webhook" else "/…")
        click.echo(f"receiver {receiver.name}: {target} (from {where})")
    client = connect(s)
    ids = delivery.send_now(client, alerting.test_notification(s.dashboard_url), receivers)
    rows = [row for row in delivery.deliveries(client, limit=100) if row.get("delivery_id") in ids]
    for row in rows:
        click.echo(f"{row.get('receiver')}: {row.get('status')} (HTTP {row.get('http_status') or '-'}) "
                   f"{row.get('error') or ''}".rstrip())
    if any(row.get("status") != "delivered" for row in rows):
        raise UserError("not every receiver took the test alert; retries go on in the analyzer "
                        "(`tracetune alerts deliveries`)")

"""Alerts: what on-call was told: alerts firing and pending (silenced ones marked), those resolved in the last
hour, the silences, and every notification's delivery to each receiver."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import streamlit as st

from tracetune.analyzer import alerts as alerting
from tracetune.analyzer import delivery
from tracetune.dashboard import frames, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable

DELIVERIES_SHOWN = 100


def _when(moment) -> str:
    return frames.format_time(moment)


def alert_rows(alerts: list, silences: list, now: datetime) -> pl.DataFrame:
    return pl.DataFrame([{
        "state": a.state + (" (silenced)" if a.silenced_by(silences, now) else ""),
        "alert": a.labels.get("alertname", ""), "pipeline": a.labels.get("pipeline", ""),
        "severity": a.labels.get("severity", ""), "since (UTC)": _when(a.resolved_at or a.fired_at or a.active_at),
        "summary": a.annotations.get("summary", ""), "description": a.annotations.get("description", "")}
        for a in alerts], schema={c: pl.Utf8 for c in ("state", "alert", "pipeline", "severity", "since (UTC)",
                                                        "summary", "description")})


def render(ctx: Context) -> None:
    f = ctx.filters
    prefetch(ctx.settings, [(alerting.current_alerts, {}), (alerting.list_silences, {}),
                            (delivery.deliveries, {"limit": DELIVERIES_SHOWN})])
    try:
        found = cached(ctx.settings, alerting.current_alerts)
        silences = cached(ctx.settings, alerting.list_silences)
        log = cached(ctx.settings, delivery.deliveries, limit=DELIVERIES_SHOWN)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    mine = [a for a in found.values() if not f.pipeline_name or a.labels.get("pipeline") == f.pipeline_name]
    active = sorted((a for a in mine if a.state in ("firing", "pending")),
                    key=lambda a: ({"firing": 0, "pending": 1}[a.state], a.active_at))
    resolved = sorted((a for a in mine if a.state == "resolved"), key=lambda a: a.resolved_at or a.active_at,
                      reverse=True)
    firing = [a for a in active if a.state == "firing"]
    failing = [d for d in log if d["status"] in ("retrying", "failed")]
    count, pages, broken = st.columns(3)
    count.metric("Alerts firing", f"{len(firing)}")
    pages.metric("Pages firing", f"{sum(a.labels.get('severity') == 'page' for a in firing)}")
    broken.metric("Deliveries retrying or failed", f"{len(failing)}",
                  help="`tracetune alerts deliveries` shows each attempt and the receiver's answer.")
    now = datetime.now(UTC)
    st.subheader("Firing and pending")
    if active:
        ui.text_table(alert_rows(active, silences, now))
    else:
        st.info(f"No alert is firing or pending{f.scope()}.")
    st.subheader("Resolved in the last hour")
    if resolved:
        ui.text_table(alert_rows(resolved, silences, now))
    else:
        st.caption("None.")
    st.subheader("Silences")
    if silences:
        ui.table(pl.DataFrame([{
            "matchers": " ".join(str(m) for m in s.matchers), "state": s.to_dict()["status"]["state"],
            "ends": _when(s.ends_at), "by": s.created_by or frames.MISSING, "comment": s.comment or frames.MISSING,
            "id": s.silence_id}
            for s in silences]))
    else:
        st.caption("No silence. `tracetune alerts silence pipeline=NAME --for 2h` adds one.")
    st.subheader("Delivery log")
    if log:
        ui.text_table(pl.DataFrame([{
            "when (UTC)": _when(d["created_at"]), "receiver": d["receiver"], "group": d["group_key"],
            "notification": d["notification_status"], "state": d["status"], "attempts": f"{d['attempts']}",
            "HTTP": f"{d['http_status']}" if d["http_status"] else frames.MISSING, "error": d["error"] or ""}
            for d in log], schema={c: pl.Utf8 for c in ("when (UTC)", "receiver", "group", "notification", "state",
                                                         "attempts", "HTTP", "error")}))
        st.caption(f"HTTP {frames.MISSING}: no answer yet (not sent, or the receiver could not be reached).")
        st.caption(f"The newest {DELIVERIES_SHOWN} deliveries of the last 7 days.")
    else:
        st.caption("Nothing sent yet. Receivers: `alert_webhook_url`, `alert_slack_url`, "
                   "`alert_pagerduty_routing_key`; `tracetune alerts test` checks them.")


if __name__ == "__main__":
    run(render)

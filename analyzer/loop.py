"""The analyzer loop (`tracetune analyzer`, run by `tracetune up`): publish prices, then on an
interval refresh drift (last hour against the 24 hours before) and SLO burn-rate state."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import polars as pl

from tracetune.analyzer.drift import compute_drift, default_windows, store_drift
from tracetune.analyzer.prices import load, publish
from tracetune.analyzer.slo import SLOError, list_slos, slo_status

log = logging.getLogger("tracetune.analyzer")

SLO_STATUS_TABLE_COLUMNS = ["computed_at", "pipeline", "slo", "target_ms", "objective", "error_budget", "period_days",
                            "severity", "long_window", "short_window", "factor", "long_burn_rate", "short_burn_rate",
                            "firing", "period_requests", "period_bad", "budget_remaining"]


def refresh(client, now: datetime | None = None, current: str = "1h", reference: str = "24h") -> dict[str, int]:
    """One pass: drift results and SLO snapshots written; returns what was written."""
    now = now or datetime.now(UTC)
    ref_window, cur_window = default_windows(now, current, reference)
    drift = compute_drift(client, ref_window, cur_window)
    written = {"drift_rows": store_drift(client, drift) if not drift.is_empty() else 0, "slo_rows": 0,
               "firing": 0}
    for slo in list_slos(client):
        try:
            status = slo_status(client, slo.pipeline, now=now, slo=slo)
        except SLOError as exc:
            log.warning("%s", exc)
            continue
        if status.is_empty():
            continue
        rows = status.with_columns(computed_at=pl.lit(now), firing=pl.col("firing").cast(pl.UInt8))
        client.insert("tracetune_slo_status", rows.select(SLO_STATUS_TABLE_COLUMNS).rows(),
                      column_names=SLO_STATUS_TABLE_COLUMNS)
        written["slo_rows"] += rows.height
        for row in rows.filter(pl.col("firing") == 1).iter_rows(named=True):
            written["firing"] += 1
            log.warning("SLO %s/%s burning %.1fx over %s and %.1fx over %s (%s)", row["pipeline"], row["slo"],
                        row["long_burn_rate"], row["long_window"], row["short_burn_rate"], row["short_window"],
                        row["severity"])
    return written


def run(client, prices_file: str, interval: float, stop: threading.Event) -> None:
    publish(client, load(prices_file) if prices_file else load())
    while True:
        try:
            written = refresh(client)
            log.info("analyzer refresh: %s", written)
        except Exception:
            log.exception("analyzer refresh failed; will retry")
        if stop.wait(interval):
            return

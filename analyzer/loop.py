"""The analyzer loop (`tracetune analyzer`, run by `tracetune up`): publish prices, then on an
interval refresh drift and SLO burn-rate state and evaluate the alert rules on them; between
refreshes, hand the alert notifications that are due to the outbox (`analyzer.alerts`). With several
replicas, only the one holding the `analyzer` lease does any of it (`tracetune.store.lease`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import polars as pl

from tracetune.analyzer import alerts, dead_letters
from tracetune.analyzer.cost import cost_per_1k
from tracetune.analyzer.delivery import DeliveryWorker
from tracetune.analyzer.drift import DEFAULT_CURRENT, current_drift, store_drift
from tracetune.analyzer.prices import PricesError, load, publish
from tracetune.analyzer.slo import SLOError, list_slos, slo_status
from tracetune.store.lease import Lease, hold

log = logging.getLogger("tracetune.analyzer")

SLO_STATUS_TABLE_COLUMNS = ["computed_at", "pipeline", "slo", "target_ms", "objective", "error_budget", "period_days",
                            "severity", "long_window", "short_window", "factor", "long_burn_rate", "short_burn_rate",
                            "firing", "period_requests", "period_bad", "budget_remaining"]


def refresh(client, now: datetime | None = None, current: str = DEFAULT_CURRENT, reference: str | None = None,
            engine: alerts.Engine | None = None, active: Callable[[], bool] = lambda: True) -> dict[str, int]:
    """One pass: drift results and SLO snapshots written, alert rules evaluated (with `engine`);
    returns what was written. Stops before each write once `active()` is false (the lease lapsed)."""
    now = now or datetime.now(UTC)
    drift = current_drift(client, now, current, reference=reference)  # baseline, else the preceding window
    if not active():
        return {}
    written = {"drift_rows": store_drift(client, drift) if not drift.is_empty() else 0, "slo_rows": 0,
               "firing": 0}
    slos = list_slos(client)
    statuses = []
    for slo in slos:
        try:
            status = slo_status(client, slo.pipeline, now=now, slo=slo)
        except SLOError as exc:
            log.warning("%s", exc)
            continue
        if status.is_empty():
            continue
        statuses.append(status)
        rows = status.with_columns(computed_at=pl.lit(now), firing=pl.col("firing").cast(pl.UInt8))
        if not active():
            return written
        client.insert("tracetune_slo_status", rows.select(SLO_STATUS_TABLE_COLUMNS).rows(),
                      column_names=SLO_STATUS_TABLE_COLUMNS)
        written["slo_rows"] += rows.height
        for row in rows.filter(pl.col("firing") == 1).iter_rows(named=True):
            written["firing"] += 1
            log.warning("SLO %s/%s burning %.1fx over %s and %.1fx over %s (%s)", row["pipeline"], row["slo"],
                        row["long_burn_rate"], row["long_window"], row["short_burn_rate"], row["short_window"],
                        row["severity"])
    if engine is not None:
        conditions = [c for status in statuses for c in alerts.slo_conditions(status, engine.external_url)]
        conditions += alerts.drift_conditions(drift, engine.external_url)
        conditions += alerts.cost_conditions(_costs(client), {s.pipeline: s.cost_per_1k for s in slos
                                                              if s.cost_per_1k is not None},
                                             external_url=engine.external_url)
        conditions += alerts.tuner_conditions(client, now, external_url=engine.external_url)
        conditions += alerts.proposal_conditions(client, now, external_url=engine.external_url)
        conditions += alerts.dead_letter_conditions(dead_letters.growth(client, now), external_url=engine.external_url)
        if not active():
            return written
        changed = engine.evaluate(conditions, now)
        written["alerts_changed"] = len(changed)
    return written


def _costs(client) -> dict[str, float]:
    """Cost per 1k requests of every pipeline over the last hour ({} before prices are published)."""
    try:
        frame = cost_per_1k(client, since=3600, by=("pipeline",), source="rollup")
    except PricesError:
        return {}
    return {row["pipeline"]: float(row["cost_per_1k"]) for row in frame.iter_rows(named=True)
            if row["cost_per_1k"] is not None}


def run(client, prices_file: str, interval: float, stop: threading.Event, engine: alerts.Engine | None = None,
        notify_seconds: float = 5.0, lease: Lease | None = None,
        delivery: Callable[[], DeliveryWorker] | None = None) -> None:
    """Refresh every `interval` seconds until `stop` is set; with `engine`, evaluate alert rules on each
    refresh and hand the notifications that are due to the outbox every `notify_seconds`; with
    `delivery` (a DeliveryWorker factory), send them.

    With `lease`, only while holding it (`tracetune.store.lease`): a standby waits, and on taking over
    goes on from the alert state and outbox the last holder stored; the delivery worker of a term is
    stopped (its round in flight finished) before the lease is released. Every replica publishes the
    prices first (the same table twice is one version), so a bad prices file stops each at start."""
    publish(client, load(prices_file) if prices_file else load())
    if lease is None:
        _run(client, interval, stop, engine, notify_seconds, lambda: True, delivery)
        return

    def work(lost: threading.Event) -> None:
        fresh = _reloaded(engine) if engine is not None else None  # what the last holder left in the store
        _run(client, interval, lost, fresh, notify_seconds, lease.holding, delivery)

    hold(lease, stop, work)


def _reloaded(engine: alerts.Engine) -> alerts.Engine:
    """The same engine with the alert state and groups read again from the store."""
    return alerts.Engine(engine.client, engine.receivers, engine.timing, engine.external_url, engine.group_by,
                         engine.runbook_base_url)


def _run(client, interval: float, stop: threading.Event, engine: alerts.Engine | None, notify_seconds: float,
         active: Callable[[], bool], delivery: Callable[[], DeliveryWorker] | None) -> None:
    notifier = None
    if engine is not None:
        notifier = threading.Thread(target=_notify_loop, args=(engine, notify_seconds, stop, active),
                                    name="alert-notifier", daemon=True)
        notifier.start()
    worker = delivery().start() if delivery is not None else None
    try:
        while active():
            try:
                written = refresh(client, engine=engine, active=active)
                log.info("analyzer refresh: %s", written)
            except Exception:
                log.exception("analyzer refresh failed; will retry")
            if stop.wait(interval):
                break
    finally:
        if notifier is not None:
            notifier.join(10)
        if worker is not None:
            worker.stop()


def _notify_loop(engine: alerts.Engine, every: float, stop: threading.Event, active: Callable[[], bool]) -> None:
    while not stop.wait(every) and active():
        try:
            engine.notify()
        except Exception:  # the store may be restarting; the next round retries
            log.exception("alert notifications failed; will retry")

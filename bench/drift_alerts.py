"""FeatureDrift alert noise and reach: the analyzer's own refresh and alert engine, with default settings,
replayed every 30 s over the demo's traffic (the load generator's tickets as ticket_triage's spans, with
CPU-contention jitter on every latency) in an embedded store.

Scenarios: a steady run (how many FeatureDrift alerts fire: the target is 0), and a category-mix shift
(as `tracetune load --drift category_mix@...`) inside the first hour and after it: when the alert fires
after the shift begins, whether it fires in every evaluation until the shift ends, and when it resolves.

    .venv/bin/python bench/drift_alerts.py                  # steady 60 min; shifts at 20-35 of 45 and 65-80 of 90
    .venv/bin/python bench/drift_alerts.py --steady 10 --quick

This is a simulation of the detector on generated spans (the alert rules, drift statistics and store are
the real ones; the spans do not come from a running executor): bench/drift_live.py runs the real stack.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.spans: the demo-traffic span builder

from harness import start_store, stop_process  # bench/harness.py: this script's folder
from rich.console import Console
from rich.table import Table

from tests.spans import COLUMNS, demo_traffic
from tracetune import store
from tracetune.analyzer import alerts
from tracetune.analyzer.loop import refresh

INTERVAL = 30  # the analyzer's default refresh, seconds


def scenario(settings, minutes: float, shift: tuple[float, float] | None, rate: float, jitter: float,
             console: Console) -> dict:
    """One run in a database of its own: the alert state after every refresh."""
    client = store.connect(settings.replace(database=f"drift_{uuid.uuid4().hex[:8]}"))
    client.timeout = 3600
    seconds = minutes * 60
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds + 120)
    drifts = [("category_mix", shift[0] * 60, shift[1] * 60)] if shift else []
    rows = demo_traffic(start, seconds, drifts, seed=11, rate=rate, jitter=jitter)
    for i in range(0, len(rows), 50_000):
        client.insert("otel_traces", rows[i:i + 50_000], column_names=COLUMNS)
    engine = alerts.Engine(client, [])
    firing_at: dict[float, set[str]] = {}
    began = time.perf_counter()
    for at in range(INTERVAL, int(seconds) + 1, INTERVAL):
        refresh(client, now=start + timedelta(seconds=at), engine=engine)
        firing_at[at] = {f"{a.labels['step']}/{a.labels['feature']}" for a in engine.alerts.values()
                         if a.state == "firing" and a.labels.get("alertname") == "FeatureDrift"}
    fired = {f for found in firing_at.values() for f in found}
    console.log(f"{minutes:g} min, shift {shift}: {len(rows):,} spans, {len(firing_at)} refreshes in "
                f"{time.perf_counter() - began:.0f} s; fired: {sorted(fired) or 'none'}")
    return {"firing_at": firing_at, "fired": fired, "spans": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=float, default=60.0, help="minutes of the steady run")
    parser.add_argument("--rate", type=float, default=10.0, help="tasks per second (the issue's ~600 a minute)")
    parser.add_argument("--jitter", type=float, default=0.2, help="sd of the per-10 s latency log-factor")
    parser.add_argument("--quick", action="store_true", help="only the shift inside the first hour")
    args = parser.parse_args()
    console = Console(width=150)
    settings, proc, _ = start_store("tracetune-bench-drift-")
    try:
        table = Table(title=f"FeatureDrift alerts, analyzer defaults, refresh every {INTERVAL} s, "
                            f"{args.rate:g} tasks/s, latency jitter sd {args.jitter:g}")
        for column in ("run", "minutes", "spans", "alerts fired", "first fired after shift start",
                       "firing in refreshes inside the shift", "resolved after shift end"):
            table.add_column(column)
        steady = scenario(settings, args.steady, None, args.rate, args.jitter, console)
        table.add_row("steady", f"{args.steady:g}", f"{steady['spans']:,}", str(len(steady["fired"])) +
                      (f" ({', '.join(sorted(steady['fired']))})" if steady["fired"] else ""), "-", "-", "-")
        shifts = [(45.0, (20.0, 35.0))] + ([] if args.quick else [(90.0, (65.0, 80.0))])
        for minutes, (begin, end) in shifts:
            run = scenario(settings, minutes, (begin, end), args.rate, args.jitter, console)
            category = "classify/category"
            times = sorted(run["firing_at"])
            after = [t for t in times if t > begin * 60 and category in run["firing_at"][t]]
            first = f"{after[0] - begin * 60:.0f} s" if after else "never"
            inside = [t for t in times if t - 60 >= begin * 60 and t <= end * 60]  # current window all shifted
            held = sum(category in run["firing_at"][t] for t in inside)
            gone = [t for t in times if t > end * 60 and category not in run["firing_at"][t]]
            others = sorted(run["fired"] - {category, "prioritize/priority"})
            table.add_row(f"category_mix {begin:g}-{end:g} min", f"{minutes:g}", f"{run['spans']:,}",
                          f"{len(run['fired'])} ({', '.join(sorted(run['fired']))})" + (
                              f"; unexpected: {', '.join(others)}" if others else ""),
                          first, f"{held}/{len(inside)}", f"{gone[0] - end * 60:.0f} s" if gone else "never")
        console.print(table)
    finally:
        stop_process(proc)


if __name__ == "__main__":
    main()

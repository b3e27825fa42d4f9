"""On-call hears about it, with real processes: the analyzer (as `tracetune up` runs it) finds a burning SLO
in the store, pages a real webhook receiver with a signed Alertmanager body, and sends the resolution
once the burn stops."""

from __future__ import annotations

import threading
import time

import pytest

from tests.analyzer.test_delivery import check_alertmanager_v4, receiver_app, verify
from tests.conftest import make_settings
from tests.servers import ThreadServer, start_process, stop_process, wait_until
from tests.spans import COLUMNS, span_row
from tracetune import store
from tracetune.analyzer import SLO, save_slo


def _tasks(client, seconds: float, per_second: int, error_every: int, first: int) -> int:
    """Root spans of pipeline shop over the last `seconds`, every `error_every`-th failing (0: none)."""
    now, n = time.time_ns(), int(seconds * per_second)
    rows = [span_row(now - int((n - i) * 1e9 / per_second), trace_id=f"{first + i:032x}", span_id=f"{first + i:016x}",
                     name="shop", kind="Server", attrs={"tracetune.pipeline": "shop"}, duration=20_000_000,
                     status="Error" if error_every and i % error_every == 0 else "Unset")
            for i in range(n)]
    client.insert("otel_traces", rows, column_names=COLUMNS)
    return first + n


@pytest.mark.timeout(300)
def test_the_analyzer_pages_a_burning_slo_and_resolves_it(tmp_path):
    app = receiver_app()
    with ThreadServer(app) as receiver:
        settings = make_settings(tmp_path / "home", alert_webhook_url=f"{receiver.url}/alertmanager",
                                 analyzer_interval_seconds=2, alert_group_wait_seconds=1,
                                 alert_group_interval_seconds=1)
        (tmp_path / "home").mkdir(exist_ok=True)
        procs = {"store": start_process(["store"], settings, tmp_path / "store.log")}
        try:
            client = store.connect(settings, wait=60)
            # A 6-hour SLO: its burn-rate windows scale down (1h & 5m -> 60 s & 5 s), so a minute of data is enough.
            save_slo(client, SLO(pipeline="shop", error_rate=0.01, period_days=0.25))
            # Tasks keep coming, a fifth of them failing (burn rate 20), until on-call is paged; then clean.
            state = {"next": _tasks(client, 70, 10, error_every=5, first=1), "error_every": 5}
            stop = threading.Event()

            def feed() -> None:
                while not stop.wait(1.0):
                    state["next"] = _tasks(client, 1, 10, error_every=state["error_every"], first=state["next"])

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            procs["analyzer"] = start_process(["analyzer"], settings, tmp_path / "analyzer.log")
            seen = app.state.seen

            def paged() -> bool:
                return any(s.json()["status"] == "firing" and any(a["labels"].get("severity") == "page"
                                                                  for a in s.json()["alerts"]) for s in seen)

            try:
                wait_until(paged, 120, 0.5, "a page notification")
                first = next(s for s in seen if s.json()["status"] == "firing")
                verify(settings.alert_secret(), first.headers, first.body)
                body = first.json()
                check_alertmanager_v4(body)
                assert body["groupLabels"] == {"alertname": "SLOBurnRate", "pipeline": "shop"}
                page = next(a for a in body["alerts"] if a["labels"]["severity"] == "page")
                assert page["labels"]["slo"] == "availability" and "burns" in page["annotations"]["description"]

                # The burn stops: clean tasks only; the page rules' short windows clear, and it resolves.
                state["error_every"] = 0
                wait_until(lambda: any(a["status"] == "resolved" and a["labels"].get("severity") == "page"
                                       for s in seen for a in s.json()["alerts"]), 120, 0.5, "the page resolved")
            finally:
                stop.set()
                feeder.join(5)
            ids = [s.headers["webhook-id"] for s in seen]
            assert len(ids) == len(set(ids))  # one delivery per notification, no duplicates
        finally:
            for proc in reversed(list(procs.values())):
                stop_process(proc)

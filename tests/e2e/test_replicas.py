"""Several analyzers or tuners on one store, as real processes. Analyzers: one holds the `analyzer` lease
and pages on-call, the other stands by, and each notification reaches the receiver once; when the
active one stalls (SIGSTOP) or is killed (SIGKILL), neither releasing the lease, the standby takes over
once it expires and sends the next notification from the stored state, and a stalled holder that wakes
up sends nothing. Tuners: both serve the API, one runs the loop, and a clean stop hands the lease over."""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.analyzer.test_delivery import check_alertmanager_v4, receiver_app, verify
from tests.servers import ThreadServer, _ready, free_port, start_process, stop_process, wait_until
from tracetune import store
from tracetune.analyzer.delivery import deliveries
from tracetune.tuner import decisions

LEASE_SECONDS = 2.0


def _holder(log: Path, term: int, lease: str = "analyzer") -> bool:
    return f"holding lease {lease} (term {term})" in log.read_text(errors="replace")


def _standing_by(log: Path, lease: str = "analyzer") -> bool:
    return re.search(rf"standing by: lease {lease} held by \S+ until \S+", log.read_text(errors="replace")) is not None


def _notifications(seen) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """What each request told the receiver: its status and every alert's (fingerprint, status)."""
    return [(s.json()["status"], tuple(sorted((a["fingerprint"], a["status"]) for a in s.json()["alerts"])))
            for s in seen]


def _rollback(client, pipeline: str, resolves_in: float) -> None:
    """A canary rollback the tuner made just under an hour ago: the `TunerCanaryRolledBack` rule fires at
    once, and resolves when the decision leaves the rule's one-hour window, `resolves_in` seconds from now."""
    decisions.record(client, decisions.Decision(
        pipeline, "canary_rollback", 2, 1, {}, {}, "p95 worse on the canary",
        decided_at=datetime.now(UTC) - timedelta(hours=1) + timedelta(seconds=resolves_in)))


def _delivered(client, n: int) -> bool:
    """`n` deliveries recorded as delivered and none in flight (a kill now would not send one again)."""
    return len(deliveries(client, status="delivered")) == n and not deliveries(client, status="pending")


@pytest.mark.timeout(120)
def test_two_analyzers_send_each_alert_once_through_a_pause_and_a_kill_of_the_active_one(db_settings, tmp_path):
    app = receiver_app()
    with ThreadServer(app) as receiver:
        settings = db_settings.replace(home=tmp_path / "home", alert_webhook_url=f"{receiver.url}/alertmanager",
                                       analyzer_interval_seconds=1, alert_group_wait_seconds=1,
                                       alert_group_interval_seconds=1, lease_seconds=LEASE_SECONDS)
        (tmp_path / "home").mkdir(exist_ok=True)
        procs = {}
        try:
            client = store.connect(settings, ensure_schema=False)
            logs = {name: tmp_path / f"analyzer-{name}.log" for name in ("a", "b")}
            for name, log in logs.items():
                procs[name] = start_process(["analyzer"], settings, log)
            wait_until(lambda: sum(_holder(log, 1) for log in logs.values()) == 1
                       and sum(_standing_by(log) for log in logs.values()) == 1, 60, 0.2, "one holder, one standby")
            first = next(name for name, log in logs.items() if _holder(log, 1))
            second = "b" if first == "a" else "a"
            assert f":{procs[first].pid}:" in logs[first].read_text()  # the holder names itself host:pid:...
            seen = app.state.seen

            # 1. Both running: the alert fires, and on-call hears it once.
            _rollback(client, "shop", resolves_in=10)
            wait_until(lambda: _delivered(client, 1), 15, 0.1, "the firing notification delivered")
            assert len(seen) == 1

            # 2. The holder stalls (SIGSTOP: no renewals, no release): the other takes over. When the stalled
            # one wakes up it has lost the lease and stands by; the resolution comes once, from the new holder.
            procs[first].send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: _holder(logs[second], 2), 6 * LEASE_SECONDS, 0.05, "the takeover from a stall")
            finally:
                procs[first].send_signal(signal.SIGCONT)
            wait_until(lambda: "lost lease analyzer (term 1)" in logs[first].read_text(), 5, 0.05,
                       "the stalled holder noticing")
            wait_until(lambda: _delivered(client, 2), 20, 0.1, "the resolution delivered")

            # 3. The new holder is killed (SIGKILL): the first takes the lease back once it expires, and
            # pages the next alert.
            procs[second].kill()
            procs[second].wait(5)
            killed = time.monotonic()
            wait_until(lambda: _holder(logs[first], 3), 6 * LEASE_SECONDS, 0.05, "the takeover from a kill")
            takeover = time.monotonic() - killed
            _rollback(client, "cart", resolves_in=600)
            wait_until(lambda: _delivered(client, 3), 15, 0.1, "the second alert's notification delivered")
            time.sleep(2)  # anything sent twice would have arrived by now

            shop, cart = (next(s.json() for s in seen if s.json()["groupLabels"].get("pipeline") == p)
                          for p in ("shop", "cart"))
            assert shop["groupLabels"] == {"alertname": "TunerCanaryRolledBack", "pipeline": "shop"}
            for request in seen:
                verify(settings.alert_secret(), request.headers, request.body)
                check_alertmanager_v4(request.json())
            fingerprints = [body["alerts"][0]["fingerprint"] for body in (shop, cart)]
            assert _notifications(seen) == [("firing", ((fingerprints[0], "firing"),)),
                                             ("resolved", ((fingerprints[0], "resolved"),)),
                                             ("firing", ((fingerprints[1], "firing"),))]
            ids = [request.headers["webhook-id"] for request in seen]
            assert len(ids) == len(set(ids))
            # Not before the killed holder's last renewal expired, and soon after.
            assert LEASE_SECONDS / 2 < takeover < 3 * LEASE_SECONDS, takeover
            print(f"takeover {takeover:.2f}s after SIGKILL")
        finally:
            for proc in reversed(list(procs.values())):
                stop_process(proc)


@pytest.mark.timeout(90)
def test_two_tuners_both_serve_the_api_one_runs_the_loop_and_a_clean_stop_hands_it_over_at_once(db_settings,
                                                                                                   tmp_path):
    settings = db_settings.replace(home=tmp_path / "home", lease_seconds=LEASE_SECONDS, tuner_interval_seconds=1)
    (tmp_path / "home").mkdir(exist_ok=True)
    replicas = {"a": settings.replace(tuner_port=free_port()), "b": settings.replace(tuner_port=free_port())}
    logs = {name: tmp_path / f"tuner-{name}.log" for name in replicas}
    procs = {}
    try:
        for name, replica in replicas.items():
            procs[name] = start_process(["tuner"], replica, logs[name])
        for name, replica in replicas.items():  # every replica serves
            wait_until(lambda r=replica, n=name: _ready(f"{r.tuner_url}/health", procs[n], logs[n]), 60, 0.2,
                       f"tuner {name}")
        wait_until(lambda: sum(_holder(log, 1, "tuner") for log in logs.values()) == 1
                   and sum(_standing_by(log, "tuner") for log in logs.values()) == 1, 30, 0.2,
                   "one holder, one standby")
        active = next(name for name, log in logs.items() if _holder(log, 1, "tuner"))
        standby = "b" if active == "a" else "a"
        stop_process(procs[active])  # SIGTERM: the loop stops and releases the lease
        assert procs[active].returncode is not None
        # The standby polls every lease_seconds / 3 and takes the released lease at its next poll.
        wait_until(lambda: _holder(logs[standby], 2, "tuner"), 15, 0.1, "the standby's takeover")
        client = store.connect(settings, ensure_schema=False)
        released, renewed_until, taken_at = client.query(
            "SELECT countIf(term = 1 AND seconds = 0), maxIf(expires_at, term = 1 AND seconds > 0), "
            "minIf(claimed_at, term = 2) FROM tracetune_leases WHERE name = 'tuner'").result_rows[0]
        assert released == 1
        assert taken_at < renewed_until  # taken over after the release, before term 1 would have expired
        assert _ready(f"{replicas[standby].tuner_url}/health", procs[standby], logs[standby])
    finally:
        for proc in reversed(list(procs.values())):
            stop_process(proc)

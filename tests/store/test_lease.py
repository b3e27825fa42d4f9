"""The lease in the real embedded store: one holder at a time, standbys take over when it lapses or is
released, simultaneous candidates agree on one winner, and `hold` runs work only while holding."""

from __future__ import annotations

import threading
import time

import pytest

from tests.servers import wait_until
from tracetune import store
from tracetune.store.lease import Lease, hold

SECONDS = 2.0  # margin 1/3 s, settle 0.5 s


def test_the_first_candidate_holds_and_a_second_stands_by(client):
    first, second = Lease(client, "analyzer", SECONDS, holder="a"), Lease(client, "analyzer", SECONDS, holder="b")
    assert first.state() is None
    assert first.acquire() and first.holding() and first.term == 1
    assert not second.acquire() and not second.holding()
    state = second.state()
    assert (state.term, state.holder, state.expired) == (1, "a", False)
    # Another name is another lease.
    assert Lease(client, "tuner", SECONDS, holder="b").acquire()


def test_renewals_keep_it_and_a_standby_takes_over_once_they_stop(client):
    first, second = Lease(client, "analyzer", SECONDS, holder="a"), Lease(client, "analyzer", SECONDS, holder="b")
    assert first.acquire()
    renewed_until = time.monotonic() + 2 * SECONDS
    while time.monotonic() < renewed_until:  # two lease periods, renewed every third of one
        assert first.renew()
        assert not second.acquire()
        time.sleep(SECONDS / 3)
    assert first.renew()
    last_renewal = time.monotonic()
    # The holder dies (renews no more): it stops acting before the store lets anyone else in.
    taken = wait_until(lambda: second.acquire() and time.monotonic(), 3 * SECONDS, 0.05, "the standby's takeover")
    assert not first.holding()
    assert taken - last_renewal >= SECONDS - 0.1  # not before the last renewal expired on the server
    assert second.term == 2 and second.state().holder == "b"
    # The old holder comes back: a candidate again, it does not get the lease while the new one renews.
    assert not first.renew() and not first.acquire()


def test_a_released_lease_is_taken_over_at_once(client):
    first, second = Lease(client, "tuner", SECONDS, holder="a"), Lease(client, "tuner", SECONDS, holder="b")
    assert first.acquire()
    first.release()
    assert not first.holding()
    assert second.acquire() and second.term == 2
    second.release()
    assert first.acquire() and first.term == 3


def test_a_claim_that_took_longer_than_settle_does_not_count(client):
    slow = Lease(client, "analyzer", SECONDS, holder="a", settle=1e-9)
    assert not slow.acquire() and not slow.holding()
    # Its claim is the earliest of term 1, so nobody holds term 1: the next term comes once it expires.
    other = Lease(client, "analyzer", SECONDS, holder="b")
    assert not other.acquire()
    wait_until(other.acquire, 3 * SECONDS, 0.1, "term 2")
    assert other.term == 2


def test_simultaneous_candidates_agree_on_one_winner(db_settings):
    n, rounds = 6, 4
    leases = [Lease(store.connect(db_settings, ensure_schema=False), "analyzer", 10.0, holder=f"c{i}")
              for i in range(n)]

    def claim(barrier: threading.Barrier, won: list[bool], i: int) -> None:
        barrier.wait()
        won[i] = leases[i].acquire()

    for round_ in range(1, rounds + 1):
        barrier, won = threading.Barrier(n), [False] * n
        threads = [threading.Thread(target=claim, args=(barrier, won, i)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sum(won) == 1, won
        winner = leases[won.index(True)]
        assert winner.term == round_
        assert {lease.state().holder for lease in leases} == {winner.holder}
        assert [lease.holding() for lease in leases] == won
        winner.release()


@pytest.mark.timeout(60)
def test_hold_runs_the_work_only_while_holding_and_hands_over_on_stop(db_settings):
    events: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def worker(name: str, lease: Lease):
        def work(lost: threading.Event) -> None:
            with lock:
                events.append((name, "start", time.monotonic()))
            while not lost.wait(0.05):
                assert lease.holding()
            with lock:
                events.append((name, "end", time.monotonic()))
        return work

    leases = {name: Lease(store.connect(db_settings, ensure_schema=False), "tuner", SECONDS, holder=name)
              for name in ("a", "b")}
    stops = {name: threading.Event() for name in leases}
    threads = {name: threading.Thread(target=hold, args=(lease, stops[name], worker(name, lease)))
               for name, lease in leases.items()}
    threads["a"].start()
    wait_until(lambda: events, 10, 0.05, "a's work")
    threads["b"].start()
    time.sleep(2 * SECONDS)  # b polls and stands by; a renews
    assert [e[:2] for e in events] == [("a", "start")]
    stopped = time.monotonic()
    stops["a"].set()
    threads["a"].join(10)
    wait_until(lambda: len(events) == 3, 10, 0.05, "b's work")
    assert [e[:2] for e in events] == [("a", "start"), ("a", "end"), ("b", "start")]
    assert events[2][2] - stopped < SECONDS  # released: no waiting for the expiry
    assert leases["b"].term == leases["a"].term + 1
    stops["b"].set()
    threads["b"].join(10)
    assert [e[:2] for e in events][-1] == ("b", "end") and not leases["b"].holding()

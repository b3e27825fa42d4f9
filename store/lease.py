"""A lease in ClickHouse: which one of several replicas (analyzer, tuner) is the active one.

ClickHouse has no compare-and-set, so the lease is built on what it does promise: an acknowledged
insert is visible to every later read. Rows go to `tracetune_leases` (store/sql/100_*), append-only,
stamped by the server's clock (`now64`), so no client clock decides anything:

- A lease is a sequence of terms. The newest row of the newest term says when that term expires
  (`expires_at`, `claimed_at` + `seconds`, both computed by the server).
- To acquire, a candidate reads the newest term; once the server says it has expired (or there is
  none), the candidate inserts a claim for term + 1, waits `settle` seconds, reads every claim of
  term + 1, and holds the term if its own claim is the earliest (claimed_at, holder). A claim whose
  insert took longer than `settle` does not count (the candidate stands by): so any claim stamped
  earlier than another was visible before that other's read, and simultaneous candidates agree.
- The holder renews (inserts a row for its term) every `seconds` / 3. It acts only until its own
  deadline: `seconds` minus `margin` after the start of its last renewal acknowledged in time, on its
  own monotonic clock. That deadline always falls before the server's `expires_at` of that renewal, so
  the holder has stopped before anyone may claim the next term. A renewal that fails or comes back
  late does not extend the deadline; the holder then stops acting and becomes a candidate again.
- `release()` (clean shutdown) stops acting, then inserts a row that expires at once, so a standby
  takes over at its next poll instead of after `seconds`.

On a replicated cluster every read must see every acknowledged insert, whichever replica answers:
the user's settings profile needs `insert_quorum = 'auto'`, `insert_quorum_parallel = 0` and
`select_sequential_consistency = 1`, and the servers' clocks must agree (NTP) well within `settle`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["Lease", "LeaseState", "hold", "LEASES_TABLE"]

log = logging.getLogger("tracetune.store.lease")

LEASES_TABLE = "tracetune_leases"

_INSERT_SQL = f"""
INSERT INTO {LEASES_TABLE} (name, term, holder, seconds)
SELECT {{name:String}}, {{term:UInt64}}, {{holder:String}}, {{seconds:Float64}}
"""

# The newest term of a lease: its winner (earliest claim), the expiry of its newest row, and whether the
# server's clock says it has passed.
_STATE_SQL = f"""
SELECT term,
       argMin(holder, (claimed_at, holder)) AS winner,
       argMax(expires_at, (claimed_at, holder)) AS expires,
       now64(6) >= expires AS expired
FROM {LEASES_TABLE}
WHERE name = {{name:String}}
GROUP BY term
ORDER BY term DESC
LIMIT 1
"""

_WINNER_SQL = f"""
SELECT holder FROM {LEASES_TABLE}
WHERE name = {{name:String}} AND term = {{term:UInt64}}
ORDER BY claimed_at, holder
LIMIT 1
"""


@dataclass(frozen=True)
class LeaseState:
    """The newest term of a lease as the store has it: who won it, when it expires, whether it has."""

    term: int
    holder: str
    expires_at: datetime
    expired: bool


_CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _clock() -> float:
    """Seconds on a clock that only moves forward and, on Linux, unlike `time.monotonic`, keeps counting
    while the machine is suspended (as the store's clock does)."""
    return time.clock_gettime(_CLOCK_ID)


def _default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class Lease:
    """One candidate for the lease `name`; `holding()` says whether it may act now.

    `acquire()`, `renew()` and `release()` each talk to the store once or twice; `hold()` calls them on
    the schedule the lease needs. Thread-safe: `holding()` may be called from any thread.
    """

    def __init__(self, client, name: str, seconds: float = 30.0, holder: str | None = None,
                 margin: float | None = None, settle: float | None = None,
                 clock: Callable[[], float] = _clock, sleep: Callable[[float], None] = time.sleep):
        if seconds <= 0:
            raise ValueError(f"Lease.seconds must be > 0, got {seconds}")
        self.client = client
        self.name = name
        self.seconds = float(seconds)
        self.holder = holder or _default_holder()
        # Stop acting this long before the server's expiry: covers clock rate differences and the write
        # an action started just before the deadline still makes.
        self.margin = self.seconds / 6 if margin is None else margin
        # How long a claim may take to insert, and how long a candidate waits before reading the claims.
        self.settle = min(1.0, self.seconds / 4) if settle is None else settle
        if not 0 <= self.margin < self.seconds or not 0 < self.settle < self.seconds - self.margin:
            raise ValueError(f"Lease margin ({self.margin}) and settle ({self.settle}) must fit in its "
                             f"{self.seconds} seconds")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._term = 0
        self._deadline = 0.0  # on self._clock; holding while it is ahead

    # ---- what this candidate knows ------------------------------------------------------------

    @property
    def term(self) -> int:
        """The term held (or last held); 0 before the first."""
        return self._term

    def holding(self) -> bool:
        """Whether this candidate holds the lease now and may act."""
        with self._lock:
            return self._clock() < self._deadline

    def remaining(self) -> float:
        """Seconds left to act without a renewal (0 when not holding)."""
        with self._lock:
            return max(0.0, self._deadline - self._clock())

    # ---- talking to the store ------------------------------------------------------------------

    def state(self) -> LeaseState | None:
        """The newest term in the store (None: never claimed)."""
        rows = self.client.query(_STATE_SQL, parameters={"name": self.name}).result_rows
        if not rows:
            return None
        term, winner, expires, expired = rows[0]
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        return LeaseState(int(term), winner, expires, bool(expired))

    def acquire(self) -> bool:
        """Claim the next term if the current one has expired (by the server's clock); whether holding now.

        Renews instead when already holding."""
        if self.holding():
            return self.renew()
        current = self.state()
        if current is not None and not current.expired:
            return False
        term = (current.term if current else 0) + 1
        started = self._clock()
        self._insert(term, self.seconds)
        took = self._clock() - started
        if took >= self.settle:
            log.info("lease %s: claim for term %d took %.2fs (over %.2fs); not counted", self.name, term, took,
                     self.settle)
            return False
        self._sleep(self.settle)
        rows = self.client.query(_WINNER_SQL, parameters={"name": self.name, "term": term}).result_rows
        if not rows or rows[0][0] != self.holder:
            return False
        with self._lock:
            if self._clock() < started + self.seconds - self.margin:
                self._term, self._deadline = term, started + self.seconds - self.margin
        return self.holding()

    def renew(self) -> bool:
        """Extend the term held; whether still holding. A renewal acknowledged after the deadline, or
        failing, does not extend it."""
        if not self.holding():
            return False
        started = self._clock()
        try:
            self._insert(self._term, self.seconds)
        except Exception as exc:  # noqa: BLE001 - the deadline decides; the next renewal may succeed
            log.warning("lease %s: renewal failed (%s); %.1fs left", self.name, exc, self.remaining())
            return self.holding()
        with self._lock:
            if self._clock() < self._deadline:
                self._deadline = started + self.seconds - self.margin
        return self.holding()

    def release(self) -> None:
        """Stop acting, then end the term in the store so a standby takes over at its next poll."""
        with self._lock:
            held, self._deadline = self._clock() < self._deadline, 0.0
        if held:
            self._insert(self._term, 0.0)

    def _insert(self, term: int, seconds: float) -> None:
        self.client.command(_INSERT_SQL, parameters={"name": self.name, "term": term, "holder": self.holder,
                                                     "seconds": seconds})


def hold(lease: Lease, stop: threading.Event, work: Callable[[threading.Event], None]) -> None:
    """Run `work(lost)` only while holding `lease`, until `stop` is set; then release it.

    Polls for the lease every `lease.seconds` / 3 and, once held, renews it as often. `work` runs in a
    thread of its own; `lost` is set as the lease lapses or on stop, and `work` must return soon after
    (it should also check `lease.holding()` right before each action). Run again on every new term.
    """
    lost = threading.Event()
    worker: threading.Thread | None = None
    shown: tuple | None = None
    every = lease.seconds / 3
    try:
        while not stop.is_set():
            if worker is not None and not worker.is_alive():
                worker = None
            try:
                # A new term only once the last one's work has returned (it may still be finishing a write).
                held = lease.renew() if lease.holding() else worker is None and lease.acquire()
            except Exception as exc:  # noqa: BLE001 - the store may be restarting; the next poll retries
                log.warning("lease %s: cannot reach the store (%s); will retry", lease.name, exc)
                held = lease.holding()
            if held and worker is None:
                log.info("holding lease %s (term %d) as %s", lease.name, lease.term, lease.holder)
                shown, lost = None, threading.Event()
                worker = threading.Thread(target=_run, args=(work, lost, lease), name=f"lease-{lease.name}",
                                          daemon=True)
                worker.start()
            elif not held:
                shown = _show_standby(lease, shown)
            stop.wait(min(every, lease.remaining()) if held else every)
            if worker is not None and not lease.holding() and not lost.is_set():
                log.warning("lost lease %s (term %d): not renewed in time; stopping", lease.name, lease.term)
                lost.set()
    finally:
        lost.set()
        if worker is not None:
            worker.join(lease.seconds)
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - then it lapses after `seconds`
            log.warning("lease %s: release failed (%s); a standby takes over when it expires", lease.name, exc)


def _run(work: Callable[[threading.Event], None], lost: threading.Event, lease: Lease) -> None:
    try:
        work(lost)
    except Exception:
        log.exception("work under lease %s failed", lease.name)


def _show_standby(lease: Lease, shown: tuple | None) -> tuple | None:
    """Log who holds the lease when that changes (not on every poll)."""
    try:
        state = lease.state()
    except Exception:  # noqa: BLE001 - logged by the caller's next attempt
        return shown
    if state is None or state.expired:
        return shown
    if (state.term, state.holder) != shown:
        log.info("standing by: lease %s held by %s until %s (term %d)", lease.name, state.holder,
                 state.expires_at.isoformat(), state.term)
    return state.term, state.holder

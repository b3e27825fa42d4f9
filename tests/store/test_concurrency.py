"""Many queries at once, and every query stoppable: a slow query delays no one; timeouts and KILL cancel."""

from __future__ import annotations

import statistics
import threading
import time
import uuid

import httpx

from tests.servers import wait_until

# Seconds of CPU on one core per billion rows; far longer than any test waits, so only a cancel ends it.
SLOW = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 3 /* {marker} */"


def _running(http: httpx.Client, marker: str) -> list[str]:
    """Engine query ids of the slow query marked `marker` in system.processes.

    Only the statement itself: system.processes shows query parameters substituted, so the store's
    own parse of the request (`SELECT formatQuery('... marker ...')`) matches the marker for a moment too.
    """
    text = http.post("/", content="SELECT query_id FROM system.processes WHERE position(query, {m:String}) > 0 "
                                  "AND startsWith(query, {s:String}) AND query_id != queryID()",
                     params={"param_m": marker, "param_s": SLOW.split(" WHERE")[0]}).text
    return text.split()


def _timed(http: httpx.Client, query: str) -> float:
    started = time.perf_counter()
    response = http.post("/", content=query)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


class Background:
    """A request running on its own thread; `response` or `error` once it ends."""

    def __init__(self, http: httpx.Client, query: str, timeout: float | None = None, **params: str):
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, args=(http, query, timeout, params), daemon=True)
        self._thread.start()

    def _run(self, http, query, timeout, params) -> None:
        started = time.perf_counter()
        try:
            self.response = http.post("/", content=query, params=params, timeout=timeout or 120)
        except httpx.HTTPError as exc:
            self.error = exc
        self.elapsed = time.perf_counter() - started

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the request did not end"


def test_select_1_and_inserts_are_not_delayed_by_a_slow_query(http):
    http.post("/", content="CREATE TABLE marks (id UInt32) ENGINE = MergeTree ORDER BY id").raise_for_status()
    idle = [_timed(http, "SELECT 1") for _ in range(10)]

    marker = uuid.uuid4().hex
    slow = Background(http, SLOW.format(marker=marker) + " SETTINGS max_execution_time = 30")
    wait_until(lambda: _running(http, marker), 10, 0.02, "the slow query to start")
    started = time.perf_counter()
    busy = [_timed(http, "SELECT 1") for _ in range(10)]
    inserts = [_timed(http, f"INSERT INTO marks VALUES ({i})") for i in range(5)]
    time.sleep(max(0.0, 2.0 - (time.perf_counter() - started)))  # the slow query runs at least 2 s
    assert _running(http, marker), "the slow query ended before the measurement did"

    for query_id in _running(http, marker):
        http.post("/", content="KILL QUERY WHERE query_id = {q:String} SYNC", params={"param_q": query_id})
    slow.join(30)
    assert http.post("/", content="SELECT count() FROM marks").text == "5\n"
    # With one engine lock the first of these waited for the whole slow query; now none waits for half of it
    # (on two busy cores a SELECT 1 can still queue for CPU a few tenths of a second), and the typical one is
    # close to one on an idle store.
    print(f"idle {sorted(idle)}\nbusy {sorted(busy)}\ninserts {sorted(inserts)}\nslow {slow.elapsed:.2f} s")
    assert max(busy + inserts) < slow.elapsed / 2
    assert statistics.median(busy) < 20 * max(statistics.median(idle), 0.002)


def test_a_client_that_times_out_cancels_its_query(http):
    marker = uuid.uuid4().hex
    slow = Background(http, SLOW.format(marker=marker), timeout=1.5)
    wait_until(lambda: _running(http, marker), 10, 0.02, "the slow query to show in system.processes")
    slow.join(10)
    assert isinstance(slow.error, httpx.TimeoutException)
    # The engine stops it as soon as the client has gone, not when it would have finished (minutes).
    wait_until(lambda: not _running(http, marker), 5, 0.05, "the abandoned query to leave system.processes")


def test_kill_query_stops_a_running_query(http):
    marker = uuid.uuid4().hex
    slow = Background(http, SLOW.format(marker=marker))
    query_ids = wait_until(lambda: _running(http, marker), 10, 0.02, "the slow query to start")
    started = time.perf_counter()
    killed = http.post("/", content="KILL QUERY WHERE query_id = {q:String} SYNC FORMAT TSV",
                       params={"param_q": query_ids[0]})
    assert killed.status_code == 200 and query_ids[0] in killed.text
    slow.join(10)
    assert time.perf_counter() - started < 10
    assert slow.response is not None and slow.response.headers["X-ClickHouse-Exception-Code"] == "394"
    assert "QUERY_WAS_CANCELLED" in slow.response.text
    assert not _running(http, marker)


def test_max_execution_time_is_honoured(http):
    response = http.post("/", content=SLOW.format(marker="budget"), params={"max_execution_time": "1"})
    assert response.status_code == 408 and response.headers["X-ClickHouse-Exception-Code"] == "159"
    assert "Timeout exceeded" in response.text


def test_a_query_id_already_running_is_refused(http):
    marker = uuid.uuid4().hex
    query_id = f"twice-{marker}"
    slow = Background(http, SLOW.format(marker=marker), query_id=query_id)
    engine_ids = wait_until(lambda: _running(http, marker), 10, 0.02, "the slow query to start")
    second = http.post("/", content="SELECT 1", params={"query_id": query_id})
    assert second.headers["X-ClickHouse-Exception-Code"] == "216"
    http.post("/", content="KILL QUERY WHERE query_id = {q:String} SYNC", params={"param_q": engine_ids[0]})
    slow.join(10)
    assert slow.response is not None and slow.response.headers["X-ClickHouse-Query-Id"] == query_id
    assert http.post("/", content="SELECT 1", params={"query_id": query_id}).text == "1\n"  # free again

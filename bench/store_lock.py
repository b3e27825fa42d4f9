"""What the store's lock costs per request: ClickHouse's parse and the allow-lists, beside running the query.

Every request the store serves is first read by the engine's parser (formatQuery, then EXPLAIN AST) and
checked against the allow-lists (store/policy.py); a statement seen before (same text) skips the parse.
This measures, in one process on one engine, side by side:
- the lock on a statement it has not seen (parse + checks), and on one it has (cache hit);
- running the same statement on the engine, for scale.

    .venv/bin/python bench/store_lock.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

STATEMENTS = {
    "SELECT 1": "SELECT 1",
    "rollup-like aggregate": ("SELECT number % 10 AS k, count() AS n, quantiles(0.5, 0.95)(number) AS q, "
                              "sumIf(number, number % 3 = 0) FROM numbers(10000) WHERE number > {lo:UInt32} "
                              "GROUP BY k ORDER BY k SETTINGS max_threads = 2 FORMAT JSONEachRow"),
    "CREATE TABLE": ("CREATE TABLE IF NOT EXISTS bench_t (a UInt64, b String, c DateTime64(9)) ENGINE = MergeTree "
                     "PARTITION BY toDate(c) ORDER BY (a, c) TTL toDateTime(c) + INTERVAL 30 DAY "
                     "SETTINGS index_granularity = 8192"),
}


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    from tracetune.store.policy import Lock
    from tracetune.store.statements import Parser

    folder = tempfile.mkdtemp(prefix="tracetune-lock-bench-")
    lock = Lock(Parser(folder))
    conn = lock.parser._conn()
    params = {"lo": "5"}
    print(f"median milliseconds over {args.repeat} runs (one engine, this process)\n")
    print(f"{'statement':24} {'lock, new text':>15} {'lock, seen':>11} {'engine runs it':>15} {'new / run':>10}")
    for name, text in STATEMENTS.items():
        fresh, seen, run = [], [], []
        for i in range(args.repeat):
            unique = f"{text} " + " " * (i % 7) + f"/* {i} */"  # a new text each time: no cache hit
            start = time.perf_counter()
            lock.check(unique, params, 0)
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            lock.check(text, params, 0)
            seen.append(time.perf_counter() - start)
            start = time.perf_counter()
            conn.query(text, "Null", params=params)
            run.append(time.perf_counter() - start)
        ratio = statistics.median(fresh) / statistics.median(run)
        print(f"{name:24} {_ms(fresh):>15} {_ms(seen):>11} {_ms(run):>15} {ratio:>9.2f}x")


if __name__ == "__main__":
    main()

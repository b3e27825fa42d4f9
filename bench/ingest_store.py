"""What each index and materialized view of otel_traces costs the store per inserted row.

Starts an embedded store of its own and builds, each in its own database, copies of the span table
from the schema's own files (store/sql): bare (no data-skipping index, no view), bare plus one index
at a time, the table as shipped (every index), the table plus one view at a time, and everything.
Each copy takes the same blocks (the collector's batch size, a fresh deduplication token per insert,
merges stopped so only the insert is counted), and the table prints the store process's CPU per row
(user + system from /proc around each insert; chDB keeps no system.query_log), its wall time, and
each part's cost over its base: the bare table for an index, the table as shipped for a view, and
everything as shipped for the same rows sent as an Arrow stream (the collector's format), stored
with ZSTD(1) on every column (as before migration 180) or with LZ4 on every column, ids included.

Three workloads: `executor` spans (a root and four steps per task, tracetune.* and GenAI attributes,
so every span feeds the rollups; bench/harness.py GENERATE_SQL, timestamps over a day), the same with
timestamps over one second as a batch of live ingest has them (`executor-live`: far fewer rollup
rows per batch), and `bench` spans (the OTLP bodies of bench/ingest.py: 12 attributes, events and
links; one span in five feeds the rollups).

    .venv/bin/python bench/ingest_store.py                    # 20,000-row blocks, 4 inserts per copy
    .venv/bin/python bench/ingest_store.py --rows 50000 --inserts 3
    .venv/bin/python bench/ingest_store.py --merges --rows 10000 --workload bench   # merges by insert size
    .venv/bin/python bench/ingest_store.py --settled --rows 50000 --workload bench  # each part, merges included

--settled feeds each copy --merge-total rows with merges running and counts the CPU until they settle, in
two interleaved rounds (so a drift of the machine's load hits every copy alike); its rows have unique ids
(each repeat of the block gets ids hashed from its own, as fresh spans would), so compression sees what it
would see live.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import GENERATE_SQL, start_store, stop_process  # bench/harness.py: this script's folder
from ingest import cpu_seconds
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SQL = ROOT / "store" / "sql"
console = Console(width=None if sys.stdout.isatty() else 160)

# The span table and what hangs off it: (view name, the files that create its target and itself).
TABLE_FILE = "001_otel_traces.sql"
VIEWS = {
    "trace-id view (otel_traces_trace_id_ts)": ["002_otel_traces_trace_id_ts.sql",
                                                "003_otel_traces_trace_id_ts_mv.sql"],
    "spans_1m view": ["020_tracetune_spans_1m.sql", "021_tracetune_spans_1m_mv.sql",
                      "170_tracetune_spans_1m_mv_tokens.sql"],
    "spans_1m + spans_1h views": ["020_tracetune_spans_1m.sql", "021_tracetune_spans_1m_mv.sql",
                                  "170_tracetune_spans_1m_mv_tokens.sql", "022_tracetune_spans_1h.sql",
                                  "023_tracetune_spans_1h_mv.sql"],
    "task_errors_1m view": ["045_tracetune_task_errors_1m.sql", "046_tracetune_task_errors_1m_mv.sql"],
    "error_spans view": ["165_tracetune_error_spans.sql"],
}
# Later files that change otel_traces itself (its columns' codecs), applied after 001 in every copy but the one
# that shows the table before them.
TABLE_ALTERS = ["180_otel_traces_lz4.sql"]
WORKLOADS = ("executor", "executor-live", "bench")
_INDEX = re.compile(r"^\s*INDEX (\w+) .*$", re.M)


def statements(name: str) -> list[str]:
    """The statements of one schema file (separated by a line that is only `;`), comments dropped."""
    text = "\n".join(line for line in (SQL / name).read_text().splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r"^;\s*$", text, flags=re.M) if s.strip()]


def table_ddl(indexes: set[str] | None) -> str:
    """otel_traces as 001 creates it, keeping only the named data-skipping indexes (None: all)."""
    ddl = statements(TABLE_FILE)[0]
    if indexes is None:
        return ddl
    ddl = _INDEX.sub(lambda m: m.group(0) if m.group(1) in indexes else "", ddl)
    ddl = re.sub(r",\s*\n(\s*\n)*\s*\) ENGINE", "\n) ENGINE", ddl)  # the comma the last kept line leaves
    return re.sub(r"\n\s*\n", "\n", ddl)


def index_names() -> list[str]:
    return _INDEX.findall(statements(TABLE_FILE)[0])


@dataclass
class Variant:
    name: str
    indexes: set[str] | None  # None: every index of 001
    files: list[str]
    fmt: str = "Native"  # the insert's format; "ArrowStream" is what the collector's insert_arrow sends
    codec: str = ""  # instead of every ZSTD(1) of 001
    alters: bool = True  # TABLE_ALTERS applied (False: the codecs as 001 alone has them, ZSTD(1))


def variants() -> list[Variant]:
    out = [Variant("bare: no index, no view", set(), [])]
    out += [Variant(f"+ index {name}", {name}, []) for name in index_names()]
    out.append(Variant("as shipped, no view (every index)", None, []))
    out += [Variant(f"every index + {view}", None, files) for view, files in VIEWS.items()]
    every = list(dict.fromkeys(f for files in VIEWS.values() for f in files))
    out.append(Variant("as shipped: every index + every view", None, every))
    out.append(Variant("as shipped, inserted as ArrowStream (the collector's format)", None, every, "ArrowStream"))
    out.append(Variant("as shipped, ZSTD(1) on every column (before 180)", None, every, alters=False))
    out.append(Variant("as shipped, LZ4 on every column (the ids too)", None, every, codec="LZ4", alters=False))
    return out


@dataclass
class Cost:
    cpu_us_per_row: float
    wall_us_per_row: float
    bytes_per_row: float  # otel_traces' parts on disk (as inserted: merges are stopped)


def measure(client, pid: int, database: str, variant: Variant, blocks: dict[str, bytes], columns: list[str], rows: int,
            inserts: int) -> Cost:
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.command(f"CREATE DATABASE {database}")
    db = client.database
    try:
        client.database = database
        ddl = table_ddl(variant.indexes)
        client.command(ddl.replace("ZSTD(1)", variant.codec) if variant.codec else ddl)
        for name in TABLE_ALTERS if variant.alters else []:
            for statement in statements(name):
                client.command(statement)
        for name in variant.files:
            for statement in statements(name):
                client.command(statement)
        tables = [row[0] for row in client.query(
            f"SELECT name FROM system.tables WHERE database = '{database}' AND engine LIKE '%MergeTree'").result_rows]
        for table in tables:
            client.command(f"SYSTEM STOP MERGES {database}.{table}")
        marker = f"ingest_store_{database}_{time.time_ns()}"
        wall = cpu = 0.0
        for i in range(inserts):
            cpu0, started = cpu_seconds(pid), time.perf_counter()
            client.raw_insert("otel_traces", columns, blocks[variant.fmt], fmt=variant.fmt,
                              settings={"insert_deduplication_token": f"{marker}-{i}"})
            wall += time.perf_counter() - started
            cpu += cpu_seconds(pid) - cpu0
        size = int(client.command(f"SELECT sum(bytes_on_disk) FROM system.parts WHERE database = '{database}' "
                                  "AND table = 'otel_traces' AND active"))
    finally:
        client.database = db
        client.command(f"DROP DATABASE IF EXISTS {database}")
    return Cost(cpu / (rows * inserts) * 1e6, wall / (rows * inserts) * 1e6, size / (rows * inserts))


def formats(client, cols: str, select: str) -> dict[str, bytes]:
    """The same rows as a Native block and as an Arrow stream."""
    return {fmt: client.raw_query(f"{select} FORMAT {fmt}") for fmt in ("Native", "ArrowStream")}


def merge_cost(client, pid: int, native: bytes, columns: list[str], block_rows: int, rows: int, total: int,
               settle: float) -> tuple[float, float, int]:
    """Insert `total` rows in inserts of `block_rows` into the schema as shipped with merges running, then
    wait until no merge has run for `settle` s: CPU µs per row while inserting (merges run meanwhile too) and
    until the merges settled, and the parts left."""
    database = f"bench_merge_{block_rows}"
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.command(f"CREATE DATABASE {database}")
    db = client.database
    try:
        client.database = database
        client.command(table_ddl(None))
        for name in [*TABLE_ALTERS, *dict.fromkeys(f for files in VIEWS.values() for f in files)]:
            for statement in statements(name):
                client.command(statement)
        repeat = block_rows // rows  # main() checked that it divides
        # one insert of block_rows: the same block `repeat` times in one body (Native blocks concatenate)
        body = native * repeat
        cpu0 = cpu_seconds(pid)
        for i in range(total // block_rows):
            client.raw_insert("otel_traces", columns, body, fmt="Native",
                              settings={"insert_deduplication_token": f"merge-{block_rows}-{i}"})
        inserted = cpu_seconds(pid) - cpu0
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle:
            time.sleep(0.5)
            if int(client.command(f"SELECT count() FROM system.merges WHERE database = '{database}'")):
                quiet_since = time.monotonic()
        done = cpu_seconds(pid) - cpu0
        parts = int(client.command(f"SELECT count() FROM system.parts WHERE database = '{database}' AND active "
                                   "AND table = 'otel_traces'"))
    finally:
        client.database = db
        client.command(f"DROP DATABASE IF EXISTS {database}")
    n = total // block_rows * block_rows
    return inserted / n * 1e6, done / n * 1e6, parts


# --settled: (name, indexes kept (None: every one), codec files applied, view files, rows per insert or 0: --rows,
# table settings appended)
def settled_plan(rows: int) -> list[tuple[str, set[str] | None, list[str], list[str], int, str]]:
    groups = {name: files for name, files in VIEWS.items() if name != "spans_1m view"}  # its files are in the next
    views = list(dict.fromkeys(f for files in groups.values() for f in files))
    every = set(index_names())
    plan = [("as shipped", None, TABLE_ALTERS, views, rows, ""),
            ("ZSTD(1) on every column (before 180)", None, [], views, rows, ""),
            ("no data-skipping index", set(), TABLE_ALTERS, views, rows, "")]
    plan += [(f"without index {name}", every - {name}, TABLE_ALTERS, views, rows, "") for name in sorted(every)]
    plan.append(("no view", None, TABLE_ALTERS, [], rows, ""))
    for view in groups:  # the files every other view needs stay
        kept = [f for f in views if any(f in files for other, files in groups.items() if other != view)]
        plan.append((f"without {view}", None, TABLE_ALTERS, kept, rows, ""))
    plan.append(("horizontal merges", None, TABLE_ALTERS, views, rows, ", enable_vertical_merge_algorithm = 0"))
    plan += [(f"inserts of {n:,} rows", None, TABLE_ALTERS, views, n, "") for n in (rows // 2, rows * 2)]
    return plan


def settled(client, pid: int, native: bytes, columns: list[str], args) -> None:
    """Each variant of the schema fed --merge-total unique-id rows, CPU until its merges settle (two rounds)."""
    block_rows, total = args.rows, args.merge_total
    client.command("DROP DATABASE IF EXISTS bench_settled_src")
    client.command("CREATE DATABASE bench_settled_src")
    shape = table_ddl(set()).split("(", 1)[1].split(") ENGINE")[0]
    client.command(f"CREATE TABLE bench_settled_src.block ({shape}) ENGINE = Memory")
    client.command(f"CREATE TABLE bench_settled_src.src ({shape}) ENGINE = Memory")
    client.raw_insert("bench_settled_src.block", columns, native, fmt="Native")
    # ids of repeat k: hashed from the block's own, k and which 3,200 rows they are in (the bench workload's 16
    # requests come round again after that), so ids are unique and traces and parents stay as they were
    salt = "{k}, intDiv(rowNumberInAllBlocks(), 3200)"
    fresh = (f"* REPLACE (lower(hex(sipHash128(TraceId, {salt}))) AS TraceId, lower(hex(sipHash64(SpanId, {salt}))) "
             f"AS SpanId, if(ParentSpanId = '', '', lower(hex(sipHash64(ParentSpanId, {salt})))) AS ParentSpanId)")
    for k in range(-(-total // block_rows)):
        client.command(f"INSERT INTO bench_settled_src.src SELECT {fresh.format(k=k)} FROM bench_settled_src.block")
    plan = settled_plan(block_rows)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, *_ in plan}
    db = client.database
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("inserting and merging", total=2 * len(plan) + 1)
            # round -1 warms up (the engine compiles the views' expressions on their first inserts): not counted
            for round_ in range(-1, 2):
                chosen = plan[:1] if round_ < 0 else plan
                for i, (name, indexes, alters, views, rows, table_settings) in enumerate(chosen):
                    database = f"bench_settled_{i}"
                    client.command(f"DROP DATABASE IF EXISTS {database}")
                    client.command(f"CREATE DATABASE {database}")
                    client.database = database
                    ddl = table_ddl(indexes)
                    client.command(ddl.replace("non_replicated_deduplication_window = 10000",
                                               "non_replicated_deduplication_window = 10000" + table_settings))
                    for file in [*alters, *views]:
                        for statement in statements(file):
                            client.command(statement)
                    cpu0 = cpu_seconds(pid)
                    n = total // rows
                    for j in range(n):
                        client.command(f"INSERT INTO otel_traces SELECT * FROM bench_settled_src.src LIMIT {rows} "
                                       f"OFFSET {j * rows}", settings={"insert_deduplication_token": f"s{round_}-{j}"})
                    inserted = cpu_seconds(pid) - cpu0
                    quiet_since = time.monotonic()
                    while time.monotonic() - quiet_since < args.settle:
                        time.sleep(0.3)
                        if int(client.command(f"SELECT count() FROM system.merges WHERE database = '{database}'")):
                            quiet_since = time.monotonic()
                    done = cpu_seconds(pid) - cpu0
                    size = int(client.command(f"SELECT sum(bytes_on_disk) FROM system.parts WHERE database = "
                                              f"'{database}' AND table = 'otel_traces' AND active"))
                    if round_ >= 0:
                        results[name].append((inserted / (n * rows) * 1e6, done / (n * rows) * 1e6,
                                              size / (n * rows)))
                    client.database = db
                    client.command(f"DROP DATABASE IF EXISTS {database}")
                    bar.advance(task)
    finally:
        client.database = db
        client.command("DROP DATABASE IF EXISTS bench_settled_src")
    table = Table(title=f"Store CPU per row, inserts and merges: {total:,} rows with unique ids into each copy in "
                        f"inserts of {block_rows:,} (unless named), until no merge runs for {args.settle:g} s; "
                        "mean of two interleaved rounds")
    for name in ("copy", "while inserting µs/row", "until merges settle µs/row", "vs as shipped", "B/row on disk"):
        table.add_column(name, justify="left" if name == "copy" else "right")
    mean = {name: [sum(x) / len(x) for x in zip(*values, strict=True)] for name, values in results.items()}
    base = mean["as shipped"][1]
    for name, (inserted, done, size) in mean.items():
        table.add_row(name, f"{inserted:.2f}", f"{done:.2f}", f"{done - base:+.2f}", f"{size:.1f}")
    console.print(table)


def workloads(client, rows: int) -> dict[str, tuple[dict[str, bytes], list[str]]]:
    """Native blocks of `rows` spans of each workload, made in a scratch database."""
    from ingest import COLUMNS, SPANS_PER_REQUEST, TEMPLATES, ExportTraceServiceRequest, _columns, make_template

    client.command("DROP DATABASE IF EXISTS bench_src")
    client.command("CREATE DATABASE bench_src")
    client.command(f"CREATE TABLE bench_src.src ({table_ddl(set()).split('(', 1)[1].split(') ENGINE')[0]}) "
                   "ENGINE = Memory")
    cols = ", ".join(f"`{c}`" for c in COLUMNS)
    out = {}
    db = client.database
    client.database = "bench_src"
    try:
        client.command(GENERATE_SQL.replace("INSERT INTO otel_traces", "INSERT INTO src"),
                       parameters={"start": 0, "count": rows, "seed": 42})
        out["executor"] = formats(client, cols, f"SELECT {cols} FROM src"), COLUMNS
        client.command("TRUNCATE TABLE src")
        live = GENERATE_SQL.replace("INSERT INTO otel_traces", "INSERT INTO src").replace(
            "% 86400000000000", "% 1000000000")  # timestamps over one second, not a day
        assert live != GENERATE_SQL.replace("INSERT INTO otel_traces", "INSERT INTO src")
        client.command(live, parameters={"start": 0, "count": rows, "seed": 42})
        out["executor-live"] = formats(client, cols, f"SELECT {cols} FROM src"), COLUMNS
        client.command("TRUNCATE TABLE src")
        requests = []
        for seed in range(TEMPLATES):
            request = ExportTraceServiceRequest()
            request.ParseFromString(make_template(seed).body)
            requests.append(request)
        for i in range(0, rows, SPANS_PER_REQUEST):
            client.insert("src", _columns(requests[i // SPANS_PER_REQUEST % len(requests)]), column_names=COLUMNS,
                          column_oriented=True)
        out["bench"] = formats(client, cols, f"SELECT {cols} FROM src LIMIT {rows}"), COLUMNS
    finally:
        client.database = db
        client.command("DROP DATABASE IF EXISTS bench_src")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows per insert (the collector's batch)")
    parser.add_argument("--inserts", type=int, default=4, help="inserts per table copy")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--merges", action="store_true",
                        help="instead: the cost of background merges by insert size (the schema as shipped, merges "
                             "running, --merge-total rows in inserts of each of --merge-blocks rows)")
    parser.add_argument("--settled", action="store_true",
                        help="instead: each index, view, codec and insert size with merges running, CPU until they "
                             "settle (--merge-total rows of the first workload chosen)")
    parser.add_argument("--merge-blocks", default="20000,50000,100000")
    parser.add_argument("--merge-total", type=int, default=600_000)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds without a merge that end a --merges run")
    args = parser.parse_args()
    if args.rows < 1 or args.inserts < 1:
        parser.error("--rows and --inserts must be at least 1")
    try:
        sizes = [int(x) for x in args.merge_blocks.split(",")]
    except ValueError:
        parser.error(f"--merge-blocks {args.merge_blocks!r}: expected numbers separated by commas")
    if args.merges and any(size < 1 or size % args.rows for size in sizes):
        parser.error(f"--merge-blocks: every size must be a multiple of --rows ({args.rows})")
    _, proc, client = start_store("tracetune-ingest-store-")
    try:
        blocks = workloads(client, args.rows)
        if args.merges:
            merges(client, proc.pid, blocks, args)
            return
        if args.settled:
            native, columns = blocks[WORKLOADS[0] if args.workload == "all" else args.workload]
            settled(client, proc.pid, native["Native"], columns, args)
            return
        names = list(WORKLOADS) if args.workload == "all" else [args.workload]
        plan = variants()
        results: dict[str, dict[str, Cost]] = {name: {} for name in names}
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("inserting", total=len(plan) * len(names))
            for workload in names:
                native, columns = blocks[workload]  # both formats
                for i, variant in enumerate(plan):
                    results[workload][variant.name] = measure(client, proc.pid, f"bench_cost_{i}", variant, native,
                                                              columns, args.rows, args.inserts)
                    bar.advance(task)
        report(plan, names, results, args)
    finally:
        stop_process(proc)


def merges(client, pid: int, blocks, args) -> None:
    sizes = [int(x) for x in args.merge_blocks.split(",")]
    table = Table(title=f"Store CPU per row with background merges: {args.merge_total:,} rows into the schema as "
                        f"shipped (every index and view), then until no merge runs for {args.settle:g} s")
    table.add_column("workload")
    table.add_column("rows per insert", justify="right")
    table.add_column("while inserting µs/row", justify="right")  # merges run meanwhile too
    table.add_column("until merges settle µs/row", justify="right")
    table.add_column("after the last insert µs/row", justify="right")
    table.add_column("parts left", justify="right")
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for workload in names:
        native, columns = blocks[workload]
        for size in sizes:
            inserted, total, parts = merge_cost(client, pid, native["Native"], columns, size, args.rows,
                                                args.merge_total, args.settle)
            table.add_row(workload, f"{size:,}", f"{inserted:.2f}", f"{total:.2f}", f"{total - inserted:.2f}",
                          str(parts))
    console.print(table)


def report(plan: list[Variant], names: list[str], results: dict[str, dict[str, Cost]], args) -> None:
    table = Table(title=f"Store CPU per inserted row: {args.inserts} Native inserts of {args.rows:,} rows per copy, "
                        "merges stopped (store process CPU; wall in brackets; otel_traces on disk)")
    table.add_column("otel_traces copy")
    for workload in names:
        table.add_column(f"{workload}: µs/row", justify="right")
        table.add_column("over its base", justify="right")
        table.add_column("B/row", justify="right")
    bare, shipped = plan[0].name, "as shipped, no view (every index)"
    everything = "as shipped: every index + every view"
    for variant in plan:
        cells = [variant.name]
        for workload in names:
            cost = results[workload][variant.name]
            base = bare if variant.indexes is not None and variant.indexes != set() and not variant.files else None
            if variant.files:
                base = shipped
            if variant.indexes is None and not variant.files:
                base = bare
            if variant.fmt != "Native" or variant.codec or not variant.alters:
                base = everything
            over = "" if base is None else f"{cost.cpu_us_per_row - results[workload][base].cpu_us_per_row:+.2f}"
            cells += [f"{cost.cpu_us_per_row:.2f} ({cost.wall_us_per_row:.1f})", over, f"{cost.bytes_per_row:.1f}"]
        table.add_row(*cells)
    console.print(table)


if __name__ == "__main__":
    main()

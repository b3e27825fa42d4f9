"""The cluster form of the schema: each migration statement rewritten for a ClickHouse cluster.

Spans and everything derived from them are sharded: a `<name>_local` table (Replicated*MergeTree, one
copy per replica of each shard) on every node, and a Distributed table with the original name over
them, so queries and inserts keep their table names. Materialized views run on each shard, from its
local source to its local target. Every other table (tuner, SLOs, alerts, prices, ...) is small and
read back by the component that wrote it: it is one Replicated table of which every node of the
cluster is a replica, so any node answers with all of it, and joins from sharded queries find it
locally. Nothing here talks to a server: these are pure functions of the statement's text.
"""

from __future__ import annotations

import re
from typing import Final

from tracetune.store.lexer import tokens, unquote

SHARDED: Final[dict[str, str]] = {
    "otel_traces": "cityHash64(TraceId)",
    "otel_traces_trace_id_ts": "cityHash64(TraceId)",
    "tracetune_spans_1m": "cityHash64(pipeline)",
    "tracetune_spans_1h": "cityHash64(pipeline)",
    "tracetune_task_errors_1m": "cityHash64(pipeline)",
    "tracetune_quarantine": "cityHash64(trace_id)",
    "tracetune_error_spans": "cityHash64(TraceId)",
}
"""Sharded tables and their Distributed sharding key. Spans go by trace, so a trace's spans (and its
quarantined spans) are on one shard; the views' targets are written on the shard of their source rows,
their key places only rows inserted into the Distributed table directly. Every key is deterministic,
so a retried insert reaches the same shard and is deduplicated there."""

LOCAL_SUFFIX: Final = "_local"
SHARDED_PATH: Final = "/clickhouse/tables/{shard}/{database}/{table}"
"""Keeper path of a sharded local table: one replica set per shard."""
SHARED_PATH: Final = "/clickhouse/tables/all/{database}/{table}"
"""Keeper path of a table every node holds whole: one replica set for the cluster."""
SHARDED_REPLICA: Final = "{replica}"
SHARED_REPLICA: Final = "{shard}-{replica}"
"""Replica name in the cluster-wide set: unique even where `{replica}` repeats across shards."""
DEDUP_WINDOW_SECONDS: Final = 7 * 24 * 3600
"""How long a replicated table remembers an insert's token (its default, 1 hour in recent servers, is
shorter than a collector outage the write-ahead log rides out)."""

_DEDUP = re.compile(r"\bnon_replicated_deduplication_window\s*=\s*(\d+)")
_COLUMN_COMMANDS = {"ADD", "DROP", "MODIFY", "RENAME", "CLEAR", "COMMENT", "MATERIALIZE"}


class ClusterFormError(ValueError):
    """A statement the cluster form does not know how to rewrite (so none is made up)."""


def local_name(table: str) -> str:
    """The name of a sharded table's local (per shard) part."""
    return table + LOCAL_SUFFIX


def cluster_statements(statement: str, cluster: str, database: str) -> list[str]:
    """The statements that do on `cluster` what `statement` does on one server (in `database`).

    CREATE TABLE of a sharded table: a Replicated `<name>_local` table and a Distributed `<name>`;
    of any other table: one Replicated table replicated to every node. CREATE MATERIALIZED VIEW: the
    view on every node, reading and writing local tables. ALTER TABLE and DROP: on the same tables;
    ALTER TABLE <view> MODIFY QUERY: the view's new SELECT, reading local tables.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cluster) or not re.fullmatch(r"[A-Za-z0-9_]+", database):
        raise ClusterFormError(f"cluster {cluster!r} / database {database!r}: letters, digits, _ (and - in a cluster)")
    text = _without_comments(statement)
    words = _Tokens(text)
    head = words.upper(0, 4)
    if head[:2] == ["CREATE", "TABLE"]:
        return _create_table(words, cluster, database)
    if head[:3] == ["CREATE", "MATERIALIZED", "VIEW"]:
        return [_create_view(words, cluster)]
    if head[:2] == ["ALTER", "TABLE"]:
        return _alter_table(words, cluster)
    if head[:1] == ["DROP"] and len(head) > 1 and head[1] in ("TABLE", "VIEW"):
        return _drop(words, cluster)
    raise ClusterFormError(f"no cluster form for a statement starting {' '.join(head)!r}: "
                           "extend store/cluster.py (and its tests) first")


# ---- the kinds of statement ---------------------------------------------------------------------

def _create_table(words: _Tokens, cluster: str, database: str) -> list[str]:
    at = 2
    if_not_exists = words.upper(at, 3) == ["IF", "NOT", "EXISTS"]
    at += 3 if if_not_exists else 0
    name, end = words.name(at)
    engine = words.find_top("ENGINE", end)
    if engine is None:
        raise ClusterFormError(f"CREATE TABLE {name}: no ENGINE clause to make Replicated")
    position = engine + 1 + (words.text_of(engine + 1) == "=")
    engine_name = words.text_of(position)
    args_start, args_end = position + 1, position + 1
    if words.text_of(position + 1) == "(":
        args_end = words.closing(position + 1) + 1
    sharded = name in SHARDED
    if engine_name.endswith("MergeTree") and not engine_name.startswith("Replicated"):
        inner = words.between(args_start, args_end).strip()[1:-1].strip() if args_end > args_start else ""
        path, replica = (SHARDED_PATH, SHARDED_REPLICA) if sharded else (SHARED_PATH, SHARED_REPLICA)
        args = ", ".join([_literal(path), _literal(replica), *([inner] if inner else [])])
        new_engine = f"Replicated{engine_name}({args})"
    elif sharded:
        raise ClusterFormError(f"CREATE TABLE {name}: a sharded table needs a MergeTree engine, not {engine_name}")
    else:
        new_engine = words.between(position, args_end)
    table = local_name(name) if sharded else name
    tail = words.after(args_end)
    created = (words.before(words.start(at)) + f"{_quote(table)} ON CLUSTER {_quote(cluster)} "
               + words.between(end, position) + new_engine.strip() + ("\n" + _dedup_settings(tail) if tail else ""))
    if not sharded:
        return [created]
    distributed = (f"CREATE TABLE {'IF NOT EXISTS ' if if_not_exists else ''}{_quote(name)} ON CLUSTER "
                   f"{_quote(cluster)} AS {_quote(table)}\nENGINE = Distributed({_literal(cluster)}, "
                   f"{_literal(database)}, {_literal(table)}, {SHARDED[name]})")
    return [created, distributed]


def _create_view(words: _Tokens, cluster: str) -> str:
    at = 3
    at += 3 if words.upper(at, 3) == ["IF", "NOT", "EXISTS"] else 0
    name, end = words.name(at)
    if words.upper(end, 1) != ["TO"]:
        raise ClusterFormError(f"materialized view {name}: only the `TO <table>` form has a cluster form "
                               "(an inner table would be neither Replicated nor sharded)")
    head = words.before(words.start(at)) + f"{_quote(name)} ON CLUSTER {_quote(cluster)} "
    return (head + _local_tables(words, end, to_at=end)).rstrip()


def _local_tables(words: _Tokens, start: int, to_at: int = -1) -> str:
    """The text from token `start` with each sharded table a view reads (`FROM`, `JOIN`), or writes (`TO`
    at token `to_at`), named by its `_local` part: a view on a shard reads and writes that shard's rows."""
    parts, cursor = [], start
    for i in range(start, len(words) - 1):
        keyword = words.upper(i, 1)[0]
        if keyword not in ("FROM", "JOIN") and not (keyword == "TO" and i == to_at):
            continue
        kind, token = words.kind(i + 1), words.text_of(i + 1)
        table = unquote(token.encode()).decode() if kind == "name" else token
        if kind in ("word", "name") and table in SHARDED and words.text_of(i + 2) not in (".", "("):
            parts += [words.between(cursor, i + 1), _quote(local_name(table)), words.gap(i + 1)]
            cursor = i + 2
    parts.append(words.after(cursor))
    return "".join(parts)


def _alter_table(words: _Tokens, cluster: str) -> list[str]:
    name, end = words.name(2)
    if words.upper(end, 2) == ["MODIFY", "QUERY"]:  # a materialized view's new SELECT, over the shard's tables
        if name in SHARDED:
            raise ClusterFormError(f"ALTER TABLE {name} MODIFY QUERY: {name} is a table, not a materialized view")
        return [f"ALTER TABLE {_quote(name)} ON CLUSTER {_quote(cluster)} {_local_tables(words, end).strip()}"]
    target = f"ALTER TABLE {{}} ON CLUSTER {_quote(cluster)} {_dedup_settings(words.after(end)).strip()}"
    if name not in SHARDED:
        return [target.format(_quote(name))]
    # Columns live in both tables; settings, indexes, keys and TTLs only in the local one.
    column = [words.upper(i, 2)[0] in _COLUMN_COMMANDS and words.upper(i, 2)[1] == "COLUMN"
              for i in words.commands(end)]
    if any(column) and not all(column):
        raise ClusterFormError(f"ALTER TABLE {name}: put column changes and other changes in separate statements")
    local = target.format(_quote(local_name(name)))
    return [local, target.format(_quote(name))] if all(column) else [local]


def _drop(words: _Tokens, cluster: str) -> list[str]:
    at = 2
    at += 2 if words.upper(at, 2) == ["IF", "EXISTS"] else 0
    name, end = words.name(at)
    rest = words.after(end)

    def drop(table: str) -> str:
        on_cluster = f"{_quote(table)} ON CLUSTER {_quote(cluster)}"
        return words.before(words.start(at)) + on_cluster + (" " + rest if rest else "")

    return [drop(name), drop(local_name(name))] if name in SHARDED else [drop(name)]


# ---- text helpers --------------------------------------------------------------------------------

class _Tokens:
    """A statement's tokens (store/lexer.py) with their places in its text."""

    def __init__(self, text: str):
        self.text = text
        raw = text.encode()
        self._tokens = [(kind, token.decode(), len(raw[:start].decode()), len(raw[:end].decode()))
                        for kind, token, start, end in tokens(raw)]

    def __len__(self) -> int:
        return len(self._tokens)

    def kind(self, i: int) -> str:
        return self._tokens[i][0] if i < len(self) else ""

    def text_of(self, i: int) -> str:
        return self._tokens[i][1] if i < len(self) else ""

    def upper(self, i: int, n: int) -> list[str]:
        found = [t[1].upper() if t[0] == "word" else t[1] for t in self._tokens[i:i + n]]
        return found + [""] * (n - len(found))

    def start(self, i: int) -> int:
        return self._tokens[i][2] if i < len(self) else len(self.text)

    def gap(self, i: int) -> str:
        """The space between token i and the next."""
        return self.text[self._tokens[i][3]:self.start(i + 1)]

    def before(self, position: int) -> str:
        return self.text[:position]

    def between(self, i: int, j: int) -> str:
        return self.text[self.start(i):self.start(j)]

    def after(self, i: int) -> str:
        return self.text[self.start(i):]

    def name(self, i: int) -> tuple[str, int]:
        """The bare table name at token i, and the index of the token after it."""
        kind, token = self.kind(i), self.text_of(i)
        if kind not in ("word", "name") or self.text_of(i + 1) == ".":
            raise ClusterFormError(f"expected an unqualified table name at {self.after(i)[:40]!r}")
        return (unquote(token.encode()).decode() if kind == "name" else token), i + 1

    def closing(self, i: int) -> int:
        depth = 0
        for j in range(i, len(self)):
            depth += {"(": 1, ")": -1}.get(self.text_of(j), 0) if self.kind(j) == "other" else 0
            if depth == 0:
                return j
        raise ClusterFormError(f"unbalanced parentheses in {self.text[:60]!r}")

    def commands(self, i: int) -> list[int]:
        """Where each command of a comma-separated list from token i starts (commas at depth 0)."""
        starts, depth = [i], 0
        for j in range(i, len(self)):
            if self.kind(j) == "other":
                depth += {"(": 1, ")": -1}.get(self.text_of(j), 0)
                if depth == 0 and self.text_of(j) == ",":
                    starts.append(j + 1)
        return starts

    def find_top(self, word: str, i: int) -> int | None:
        """The first token `word` at parenthesis depth 0 from token i."""
        depth = 0
        for j in range(i, len(self)):
            token = self.text_of(j)
            if self.kind(j) == "other":
                depth += {"(": 1, ")": -1}.get(token, 0)
            elif depth == 0 and self.kind(j) == "word" and token.upper() == word:
                return j
        return None


def _without_comments(statement: str) -> str:
    """The statement with its comments removed (a comment may name a setting or a table)."""
    raw = statement.encode()
    out, last = [], 0
    for _, _, start, end in tokens(raw):
        gap = raw[last:start]
        if last and gap.strip():  # a comment: keep only its line break
            gap = b"\n" if b"\n" in gap else b" "
        out.append(gap if last else b"")
        out.append(raw[start:end])
        last = end
    return b"".join(out).decode()


def _dedup_settings(text: str) -> str:
    """non_replicated_deduplication_window = N as the replicated table's window of N blocks (and a week)."""
    return _DEDUP.sub(lambda m: f"replicated_deduplication_window = {m.group(1)}, "
                                f"replicated_deduplication_window_seconds = {DEDUP_WINDOW_SECONDS}", text)


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else "`" + name.replace("`", "``") + "`"


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

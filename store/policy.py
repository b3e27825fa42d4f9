"""What each user may run on the embedded store: allow-lists over ClickHouse's own parse of a statement.

The engine is ClickHouse inside the store's process, so anything it may do (read a file, open a
connection, run a program) it does with the store's rights. Nothing is refused by looking for bad
names; everything is allowed by list, after the engine's parser (store/statements.py) said what the
statement is:
- statement kinds per user (`reader`: SELECT, SHOW, DESCRIBE, EXPLAIN, EXISTS, SET, USE; `default`
  adds INSERT, CREATE, ALTER, DROP, TRUNCATE, OPTIMIZE, RENAME, DELETE, CHECK, KILL and a few SYSTEM
  commands);
- table functions, table and database engines, dictionary sources and layouts;
- ordinary functions by the engine's own categories (system.functions), the uncategorised ones by name;
- settings (URL parameters, `SETTINGS` clauses, `SET`, insert settings, table settings) by type: a
  number, a flag or a choice can name no path, URL or program; a string setting passes only when
  reviewed by name (time zones, delimiters, comments); a few typed ones that grant rights or change how
  the text is parsed are refused by name (`REFUSED_SETTINGS`).
Anything else is refused with ClickHouse's code for it (ACCESS_DENIED, READONLY,
SETTING_CONSTRAINT_VIOLATION) and a message naming what was refused.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from tracetune.store.statements import Node, ParseError, Parser, Statement, tokens

READER_KINDS: frozenset[str] = frozenset({
    "SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "DescribeQuery", "Explain",
    "ExistsTableQuery", "ExistsDatabaseQuery", "ExistsDictionaryQuery", "ExistsViewQuery", "Set", "UseQuery",
})
"""Root nodes of `EXPLAIN AST` a reader may run (plus every SHOW: see `_is_show`)."""

WRITER_KINDS: frozenset[str] = READER_KINDS | {
    "InsertQuery", "CreateQuery", "AlterQuery", "DropQuery", "TruncateQuery", "OptimizeQuery", "Rename",
    "DeleteQuery", "CheckQuery", "SYSTEM", "KillQueryQuery",
}
"""What `default` may run: the reader's kinds and writes to tables, views, dictionaries and databases."""

CREATE_OBJECTS = (("TABLE",), ("VIEW",), ("MATERIALIZED", "VIEW"), ("DICTIONARY",), ("DATABASE",))
SYSTEM_COMMANDS = (
    ("FLUSH", "LOGS"), ("FLUSH", "ASYNC", "INSERT", "QUEUE"), ("DROP", "MARK", "CACHE"),
    ("DROP", "UNCOMPRESSED", "CACHE"), ("DROP", "QUERY", "CACHE"), ("DROP", "QUERY", "RESULT", "CACHE"),
    ("STOP", "MERGES"), ("START", "MERGES"), ("STOP", "TTL", "MERGES"), ("START", "TTL", "MERGES"),
    ("WAIT", "LOADING", "PARTS"),
)
"""`SYSTEM` commands `default` may run: flushes, caches and merges of its own tables."""

ALTER_COMMANDS: frozenset[str] = frozenset("""
ADD_COLUMN DROP_COLUMN MODIFY_COLUMN COMMENT_COLUMN RENAME_COLUMN CLEAR_COLUMN MATERIALIZE_COLUMN
MODIFY_ORDER_BY MODIFY_SAMPLE_BY REMOVE_SAMPLE_BY MODIFY_TTL REMOVE_TTL MATERIALIZE_TTL MODIFY_SETTING
RESET_SETTING MODIFY_QUERY MODIFY_COMMENT ADD_INDEX DROP_INDEX MATERIALIZE_INDEX CLEAR_INDEX ADD_PROJECTION
DROP_PROJECTION MATERIALIZE_PROJECTION CLEAR_PROJECTION ADD_CONSTRAINT DROP_CONSTRAINT ADD_STATISTICS
DROP_STATISTICS MODIFY_STATISTICS MATERIALIZE_STATISTICS DROP_PARTITION DROP_DETACHED_PARTITION
DETACH_PARTITION ATTACH_PARTITION REPLACE_PARTITION DELETE UPDATE APPLY_DELETED_MASK MODIFY_DATABASE_SETTING
""".split())
"""ALTER TABLE commands (their AlterCommand names); not FREEZE (host snapshots), FETCH or MOVE to disks."""

TABLE_FUNCTIONS: frozenset[str] = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "values", "generaterandom", "null", "view", "merge",
    "generate_series", "generateseries", "primes", "format", "dictionary", "loop", "mergetreeindex",
    "mergetreeprojection",
})
"""Table functions (lower case): generated rows, inline data and this store's own tables."""

TABLE_ENGINES: frozenset[str] = frozenset({
    "MergeTree", "ReplacingMergeTree", "SummingMergeTree", "AggregatingMergeTree", "CollapsingMergeTree",
    "VersionedCollapsingMergeTree", "CoalescingMergeTree", "GraphiteMergeTree", "Memory", "Null", "Buffer",
    "Set", "Join", "Log", "TinyLog", "StripeLog", "Merge", "Dictionary", "View", "MaterializedView",
    "GenerateRandom",
})
"""Table engines that keep data in the store's folder or in memory (Log family without a `disk`)."""

DATABASE_ENGINES: frozenset[str] = frozenset({"Atomic", "Ordinary", "Memory"})

DICTIONARY_SOURCES: Mapping[str, frozenset[str]] = {"CLICKHOUSE": frozenset({"TABLE", "DB", "UPDATE_FIELD",
                                                                             "UPDATE_LAG"})}
"""Dictionary sources and their keys: a table of this store (no HOST, USER, QUERY or WHERE text)."""

DICTIONARY_LAYOUTS: frozenset[str] = frozenset({
    "FLAT", "HASHED", "SPARSE_HASHED", "HASHED_ARRAY", "COMPLEX_KEY_HASHED", "COMPLEX_KEY_SPARSE_HASHED",
    "COMPLEX_KEY_HASHED_ARRAY", "RANGE_HASHED", "COMPLEX_KEY_RANGE_HASHED", "CACHE", "COMPLEX_KEY_CACHE",
    "DIRECT", "COMPLEX_KEY_DIRECT", "IP_TRIE",
})
"""Layouts in memory (not SSD_CACHE, which writes files where its PATH says)."""

FUNCTION_CATEGORIES: frozenset[str] = frozenset({
    "Aggregate Functions", "Type Conversion", "Dates and Times", "Arrays", "String", "Geo", "Hash",
    "String Search", "JSON", "Dictionary", "Mathematical", "URL", "Arithmetic", "Geo Polygon", "Map",
    "IP Address", "Comparison", "Tuple", "Time Series", "Distance", "Random Number", "Bitmap", "Bit",
    "Encoding", "UUID", "String Splitting", "String Replacement", "Null", "Rounding", "Time Window",
    "Encryption", "Conditional", "Logical", "Financial", "QBit", "NumericIndexedVector", "Embedded Dictionary",
})
"""Categories of system.functions whose functions compute on their arguments only."""

OTHER_FUNCTIONS: frozenset[str] = frozenset("""
blockSize bar currentQueryID MACStringToOUI MACStringToNum MACNumToString runningConcurrency lowCardinalityIndices
lowCardinalityKeys currentDatabase currentRoles currentUser authenticatedUser enabledRoles defaultRoles
currentProfiles enabledProfiles defaultProfiles currentSchemas parseTimeDelta isConstant digits countDigits
formatReadableDecimalSize formatReadableSize formatReadableTimeDelta formatReadableQuantity getTypeSerializationStreams
getSubcolumn queryID initialQueryID initialQueryStartTime errorCodeToName version revision buildId getSetting
getSettingOrDefault getMergeTreeSetting finalizeAggregation initializeAggregation identity materialize ignore
joinGet joinGetOrNull transform shardNum shardCount throwIf neighbor indexHint parseISO8601Duration
runningDifference runningDifferenceStartingWithFirstValue runningAccumulate isDecimalOverflow defaultValueOfArgumentType
defaultValueOfTypeName formatQuery formatQueryOrNull formatQuerySingleLine formatQuerySingleLineOrNull
normalizeQuery normalizeQueryKeepNames normalizedQueryHash normalizedQueryHashKeepNames tokenizeQuery highlightQuery
byteSize toTypeName toColumnTypeName dumpColumnStructure partitionId blockNumber visibleWidth rowNumberInBlock
rowNumberInAllBlocks variantElement variantType blockSerializedSize getSizeOfEnumType hasColumnInTable
minSampleSizeConversion minSampleSizeContinuous parseReadableSize parseReadableSizeOrNull parseReadableSizeOrZero
sleep sleepEachRow uptime timezone serverTimezone hostName FQDN displayName connectionId
colorSRGBToOKLCH colorOKLCHToSRGB colorSRGBToOKLAB colorOKLABToSRGB flipCoordinates generateRandomStructure
structureToCapnProtoSchema structureToProtobufSchema obfuscateQuery obfuscateQueryWithSeed
__getScalar __scalarSubqueryResult _CAST caseWithExpression nested validateNestedArraySizes __actionName
__bitWrapperFunc __bitSwapLastTwo __bitBoolMaskAnd __bitBoolMaskOr __groupingForGroupingSets __groupingForCube
__groupingForRollup __groupingOrdinary __applyFilter __toYearCalendarOnly
""".split())
"""Functions the engine files under `Other` (or `Internal`) that only compute or report on the query itself."""

REVIEWED_STRING_SETTINGS: frozenset[str] = frozenset({
    "session_timezone", "log_comment", "format_csv_null_representation", "format_tsv_null_representation",
    "format_custom_field_delimiter", "format_custom_row_before_delimiter", "format_custom_row_after_delimiter",
    "format_custom_row_between_delimiter", "format_custom_result_before_delimiter",
    "format_custom_result_after_delimiter", "format_regexp", "output_format_pretty_grid_charset",
    "input_format_orc_reader_time_zone_name", "output_format_orc_writer_time_zone_name",
    "format_json_object_each_row_column_for_object_name", "output_format_sql_insert_table_name",
    "insert_deduplication_token", "query_cache_tag", "count_distinct_implementation",
})
"""String-typed settings that hold data for a format, a time zone or a comment (never a path or URL)."""

REFUSED_SETTINGS: frozenset[str] = frozenset({
    "allow_introspection_functions", "allow_ddl", "dialect", "implicit_select", "max_query_size",
    "max_parser_depth", "max_parser_backtracks", "allow_settings_after_format_in_insert", "default_table_engine",
    "default_temporary_table_engine", "default_database_engine",
})
"""Settings of a path-free type that still widen a user's rights (introspection, DDL), change how the
engine parses the text it was checked as (dialect, implicit SELECT, parser limits), or pick an engine
the statement does not name (default engines)."""

_PRIVILEGED_SETTINGS = {"readonly": ("1", "2")}  # readonly may only be raised (to 1 or 2)

_TYPES_WITHOUT_PATHS_EXCLUDED = ("String", "Map", "URI")


class Refused(Exception):
    """A statement or setting the lock refuses: ClickHouse's code, name and the HTTP status it maps to."""

    def __init__(self, message: str, code: int = 497, name: str = "ACCESS_DENIED"):
        super().__init__(f"Code: {code}. DB::Exception: {message}. ({name})")
        self.code = code


@dataclass(frozen=True)
class Checked:
    """A statement that passed: the canonical text to run and its tree."""

    text: str
    statement: Statement


def _readonly(what: str) -> Refused:
    return Refused(f"{what}: Cannot execute query in readonly mode (the reader only reads)", 164, "READONLY")


class Lock:
    """The allow-lists, with the engine's own catalogue of functions and settings loaded once."""

    def __init__(self, parser: Parser, cache_size: int = 4096):
        self.parser = parser
        rows = parser.query("SELECT name, case_insensitive, alias_to, categories, is_aggregate FROM system.functions "
                            "FORMAT JSONCompactEachRow", fmt="JSONCompactEachRow")
        functions = [json.loads(line) for line in rows.splitlines() if line]
        category = {name: cat for name, _, alias, cat, _ in functions if not alias}
        self._functions: dict[str, bool] = {}
        self._aggregates: set[str] = set()
        for name, insensitive, alias, cat, aggregate in functions:
            target = alias or name
            allowed = category.get(target, cat) in FUNCTION_CATEGORIES or target in OTHER_FUNCTIONS \
                or name in OTHER_FUNCTIONS
            self._functions[name] = allowed
            if insensitive:
                self._functions.setdefault(name.lower(), allowed)
            if aggregate:
                self._aggregates.add(name)
        self._combinators = [c for c in parser.query("SELECT name FROM system.aggregate_function_combinators").split()]
        self._table_functions = {n.lower() for n in parser.query("SELECT name FROM system.table_functions").split()}
        self._engines = {n.lower() for n in parser.query("SELECT name FROM system.table_engines").split()}
        settings = parser.query("SELECT name, type FROM system.settings FORMAT JSONCompactEachRow",
                                fmt="JSONCompactEachRow")
        self._settings: dict[str, bool] = {}
        for line in settings.splitlines():
            name, kind = json.loads(line)
            self._settings[name] = _setting_allowed(name, kind)
        tables = parser.query("SELECT name, type FROM system.merge_tree_settings FORMAT JSONCompactEachRow",
                              fmt="JSONCompactEachRow")
        self._table_settings = {json.loads(line)[0] for line in tables.splitlines()
                                if json.loads(line)[1] not in _TYPES_WITHOUT_PATHS_EXCLUDED}
        self._cache: OrderedDict[tuple, Statement] = OrderedDict()
        self._cache_size = cache_size
        self._guard = threading.Lock()

    # ---- settings ---------------------------------------------------------------------------------
    def check_setting(self, name: str, value: str, table: bool = False) -> None:
        """Refuse a setting not on the list (URL parameter, SETTINGS clause, SET, table setting)."""
        if name in _PRIVILEGED_SETTINGS:
            if value.strip("'") not in _PRIVILEGED_SETTINGS[name]:
                raise Refused(f"Cannot modify '{name}' setting to {value}: it may only be raised (to "
                              f"{' or '.join(_PRIVILEGED_SETTINGS[name])})", 164, "READONLY")
            return
        if self._settings.get(name) or (table and name in self._table_settings):
            return
        if name not in self._settings and name not in self._table_settings:
            raise Refused(f"Unknown setting '{name}'", 115, "UNKNOWN_SETTING")
        raise Refused(f"Setting {name} should not be changed: the embedded store allows only settings that "
                      "name no file, URL, program or privilege", 452, "SETTING_CONSTRAINT_VIOLATION")

    def check_settings(self, settings: Mapping[str, str]) -> None:
        for name, value in settings.items():
            self.check_setting(name, value)

    # ---- statements -------------------------------------------------------------------------------
    def statement(self, text: str, params: Mapping[str, str] | None = None) -> Statement:
        """The statement as the engine's parser reads it, once its settings and output passed (cached)."""
        # Only names (`{t:Identifier}`) change the tree; other parameters are values, whatever they hold.
        key = (text, tuple(sorted((params or {}).items())) if "identifier" in text.lower() else ())
        with self._guard:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        canonical = self.parser.canonical(text)
        bare = Statement(canonical, (), tokens(canonical))
        self._before_tree(bare)
        statement = Statement(canonical, self.parser.explain(canonical, params), bare.tokens)
        with self._guard:
            self._cache[key] = statement
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return statement

    def _before_tree(self, statement: Statement) -> None:
        """What must hold before the engine is asked for the tree: no output file, every setting allowed."""
        words = [t.text.upper() if t.kind == "name" else t.text for t in statement.tokens]
        for i in range(len(words) - 1):
            if (words[i], words[i + 1]) in (("INTO", "OUTFILE"), ("FROM", "INFILE")):
                raise Refused(f"{words[i]} {words[i + 1]} is not allowed in the embedded store: it uses host files; "
                              "send data in the request body and read results from the response")
        table = words[:1] in (["CREATE"], ["ALTER"], ["ATTACH"], ["REPLACE"])
        for name, value in statement.settings():
            if "(" in value:
                raise Refused(f"Setting {name} = {value}: settings take literal values in the embedded store",
                              452, "SETTING_CONSTRAINT_VIOLATION")
            self.check_setting(name, value, table)

    def check(self, text: str, params: Mapping[str, str] | None, readonly: int) -> Checked:
        """The canonical text to run for `text`, or Refused / ParseError; `readonly` is the user's level."""
        statement = self.statement(text, params)
        self.check_tree(statement, readonly)
        return Checked(statement.text, statement)

    def check_insert(self, head: str, settings: str, fmt: str, params: Mapping[str, str] | None,
                     readonly: int) -> tuple[str, str]:
        """`INSERT INTO t (cols)` and its `SETTINGS ...` (data in the body): both canonical, or Refused."""
        checked = self.check(f"{head} FORMAT {fmt}", params, readonly)
        nodes = checked.statement.nodes
        suffix = f"FORMAT {fmt}"
        if nodes[0].kind != "InsertQuery" or not checked.text.endswith(suffix) or any(
                n.parent == 0 and n.kind not in ("Identifier", "ExpressionList") for n in nodes):
            raise Refused("An insert with a data body names a table and its columns only "
                          "(INSERT INTO t (a, b) [SETTINGS ...] FORMAT X)", 62, "SYNTAX_ERROR")
        statement = checked.text[:-len(suffix)].strip()
        if not settings:
            return statement, ""
        body = settings.strip()
        if body[:8].upper() != "SETTINGS":
            raise Refused(f"Expected SETTINGS before the insert's format, got {body[:40]!r}", 62, "SYNTAX_ERROR")
        assigned = self.check("SET " + body[8:], None, 2)
        if assigned.statement.kind != "Set":
            raise Refused("The insert's SETTINGS clause holds something other than settings", 62, "SYNTAX_ERROR")
        return statement, "SETTINGS " + assigned.text[len("SET "):]

    def check_structure(self, structure: str) -> str:
        """An external table's structure (`a UInt8, b String`): plain columns and types, in canonical form."""
        checked = self.check(f"CREATE TEMPORARY TABLE _external ({structure}) ENGINE = Memory", None, 0)
        nodes = checked.statement.nodes
        plain = {"DataType", "ExpressionList", "Literal", "NameTypePair", "Identifier"}
        for i, node in enumerate(nodes):
            parent = nodes[node.parent].kind if node.parent >= 0 else ""
            if parent == "ColumnDeclaration" and node.kind != "DataType":
                raise Refused(f"The structure of external data holds columns and types only, not {node.kind} "
                              f"({structure[:80]!r})", 36, "BAD_ARGUMENTS")
            if parent == "DataType" and node.kind not in plain or (node.kind == "Function" and i > 0):
                if not (node.kind == "Function" and nodes[node.parent].kind == "Storage"):
                    raise Refused(f"The structure of external data holds columns and types only ({structure[:80]!r})",
                                  36, "BAD_ARGUMENTS")
        if [n.kind for n in nodes if n.parent == 0] != ["Identifier", "Columns", "Storage"]:
            raise Refused(f"The structure of external data holds columns and types only ({structure[:80]!r})",
                          36, "BAD_ARGUMENTS")
        text = checked.text
        return text[text.index("(") + 1:text.rindex(")")].strip()

    def check_tree(self, statement: Statement, readonly: int) -> None:
        nodes = statement.nodes
        if not nodes:
            raise ParseError("Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)", 62)
        self._check_kind(statement, nodes[0], readonly)
        for i, node in enumerate(nodes):
            if node.kind == "Explain" and i + 1 < len(nodes) and nodes[i + 1].parent == i:
                inner = nodes[i + 1]
                if not _allowed_kind(inner.kind, readonly) or inner.kind in ("SYSTEM", "KillQueryQuery"):
                    raise Refused(f"EXPLAIN of {inner.kind} is not allowed in the embedded store")
            if node.kind == "AlterCommand":
                command = node.label.split(" ", 1)[0]
                if command not in ALTER_COMMANDS:
                    raise Refused(f"ALTER command {command} is not allowed in the embedded store (it reaches disks, "
                                  "backups or other servers)")
            if node.kind == "Function":
                self._check_function(statement, nodes, i)
            elif node.kind == "FunctionWithKeyValueArguments":
                parent = nodes[node.parent] if node.parent >= 0 else None
                if parent is None or (parent.kind, parent.label) != ("Dictionary", "definition"):
                    raise Refused(f"{node.label or node.name}(key value ...) is not allowed here in the embedded "
                                  "store")
                self._check_dictionary(statement)

    def _check_kind(self, statement: Statement, root: Node, readonly: int) -> None:
        kind = root.kind
        words = statement.words(6)
        if _is_show(kind, words):
            return
        if readonly and (kind == "InsertQuery" or (kind == "CreateQuery" and "TEMPORARY" in words[1:4])):
            return  # a session's temporary tables: the engine's readonly = 2 refuses any other target
        if not _allowed_kind(kind, readonly):
            if readonly and kind in WRITER_KINDS:
                raise _readonly(" ".join(words[:2]) or kind)
            raise Refused(f"{' '.join(words[:2]) or kind} is not allowed in the embedded store "
                          f"(statement kind {kind})")
        if kind == "CreateQuery":
            rest = [w for w in words[1:] if w not in ("OR", "REPLACE", "TEMPORARY", "IF", "NOT", "EXISTS")]
            if words[:1] != ["CREATE"] and words[:1] != ["REPLACE"] or not any(
                    tuple(rest[:len(obj)]) == obj for obj in CREATE_OBJECTS):
                raise Refused(f"{' '.join(words[:3])} is not allowed in the embedded store: CREATE makes tables, "
                              "views, materialized views, dictionaries and databases only")
        elif kind == "DropQuery" and words[:1] != ["DROP"]:
            raise Refused(f"{' '.join(words[:2])} is not allowed in the embedded store")
        elif kind == "AlterQuery" and words[:2] != ["ALTER", "TABLE"]:
            raise Refused(f"{' '.join(words[:2])} is not allowed in the embedded store: ALTER TABLE only")
        elif kind == "SYSTEM":
            command = tuple(words[1:])
            if not any(command[:len(allowed)] == allowed for allowed in SYSTEM_COMMANDS):
                raise Refused(f"SYSTEM {' '.join(words[1:4])} is not allowed in the embedded store (allowed: "
                              f"{', '.join(' '.join(c) for c in SYSTEM_COMMANDS)})")
        elif kind == "Rename" and words[:2] not in (["RENAME", "TABLE"], ["RENAME", "DICTIONARY"],
                                                     ["EXCHANGE", "TABLES"]):
            raise Refused(f"{' '.join(words[:2])} is not allowed in the embedded store")

    def _check_function(self, statement: Statement, nodes: tuple[Node, ...], i: int) -> None:
        node = nodes[i]
        name = node.name
        parent = nodes[node.parent] if node.parent >= 0 else None
        parent_kind = parent.kind if parent else ""
        if parent is not None and (parent.kind, parent.label) == ("Storage", "definition") and \
                node.parent + 1 == i:  # the first child of a storage definition: an engine
            database = "DATABASE" in statement.words(2)[1:2]
            allowed = DATABASE_ENGINES if database else TABLE_ENGINES
            if name in allowed:
                return
            if name.lower() in self._engines or name in self._engines or name not in self._functions:
                raise Refused(f"{'Database' if database else 'Table'} engine {name} is not allowed in the embedded "
                              f"store (allowed: {', '.join(sorted(allowed))})")
        if parent_kind in ("TableExpression", "InsertQuery", "CreateQuery", "DescribeQuery", "Explain",
                           "BackupQuery"):
            if name.lower() not in TABLE_FUNCTIONS:
                raise Refused(f"Table function {name}() is not allowed in the embedded store: it reads or writes "
                              "host files, runs programs or opens connections (allowed: "
                              f"{', '.join(sorted(TABLE_FUNCTIONS))})")
            return
        self.check_function_name(name)

    def check_function_name(self, name: str) -> None:
        """An ordinary function: allowed by the engine's category for it, or by name."""
        allowed = self._function_allowed(name)
        lower = name.lower()
        if allowed is False or (allowed is None and (lower in self._table_functions or lower in self._engines)
                                and lower not in TABLE_FUNCTIONS):
            raise Refused(f"Function {name}() is not allowed in the embedded store: it reaches the host, "
                          "the network or the engine's internals")

    def _function_allowed(self, name: str) -> bool | None:
        """True/False for a function the engine knows, None for one it does not (the engine refuses those)."""
        for key in (name, name.lower()):
            if key in self._functions:
                return self._functions[key]
        for combinator in self._combinators:  # sumIf, uniqStateIf, quantilesMerge, ...
            if name.endswith(combinator) and len(name) > len(combinator):
                base = self._function_allowed(name[:-len(combinator)])
                if base is not None:
                    return base
        return None

    def _check_dictionary(self, statement: Statement) -> None:
        """SOURCE(CLICKHOUSE(TABLE ... DB ...)) and an in-memory LAYOUT, read from the canonical text."""
        tokens = statement.tokens
        for i, token in enumerate(tokens[:-3]):
            word = token.text.upper() if token.kind == "name" else ""
            if word not in ("SOURCE", "LAYOUT") or tokens[i + 1].text != "(" or tokens[i + 2].kind != "name":
                continue
            kind = tokens[i + 2].text.upper()
            if word == "LAYOUT":
                if kind not in DICTIONARY_LAYOUTS:
                    raise Refused(f"Dictionary layout {kind} is not allowed in the embedded store (allowed: "
                                  f"{', '.join(sorted(DICTIONARY_LAYOUTS))})")
                continue
            keys = DICTIONARY_SOURCES.get(kind)
            if keys is None:
                raise Refused(f"Dictionary source {kind} is not allowed in the embedded store: dictionaries read "
                              "tables of this store (SOURCE(CLICKHOUSE(TABLE 'name')))")
            j, depth = i + 3, 0
            while j < len(tokens):
                t = tokens[j]
                if t.text == "(":
                    depth += 1
                elif t.text == ")":
                    depth -= 1
                    if depth <= 0:
                        break
                elif depth == 1 and t.kind == "name" and t.text.upper() not in keys:
                    raise Refused(f"Dictionary source key {t.text.upper()} is not allowed in the embedded store "
                                  f"(allowed: {', '.join(sorted(keys))})")
                elif depth == 1 and t.kind == "name":
                    j += 1  # its value
                j += 1


def _setting_allowed(name: str, kind: str) -> bool:
    """A number, flag or choice cannot name a path, URL or program; strings pass only when reviewed."""
    if name in REVIEWED_STRING_SETTINGS:
        return True
    return kind not in _TYPES_WITHOUT_PATHS_EXCLUDED and name not in REFUSED_SETTINGS


def _allowed_kind(kind: str, readonly: int) -> bool:
    return kind in (READER_KINDS if readonly else WRITER_KINDS)


def _is_show(kind: str, words: list[str]) -> bool:
    """Every SHOW statement only reads (tables, columns, settings, processes, grants of the engine)."""
    return words[:1] == ["SHOW"] and (kind.startswith("Show") or kind == "SHOW")


__all__ = ["Lock", "Refused", "Checked", "ParseError"]

"""What a statement is, as ClickHouse's own parser reads it.

Every statement is read twice by the engine's parser, neither time executing it:
- `SELECT formatQuery({text:String})` turns the text (a query parameter, so it is data, never SQL) into
  ClickHouse's canonical form: one statement, no comments, no heredocs, every string and name quoted one
  way. The parser's own syntax error (multi-statements included) is the answer for text that does not
  parse. The canonical text is what the engine then runs, so what was checked is what runs.
- `EXPLAIN AST <canonical text>` gives the tree: the statement's kind and every function in its place
  (table function, table engine, dictionary source or ordinary function).

What the tree does not show (the settings of a `SETTINGS` clause, a `SYSTEM` command, the keys of a
dictionary source) is read from the canonical text with a tokenizer for that one regular form
(`tokens`); text that is not in that form is refused rather than guessed at.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import chdb


class ParseError(Exception):
    """The engine's parser refused the text: its code and message, as ClickHouse answers them."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Node:
    """One line of `EXPLAIN AST`: the node's id (`Function file`, `TableExpression`, ...) and its parent."""

    kind: str  # the first word of the id: Function, Identifier, TableExpression, ...
    label: str  # the rest of the id without `(children N)`: a function's name, a query's table, ...
    parent: int  # index of the parent node, -1 for the root

    @property
    def name(self) -> str:
        """A function's or identifier's name: the label up to its alias."""
        return self.label.split(" (alias ", 1)[0]


@dataclass(frozen=True)
class Token:
    kind: str  # string, name (a name, quoted or not), number, param, op
    text: str  # a name unquoted; a string literal as written in the canonical text


@dataclass(frozen=True)
class Statement:
    """One statement: its canonical text, its tree and the tokens of its canonical text."""

    text: str
    nodes: tuple[Node, ...]
    tokens: tuple[Token, ...]

    @property
    def kind(self) -> str:
        return self.nodes[0].kind if self.nodes else ""

    def words(self, count: int, start: int = 0) -> list[str]:
        """The first `count` names of the canonical text from `start`, upper case: `SYSTEM FLUSH LOGS`."""
        return [t.text.upper() for t in self.tokens[start:start + count] if t.kind == "name"]

    def settings(self) -> list[tuple[str, str]]:
        """(name, value) of every setting the statement changes: `SETTINGS` clauses (queries, tables,
        dictionaries), `MODIFY SETTING` and a `SET` statement."""
        found: list[tuple[str, str]] = []
        tokens = self.tokens
        for i, token in enumerate(tokens):
            word = token.text.upper() if token.kind == "name" else ""
            if word in ("SETTINGS", "SETTING") or (i == 0 and word == "SET"):
                found.extend(_assignments(tokens, i + 1))
        return found


# ---- the canonical text's tokens ------------------------------------------------------------------
# formatQuery writes strings as '...' and names as `...` (backslash escapes in both), never comments,
# heredocs or double-quoted names; anything else in its output means this reading is wrong: refuse.
_CANONICAL = re.compile(
    r"""(?P<string>'(?:[^'\\]|\\.)*')"""
    r"""|(?P<quoted>`(?:[^`\\]|\\.)*`)"""
    r"""|(?P<space>\s+)"""
    r"""|(?P<param>\{[A-Za-z_][A-Za-z0-9_]*:[^{}]*\})"""
    r"""|(?P<number>(?:0[xX][0-9A-Fa-f]+|0[bB][01]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![A-Za-z_]))"""
    r"""|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"""
    r"""|(?P<unexpected>--|/\*|\*/|\$|\#|")"""
    r"""|(?P<op>->|<=|>=|!=|<>|==|\|\||::|.)""",
    re.DOTALL,
)
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "b": "\b", "f": "\f", "a": "\a", "v": "\v", "e": "\x1b"}


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    if code[0] == "x" and len(code) == 3:
        return chr(int(code[1:], 16))
    return _ESCAPES.get(code, code)


def tokens(canonical: str) -> tuple[Token, ...]:
    """The tokens of ClickHouse's canonical form of a statement; ParseError for text not in that form."""
    out = []
    for match in _CANONICAL.finditer(canonical):
        kind = match.lastgroup
        text = match.group()
        if kind == "space":
            continue
        if kind == "unexpected":
            raise ParseError(f"Code: 62. DB::Exception: The canonical form of the statement holds {text!r} outside "
                             "a string; the embedded store refuses a statement it cannot read. (SYNTAX_ERROR)", 62)
        if kind == "quoted":
            name = _ESCAPE.sub(_unescape, text[1:-1])
            if any(ord(c) < 32 or ord(c) == 127 for c in name):  # a line break would forge lines of the tree
                raise ParseError("Code: 62. DB::Exception: Names with control characters are refused by the "
                                 f"embedded store: {text}. (SYNTAX_ERROR)", 62)
            out.append(Token("name", name))
        else:
            out.append(Token(kind, text))
    return tuple(out)


def _assignments(tokens: tuple[Token, ...], i: int) -> list[tuple[str, str]]:
    """`name = value, ...` from token i (after `SETTINGS`, also as `SETTINGS(...)`); [] if none there.

    A value is one literal: a string, a number (with its sign), a name (true, NULL) or a bracketed
    literal; a call such as `disk(...)` keeps its parenthesis, so the caller sees it is not a literal."""
    found = []
    if i < len(tokens) and tokens[i].text == "(":
        i += 1
    while i + 2 < len(tokens) and tokens[i].kind == "name" and tokens[i + 1].text == "=":
        name, j = tokens[i].text, i + 2
        value = [tokens[j]]
        if tokens[j].text in ("-", "+") and j + 1 < len(tokens):
            j += 1
            value.append(tokens[j])
        if value[-1].text in ("[", "(", "{") or (j + 1 < len(tokens) and tokens[j + 1].text == "("):
            depth = 0
            while j < len(tokens):  # the whole bracketed value (or call), to its closing bracket
                t = tokens[j]
                if t is not value[-1]:
                    value.append(t)
                depth += t.text in ("[", "(", "{")
                depth -= t.text in ("]", ")", "}")
                if depth == 0 and t.text in ("]", ")", "}"):
                    break
                j += 1
        found.append((name, "".join(v.text for v in value)))
        if j + 1 < len(tokens) and tokens[j + 1].text == ",":
            i = j + 2
        else:
            break
    return found


# ---- the tree ---------------------------------------------------------------------------------------
_CHILDREN = re.compile(r" \(children (\d+)\)$")


def tree(explained: str) -> tuple[Node, ...]:
    """`EXPLAIN AST` output as nodes; ParseError if its shape is not a tree (indents and child counts agree)."""
    nodes: list[Node] = []
    declared: list[int] = []
    stack: list[int] = []  # node index at each depth
    for line in explained.split("\n"):
        if not line:
            continue
        body = line.lstrip(" ")
        depth = len(line) - len(body)
        if depth > len(stack) or (depth == 0 and nodes):
            raise ParseError("Code: 62. DB::Exception: The engine's tree of the statement could not be read "
                             "(SYNTAX_ERROR)", 62)
        del stack[depth:]
        match = _CHILDREN.search(body)
        declared.append(int(match.group(1)) if match else 0)
        if match:
            body = body[:match.start()]
        kind, _, label = body.partition(" ")
        nodes.append(Node(kind, label.strip(), stack[-1] if stack else -1))
        stack.append(len(nodes) - 1)
    counts = [0] * len(nodes)
    for node in nodes:
        if node.parent >= 0:
            counts[node.parent] += 1
    if counts != declared:
        raise ParseError("Code: 62. DB::Exception: The engine's tree of the statement could not be read "
                         "(SYNTAX_ERROR)", 62)
    return tuple(nodes)


# ---- the parser -----------------------------------------------------------------------------------------
def _param_value(text: str) -> str:
    """A string as a ClickHouse query parameter value (the escaped format: backslash, tab, line breaks)."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\0", "\\0"))


def _surrogates_to_escapes(text: str) -> str:
    """Bytes that are not UTF-8 (kept as surrogates) as `\\xNN` escapes the parameter format reads back."""
    return re.sub(r"[\udc80-\udcff]", lambda m: "\\x%02x" % (ord(m.group()) - 0xDC00), text)


_CODE = re.compile(r"Code:\s*(\d+)")
_SCOPE = re.compile(r" ?: In scope SELECT formatQuery\(.*\)\. (\([A-Z_]+\))\s*$", re.DOTALL)


def _clean(message: str) -> str:
    start = message.find("Code: ")
    message = message[start if start > 0 else 0:]
    message = re.sub(r"(Code: \d+\. DB::Exception: )(?:Code: \d+\. DB::Exception: )+", r"\1", message)
    return _SCOPE.sub(r" \1", message).strip()


class Parser:
    """ClickHouse's parser, run by the engine on connections of its own (one per thread)."""

    def __init__(self, data_dir: str):
        self._data_dir = data_dir
        self._local = threading.local()

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = chdb.connect(self._data_dir)
        return conn

    def query(self, sql: str, params: Mapping[str, str] | None = None, fmt: str = "TabSeparatedRaw") -> str:
        """Run one of the parser's own fixed statements (never user text outside a parameter)."""
        try:
            return self._conn().query(sql, fmt, params=dict(params or {})).bytes().decode("utf-8", "surrogateescape")
        except RuntimeError as exc:
            message = _clean(str(exc))
            match = _CODE.search(message)
            raise ParseError(message, int(match.group(1)) if match else 62) from None

    def canonical(self, text: str) -> str:
        """ClickHouse's canonical form of one statement, or its syntax error."""
        value = _param_value(_surrogates_to_escapes(text))
        return self.query("SELECT formatQuery({text:String})", {"text": value}).rstrip("\n")

    def explain(self, canonical: str, params: Mapping[str, str] | None = None) -> tuple[Node, ...]:
        """The tree of a canonical statement (`EXPLAIN AST`); query parameters fill `{name:Type}`.

        Only for canonical text already checked (one statement, no output file, settings allowed): the
        EXPLAIN takes over a statement's `SETTINGS`, `FORMAT` and `INTO OUTFILE`."""
        used = {k: v for k, v in (params or {}).items() if "{" + k + ":" in canonical}
        return tree(self.query("EXPLAIN AST " + canonical, used))

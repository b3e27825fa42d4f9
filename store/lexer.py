"""Enough of ClickHouse's lexer to split a request and to rewrite the store's own DDL.

It finds where an insert's data begins in a request body and the parts of the shipped migrations it
rewrites (store/cluster.py, store/migrations.py). It never decides what may run: that is ClickHouse's
own parser and the allow-lists (store/statements.py, store/policy.py), so a text it misreads is
still checked whole by the engine's parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_TOKEN = re.compile(
    rb"""(?P<string>'(?:[^'\\]|\\.|'')*')"""
    rb"""|(?P<name>"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)"""
    rb"""|(?P<comment>--[^\n]*|\#[ !][^\n]*|/\*.*?\*/)"""
    rb"""|(?P<space>\s+)"""
    rb"""|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"""
    rb"""|(?P<other>.)""",
    re.DOTALL,
)


def tokens(text: bytes) -> Iterator[tuple[str, bytes, int, int]]:
    """(kind, token, start, end) of every token but spaces and comments.

    kind is `string`, `name` (a quoted name), `word` (a keyword or bare name) or `other`.
    """
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "other"
        if kind not in ("space", "comment"):
            yield kind, match.group(), match.start(), match.end()


def unquote(token: bytes) -> bytes:
    """The name inside a quoted name token."""
    quote = token[:1]
    return token[1:-1].replace(quote * 2, quote).replace(b"\\" + quote, quote)

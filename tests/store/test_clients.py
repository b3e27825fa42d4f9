"""Real clients still work through the lock: tracetune's own SQL and clickhouse-connect's statements pass.

The corpus: every migration statement, every SQL file and SQL string constant of the components that
query the store (analyzer, dashboard, tuner, collector, store), and the statements clickhouse-connect
itself sends (string constants of the installed package). A property test (hypothesis) sends each one
in random layouts (line breaks, tabs, comments, nested comments between its tokens): the lock must
allow it for the user who runs it (reads as `reader`, the rest as `default`) and never refuse it.
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

import clickhouse_connect
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracetune import store
from tracetune.store.policy import Lock, Refused
from tracetune.store.statements import _CANONICAL, ParseError, Parser

ROOT = Path(__file__).resolve().parents[2]
_STATEMENT = re.compile(r"^\s*(?:--[^\n]*\n\s*)*(SELECT|WITH|INSERT|CREATE|ALTER|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN|"
                        r"OPTIMIZE|SYSTEM|KILL|DROP|TRUNCATE|RENAME|SET|DELETE)\b", re.IGNORECASE)
_READS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "SET"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a Python format field (not {name:Type})


def _constants(folder: Path) -> list[str]:
    """String constants of a package that read as SQL statements (Python format fields filled with a name)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _STATEMENT.match(node.value) \
                    and len(node.value) > 12 and (" " in node.value.strip()):
                found.append(node.value)
    return found


def _fill(text: str) -> str:
    return _PLACEHOLDER.sub("x", text)


def corpus() -> list[tuple[str, str]]:
    """(origin, statement) for the whole corpus."""
    items = [("migration", statement) for _, statement in store.schema_statements()]
    for folder in ("analyzer", "dashboard", "tuner", "collector", "store"):
        items += [(f"{folder}/*.sql", _fill(p.read_text())) for p in sorted((ROOT / folder).rglob("*.sql"))
                  if folder != "store"]
        items += [(f"{folder} constant", _fill(text)) for text in _constants(ROOT / folder)]
    items += [("clickhouse-connect", _fill(text)) for text in _constants(Path(clickhouse_connect.__file__).parent)]
    seen, unique = set(), []
    for origin, text in items:
        if text not in seen:
            seen.add(text)
            unique.append((origin, text))
    return unique


CORPUS = corpus()


@pytest.fixture(scope="module")
def lock(tmp_path_factory) -> Lock:
    return Lock(Parser(str(tmp_path_factory.mktemp("lock-engine"))))


def _user(text: str) -> int:
    first = _STATEMENT.match(text).group(1).upper()
    return 2 if first in _READS else 0


def _allowed(lock: Lock, text: str, readonly: int) -> bool:
    """True if the lock allows it; False if the engine's parser refuses the text itself (a fragment)."""
    try:
        lock.check(text, None, readonly)
    except ParseError as exc:
        assert "embedded store" not in str(exc), (text, str(exc))  # the lock's own reading never fails
        return False
    return True


def test_the_corpus_is_large_and_the_lock_allows_all_of_it(lock):
    allowed, refused = 0, []
    for origin, text in CORPUS:
        try:
            allowed += _allowed(lock, text, _user(text))
        except Refused as exc:
            refused.append((origin, text[:200], str(exc)))
    assert refused == []
    # Most of the corpus is whole statements (the rest are fragments joined at run time).
    assert allowed >= 60, allowed


def _layout(text: str, rng: random.Random) -> str:
    """The same statement with its whitespace replaced by random blanks and comments (strings untouched)."""
    separators = [" ", "\n", "\t", "  \n\t", " /* x */ ", " /* /* nested */ */ ", " -- note\n", "\r\n"]
    return "".join(rng.choice(separators) if m.lastgroup == "space" else m.group() for m in _CANONICAL.finditer(text))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(min_value=0, max_value=len(CORPUS) - 1), seed=st.integers(0, 2**32 - 1))
def test_any_layout_of_a_real_statement_passes(lock, index, seed):
    _, text = CORPUS[index]
    try:
        canonical = lock.parser.canonical(text)
    except ParseError:
        return  # a fragment, not a statement
    disguised = _layout(canonical, random.Random(seed))
    readonly = _user(text)
    _allowed(lock, disguised, readonly)  # raises Refused if the lock refused it
    if readonly:  # what the reader may run, the writer may run too
        _allowed(lock, disguised, 0)

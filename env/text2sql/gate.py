"""Static gate: parse a prediction, allow only read-only queries, transpile.

The gate is an allow-list over sqlglot node types, because deny-lists miss
what hides: ``VACUUM`` and ``REPLACE INTO`` parse as ``Command``, a
data-modifying CTE sits under a SELECT root, ``load_extension()`` is a
function call inside a SELECT. It is one layer of several: the backends'
sandboxes enforce the same rules at run time.
"""

from __future__ import annotations

import logging
from collections import Counter

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from .backends.base import QueryFailed
from .verdict import Verdict

# sqlglot warns on every statement it falls back to parsing as a Command;
# those are refused here anyway, so the warning is noise.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

_ALLOWED_NODES: tuple[type[exp.Expr], ...] = (
    exp.Query, exp.With, exp.CTE, exp.RecursiveWithSearch, exp.From, exp.Join, exp.Where,
    exp.Group, exp.Having, exp.Qualify, exp.Order, exp.Ordered, exp.Limit, exp.Offset,
    exp.Fetch, exp.Distinct, exp.Table, exp.TableAlias, exp.Alias, exp.Column, exp.Identifier,
    exp.Star, exp.Literal, exp.Null, exp.Boolean, exp.HexString, exp.Var, exp.DataType,
    exp.DataTypeParam, exp.Interval, exp.IntervalSpan, exp.Tuple, exp.Values, exp.Window,
    exp.WindowSpec, exp.Filter, exp.WithinGroup, exp.Bracket, exp.Lateral, exp.Pivot,
    exp.Func, exp.Binary, exp.Unary, exp.Predicate,
)

_DENIED_FUNCTIONS = frozenset({
    # SQLite: code loading, unbounded formatting (ignores the step budget).
    "load_extension", "printf", "format", "readfile", "writefile", "edit", "fts3_tokenizer",
    # Sleeping, lock holding and CPU burning on the servers.
    "sleep", "pg_sleep", "pg_sleep_for", "pg_sleep_until", "benchmark", "get_lock", "release_lock",
    # Files, settings and other sessions.
    "load_file", "set_config", "current_setting", "query_to_xml", "query_to_xml_and_xmlschema",
    "cursor_to_xml", "table_to_xml", "database_to_xml",
})
_DENIED_PREFIXES = ("pg_", "lo_", "dblink")


def parse_query(sql: str, dialect: str) -> exp.Query:
    """Parse ``sql`` as exactly one read-only query, or raise :class:`QueryFailed`."""
    try:
        statements = [tree for tree in sqlglot.parse(sql, read=dialect) if tree is not None]
    except (ParseError, TokenError) as error:
        raise QueryFailed(Verdict.SYNTAX_ERROR, _first_line(str(error))) from None
    except RecursionError:
        raise QueryFailed(Verdict.RESOURCE_LIMIT, "query is nested too deeply to parse") from None
    if not statements:
        raise QueryFailed(Verdict.INVALID, "no SQL statement found")
    if len(statements) > 1:
        raise QueryFailed(Verdict.FORBIDDEN, f"expected one statement, found {len(statements)}")
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        raise QueryFailed(Verdict.FORBIDDEN, f"only queries are allowed, not {tree.key.upper()}")
    for node in tree.walk():
        _check_node(node)
    return tree


def _check_node(node: exp.Expr) -> None:
    if not isinstance(node, _ALLOWED_NODES):
        raise QueryFailed(Verdict.FORBIDDEN, f"{node.key.upper()} is not allowed in a query")
    if isinstance(node, exp.Func):
        name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
        if name in _DENIED_FUNCTIONS or name.startswith(_DENIED_PREFIXES):
            raise QueryFailed(Verdict.FORBIDDEN, f"function {name}() is not allowed")


def to_dialect(tree: exp.Expr, dialect: str) -> str:
    """Render a parsed query for the backend's engine."""
    try:
        return tree.sql(dialect=dialect)
    except (sqlglot.errors.UnsupportedError, ValueError) as error:
        raise QueryFailed(Verdict.SYNTAX_ERROR, f"cannot translate to {dialect}: {_first_line(str(error))}") from None


def translate_script(script: str, source: str, target: str) -> str:
    """Translate a schema script (DDL and INSERTs) between dialects.

    A script that cannot be translated makes its example unusable, so the
    failure is a gold error, never the model's fault.
    """
    try:
        statements = sqlglot.transpile(script, read=source, write=target)
    except (ParseError, TokenError, sqlglot.errors.UnsupportedError) as error:
        raise QueryFailed(Verdict.GOLD_ERROR, f"schema cannot be translated to {target}: {_first_line(str(error))}") from None
    return ";\n".join(statements) + ";"


def is_ordered(tree: exp.Expr) -> bool:
    """Whether row order is part of the answer: the outermost query has ORDER BY."""
    while isinstance(tree, exp.Subquery):
        tree = tree.this
    return bool(tree.args.get("order"))


def referenced_names(tree: exp.Expr) -> set[str]:
    """Tables and columns a query touches, for schema-linking credit."""
    tables = {f"table:{t.name.lower()}" for t in tree.find_all(exp.Table)}
    columns = {f"column:{c.name.lower()}" for c in tree.find_all(exp.Column) if c.name}
    return tables | columns


def node_bag(tree: exp.Expr) -> Counter[str]:
    """A bag of node types with their names: a cheap structural fingerprint."""
    return Counter(f"{node.key}:{node.name.lower() if isinstance(node.name, str) else ''}" for node in tree.walk())


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "invalid SQL"

"""Random databases that respect a schema: the raw material of a test suite.

A generated database keeps the original's tables, column types, primary and
unique keys, NOT NULL columns and foreign keys (a child row always points at
a parent row that exists), and draws its values from the original rows plus
the gold query's constants and their neighbours, so that every boundary the
gold tests (``price > 194``) has rows on both sides of it. NULL appears only
in columns that hold NULL in the original: a database unlike any the schema
would really hold would fail equivalent rewrites (``IN`` against a join), not
only wrong queries.
"""

from __future__ import annotations

import random
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from .neighbours import COMPARISONS, SHIFTS, compared_column

Value = int | float | str | bytes | None
POOL_ROWS = 200
"""Distinct values read per column of the original: enough variety, bounded cost on big databases."""


@dataclass
class ColumnInfo:
    name: str
    affinity: str
    """``integer``, ``real``, ``text`` or ``blob``, by SQLite's affinity rules on the declared type."""
    not_null: bool
    """No NULL in the original: none in a generated database either."""
    pool: list[Value] = field(default_factory=list)
    """The original's values."""
    constants: list[Value] = field(default_factory=list)
    """The gold's constants that meet this column, and their neighbours: drawn as often as the whole pool."""


@dataclass
class TableInfo:
    name: str
    columns: list[ColumnInfo]
    unique: list[tuple[int, ...]]
    """Column positions of each primary or unique key."""
    foreign: list[tuple[tuple[int, ...], str, tuple[str, ...]]]
    """(child column positions, parent table, parent column names) of each foreign key."""


def introspect(connection: sqlite3.Connection) -> list[TableInfo]:
    """The tables of a database, parents before children, with keys and value pools."""
    names = [row[0] for row in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
    tables = {name: _table(connection, name) for name in names}
    return _parents_first(tables)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table(connection: sqlite3.Connection, name: str) -> TableInfo:
    info = connection.execute(f"PRAGMA table_info({_quote(name)})").fetchall()
    columns = [ColumnInfo(row[1], _affinity(row[2] or ""), True) for row in info]
    position = {column.name.lower(): index for index, column in enumerate(columns)}
    unique = []
    primary = tuple(index for index, row in sorted(enumerate(info), key=lambda item: item[1][5]) if row[5])
    if primary:
        unique.append(primary)
    for index_row in connection.execute(f"PRAGMA index_list({_quote(name)})").fetchall():
        if index_row[2]:  # unique
            parts = connection.execute(f"PRAGMA index_info({_quote(index_row[1])})").fetchall()
            key = tuple(position[part[2].lower()] for part in parts if part[2] is not None)
            if key and key not in unique:
                unique.append(key)
    foreign: dict[int, list] = defaultdict(list)
    for row in connection.execute(f"PRAGMA foreign_key_list({_quote(name)})").fetchall():
        foreign[row[0]].append(row)
    links = []
    for rows in foreign.values():
        rows.sort(key=lambda row: row[1])
        parent = rows[0][2]
        if any(row[3].lower() not in position for row in rows):
            continue
        links.append((tuple(position[row[3].lower()] for row in rows), parent, tuple(row[4] or "" for row in rows)))
    for column in columns:
        column.pool = [row[0] for row in connection.execute(
            f"SELECT DISTINCT {_quote(column.name)} FROM {_quote(name)} LIMIT {POOL_ROWS}")]
        column.not_null = None not in column.pool  # NULL only where the original has it
    return TableInfo(name, columns, unique, links)


def _affinity(declared: str) -> str:
    """SQLite's column affinity rules (section 3.1 of its datatype page), numeric folded into real."""
    upper = declared.upper()
    if "INT" in upper:
        return "integer"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if "BLOB" in upper or not upper:
        return "blob"
    return "real"


def _parents_first(tables: dict[str, TableInfo]) -> list[TableInfo]:
    ordered: list[TableInfo] = []
    done: set[str] = set()
    lower = {name.lower(): name for name in tables}

    def visit(name: str, path: frozenset[str]) -> None:
        if name in done or name in path:
            return
        for _, parent, _ in tables[name].foreign:
            if parent.lower() in lower:
                visit(lower[parent.lower()], path | {name})
        done.add(name)
        ordered.append(tables[name])

    for name in tables:
        visit(name, frozenset())
    return ordered


def add_constants(tables: Sequence[TableInfo], gold_sqlite: str) -> None:
    """Put the gold's constants and their neighbours in the pools of the columns they meet.

    A number comes with itself shifted by :data:`SHIFTS`; a string with a
    value just below and one just above it in text order.

    A constant compared with a named column goes to that column; any other
    one to every column of its kind.
    """
    try:
        tokens = sqlglot.tokenize(gold_sqlite, read="sqlite")
    except SqlglotError:
        return
    by_name: dict[str, list[ColumnInfo]] = defaultdict(list)
    for table in tables:
        for column in table.columns:
            by_name[column.name.lower()].append(column)
    for index, token in enumerate(tokens):
        if token.token_type not in (TokenType.NUMBER, TokenType.STRING):
            continue
        values = _with_neighbours(token.text) if token.token_type is TokenType.NUMBER else _text_neighbours(token.text)
        named = _named_column(tokens, index)
        targets = by_name.get(named, []) if named else []
        if not targets:
            wanted = ("text",) if token.token_type is TokenType.STRING else ("integer", "real")
            targets = [column for table in tables for column in table.columns if column.affinity in wanted]
        for column in targets:
            for value in values:
                value = _fit(value, column.affinity)
                if value is not None and value not in column.constants:
                    column.constants.append(value)


def _named_column(tokens: list, index: int) -> str | None:
    """The column a constant is compared with: ``col op c``, ``c op col``, or an aggregate of it, ``SUM(t.col) op c``."""
    named = compared_column(tokens, index)
    if named is None and index >= 4 and tokens[index - 1].token_type in COMPARISONS:
        closing, column = tokens[index - 2], tokens[index - 3]
        if closing.token_type is TokenType.R_PAREN and column.token_type in (TokenType.VAR, TokenType.IDENTIFIER):
            return column.text.lower()
    return named


def _with_neighbours(text: str) -> list[Value]:
    try:
        value: int | float = int(text) if text.isdigit() else float(text)
    except ValueError:
        return []
    return [value] + [value + sign * shift for shift in SHIFTS for sign in (-1, 1)]


def _text_neighbours(text: str) -> list[Value]:
    """A string constant and values just below and just above it, for ``<`` and ``>`` against ``=``."""
    return [text, text[:-1], f"{text}a"] if len(text) > 1 else [text, f"{text}a"]


def _fit(value: Value, affinity: str) -> Value:
    """A constant as the column would store it, or None when it cannot be one of its values."""
    if affinity == "integer":
        return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else None
    if affinity == "real":
        return float(value) if isinstance(value, (int, float)) else None
    if affinity == "text":
        return value if isinstance(value, str) else None
    return value


def random_rows(tables: Sequence[TableInfo], rng: random.Random, max_rows: int) -> dict[str, list[tuple]]:
    """Rows for every table, parents first, that keep the keys and foreign keys of the schema.

    Values are drawn a column at a time (one call to the generator per column,
    not per cell: a suite tries dozens of databases per gold), then foreign
    keys are pointed at parent rows and rows that repeat a key are dropped.
    """
    generated: dict[str, list[tuple]] = {}
    names = {table.name.lower(): table for table in tables}
    for table in tables:
        single = {key[0] for key in table.unique if len(key) == 1}
        keyed = {i for key in table.unique for i in key}
        pools = [_keys(column, max_rows) if i in keyed else _few(column, rng) for i, column in enumerate(table.columns)]
        size = min([rng.randint(1, max_rows)] + [len(pools[i]) for i in single])
        columns = [rng.sample(pool, size) if i in single else _draw(column, pool, size, rng)
                   for i, (column, pool) in enumerate(zip(table.columns, pools))]
        rows = [list(row) for row in zip(*columns)] if columns else []
        for positions, parent_name, parent_columns in table.foreign:
            parent = names.get(parent_name.lower())
            targets = _parent_positions(parent, parent_columns) if parent else None
            if targets is not None:
                rows = _link(rows, positions, targets, generated.get(parent.name, []) if parent is not table else None, rng)
        generated[table.name] = _unique(rows, table.unique)
    return generated


def _keys(column: ColumnInfo, count: int) -> list[Value]:
    """A key column's values: the gold's constants, the original's, and for an integer key fresh integers past them."""
    values = list(dict.fromkeys(column.constants + [v for v in column.pool if v is not None]))
    if column.affinity == "integer":
        top = max((v for v in values if isinstance(v, int)), default=0)
        values += range(top + 1, top + 1 + count)
    return values


def _few(column: ColumnInfo, rng: random.Random) -> list[Value]:
    """A handful of a column's values, for one database: repeats make ties, groups of every size, and rows at an average."""
    pool = column.pool or _FALLBACK.get(column.affinity, [None])
    count = rng.choice((1, 2, 3, 5, len(pool)))
    return rng.sample(pool, min(count, len(pool)))


_FALLBACK: dict[str, list[Value]] = {"integer": list(range(10)), "real": [i + 0.5 for i in range(10)], "text": [f"v{i}" for i in range(10)]}
"""Values for a column the original leaves empty."""


def _draw(column: ColumnInfo, pool: list[Value], size: int, rng: random.Random) -> list[Value]:
    """``size`` values, from the gold's constants half the time (boundaries need rows on them), else from ``pool``."""
    if not column.constants:
        return rng.choices(pool, k=size)
    weights = [0.5 / len(column.constants)] * len(column.constants) + [0.5 / len(pool)] * len(pool)
    return rng.choices(column.constants + pool, weights=weights, k=size)


def _link(rows: list[list], positions: tuple[int, ...], targets: tuple[int, ...], parents: list[tuple] | None,
          rng: random.Random) -> list[list]:
    """Point a foreign key of every row at an existing parent row (``parents`` None: the table itself).

    A row of a self-referencing table points at itself or an earlier row,
    so the rows can be inserted in order on servers that check each one.
    """
    if parents is None:
        for number, row in enumerate(rows):
            chosen = rows[rng.randrange(number + 1)]
            for i, j in zip(positions, targets):
                row[i] = chosen[j]
        return rows
    if not parents:
        return []
    for row, chosen in zip(rows, rng.choices(parents, k=len(rows))):
        for i, j in zip(positions, targets):
            row[i] = chosen[j]
    return rows


def _unique(rows: list[list], keys: list[tuple[int, ...]]) -> list[tuple]:
    """The rows, without those that repeat a key or leave part of one NULL."""
    kept, seen = [], [set() for _ in keys]
    for row in rows:
        values = [tuple(row[i] for i in key) for key in keys]
        if any(value in taken or None in value for value, taken in zip(values, seen)):
            continue
        for value, taken in zip(values, seen):
            taken.add(value)
        kept.append(tuple(row))
    return kept


def _parent_positions(parent: TableInfo, columns: tuple[str, ...]) -> tuple[int, ...] | None:
    if not any(columns):  # REFERENCES parent with no columns: its primary key
        return parent.unique[0] if parent.unique else None
    lower = [column.name.lower() for column in parent.columns]
    try:
        return tuple(lower.index(name.lower()) for name in columns)
    except ValueError:
        return None


def build(ddl: Iterable[str], tables: Sequence[TableInfo], rows: Mapping[str, list[tuple]]) -> sqlite3.Connection:
    """An in-memory SQLite database with the schema's statements and these rows.

    Small pages keep its serialized image (what a suite keeps) a few KB.
    """
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.execute("PRAGMA page_size = 512")
    for statement in ddl:
        connection.execute(statement)
    for table in tables:
        marks = ", ".join("?" * len(table.columns))
        connection.executemany(f"INSERT INTO {_quote(table.name)} VALUES ({marks})", rows[table.name])
    return connection


def script(ddl: Iterable[str], dialect: str, tables: Sequence[TableInfo], rows: Mapping[str, list[tuple]]) -> str:
    """The same database as a schema script in ``dialect``: what every backend builds an example from.

    Each value's literal is rendered by sqlglot once (values repeat across
    rows and databases), and statements are joined as text: rendering whole
    INSERT trees cost more than the rest of a suite's distillation.
    """
    statements = [statement.rstrip().rstrip(";") for statement in ddl]
    for table in tables:
        if rows[table.name]:
            prefix = _insert_into(table.name, tuple(column.name for column in table.columns), dialect)
            values = ", ".join("(" + ", ".join(_literal(value, dialect) for value in row) + ")" for row in rows[table.name])
            statements.append(f"{prefix} VALUES {values}")
    return ";\n".join(statements) + ";\n"


@lru_cache(maxsize=4096)
def _insert_into(table: str, columns: tuple[str, ...], dialect: str) -> str:
    quoted = ", ".join(exp.to_identifier(column, quoted=True).sql(dialect=dialect) for column in columns)
    return f"INSERT INTO {exp.to_identifier(table, quoted=True).sql(dialect=dialect)} ({quoted})"


@lru_cache(maxsize=65_536, typed=True)  # typed: 1 and 1.0 are one key otherwise
def _literal(value: Value, dialect: str) -> str:
    if isinstance(value, bytes):
        return exp.HexString(this=value.hex()).sql(dialect=dialect)
    return exp.convert(value).sql(dialect=dialect)

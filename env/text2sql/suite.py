"""Test suites: the databases a prediction must match the gold on, all of them.

On one small database a wrong query often returns the right rows (``quantity
>= 4`` and ``quantity <= 10`` agree when every quantity lies between them),
so the verdict compares on a suite (Zhong, Yu and Klein, EMNLP 2020): the
example's own database plus a few generated ones, distilled from many random
candidates so that together they tell the gold apart from its neighbour
queries (:mod:`.neighbours`). Distillation runs in SQLite, whatever backend
scores; the suite it keeps is a list of schema scripts, which every backend
builds like any other example's.

A suite is a deterministic function of the example's schema and gold (and the
options): the random candidates are seeded by them alone, so loaded datasets,
generated ones and single ``score`` calls all get the same suite.
"""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from . import fuzz
from .backends import Limits, QueryFailed, schema_key
from .backends.sqlite import StepBudget, run_sandboxed, sandbox
from .compare import results_match
from .example import Example
from .gate import is_ordered, translate_script
from .neighbours import Neighbour, neighbour_queries
from .prompts import create_statements


@dataclass(frozen=True)
class SuiteOptions:
    """How a suite is built; the defaults are what every study's objective uses.

    ``size`` counts databases, the example's own included. ``candidates`` is
    the fuzzing effort: random databases tried per gold before the best are
    kept (fewer are tried when the first ones already tell every neighbour
    apart). ``max_rows`` caps each table of a generated database: small
    databases are quick, and put few rows near each boundary a query tests.
    """

    size: int = 4
    candidates: int = 24
    max_rows: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("SuiteOptions.size must be at least 1 (the example's own database)")
        if self.candidates < 0 or self.max_rows < 1:
            raise ValueError("SuiteOptions.candidates must be at least 0 and max_rows at least 1")


WEAK_SHARE = 0.5
"""A gold is weak when its suite cannot tell it apart from more than this share of its neighbours."""


@dataclass(frozen=True)
class Suite:
    """The databases of one (schema, gold), the original first, and how well they tell its neighbours apart."""

    databases: tuple[Example, ...]
    neighbours: int
    """Neighbours of the gold that run on the original database."""
    undistinguished: tuple[str, ...]
    """Those that return the gold's rows on every database of the suite."""
    images: tuple[bytes, ...] = ()
    """SQLite images of the generated databases (``databases[1:]``), the very ones distilled on.

    The SQLite backend opens these instead of running their scripts: a
    database opened from its image answers its first query in about a third
    of the time that running its script takes.
    """

    @property
    def weak(self) -> bool:
        return self.neighbours > 0 and len(self.undistinguished) > WEAK_SHARE * self.neighbours


@dataclass
class _Database:
    connection: sqlite3.Connection
    budget: StepBudget


def build_suite(example: Example, options: SuiteOptions | None = None, limits: Limits | None = None) -> Suite:
    """The example's test suite; just its own database when the schema or gold cannot be fuzzed."""
    options = options or SuiteOptions()
    limits = limits or Limits()
    alone = Suite((example,), 0, ())
    if options.size == 1:
        return alone
    try:
        original, ddl, script_ddl, script_dialect = _original(example)
    except (sqlite3.Error, QueryFailed, SqlglotError, OSError):
        return alone
    try:
        return _distil(example, options, limits, original, ddl, script_ddl, script_dialect) or alone
    finally:
        original.close()


Statements = list[tuple[str | None, str]]
"""DDL statements, each with the table it creates or indexes (lower case; None for a view or one not understood)."""


def _original(example: Example) -> tuple[sqlite3.Connection, Statements, Statements, str]:
    """The example's database in SQLite, its DDL in SQLite, and the DDL generated scripts start from (and their dialect)."""
    if example.database:
        path = Path(example.database).resolve()
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None)
    else:
        connection = sqlite3.connect(":memory:", isolation_level=None)
        script = example.schema if example.dialect == "sqlite" else translate_script(example.schema, example.dialect, "sqlite")
        connection.executescript(script)
    ddl = [(None if kind == "view" else table.lower(), sql) for kind, table, sql in connection.execute(
        "SELECT type, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
    if example.database:
        return connection, ddl, ddl, "sqlite"
    return connection, ddl, [(_created_table(sql, example.dialect), sql) for sql in create_statements(example.schema)], example.dialect


@lru_cache(maxsize=4096)
def _created_table(statement: str, dialect: str) -> str | None:
    """The table a CREATE TABLE statement creates; None for a view or a statement sqlglot cannot read."""
    try:
        tree = sqlglot.parse_one(statement, read=dialect)
    except SqlglotError:
        return None
    table = tree.find(exp.Table) if isinstance(tree, exp.Create) and tree.kind == "TABLE" else None
    return table.name.lower() if table is not None else None


def _tables_needed(tree: exp.Expr, tables: list[fuzz.TableInfo], ddl: Statements, script_ddl: Statements) -> list[fuzz.TableInfo]:
    """The tables the gold reads and, through foreign keys, the parents of those: all a generated database needs.

    A prediction that reads another table cannot mean the same as the gold
    (joining a parent along its foreign key can, so parents stay). Fewer
    tables make each candidate quicker to fill, and each suite database
    quicker to open: its schema is parsed whenever it is. With a view in the
    schema, or DDL that cannot be read, every table stays.
    """
    if any(table is None for table, _ in ddl + script_ddl):
        return tables
    by_name = {table.name.lower(): table for table in tables}
    wanted = {table.name.lower() for table in tree.find_all(exp.Table)} & by_name.keys()
    if not wanted:
        return tables
    unseen = list(wanted)
    while unseen:
        for _, parent, _ in by_name[unseen.pop()].foreign:
            if parent.lower() in by_name and parent.lower() not in wanted:
                wanted.add(parent.lower())
                unseen.append(parent.lower())
    return [table for table in tables if table.name.lower() in wanted]


def _distil(example: Example, options: SuiteOptions, limits: Limits, original: sqlite3.Connection,
            ddl: Statements, script_ddl: Statements, script_dialect: str) -> Suite | None:
    gold = _sqlite_gold(example)
    tree = sqlglot.parse_one(gold, read="sqlite")
    ordered = is_ordered(tree)
    every_table = fuzz.introspect(original)
    base = _Database(original, sandbox(original, limits))
    gold_rows = _rows(base, gold, limits)
    if gold_rows is None:
        return None
    valid, remaining = 0, []
    for neighbour in _neighbours(gold, every_table):
        rows = _rows(base, neighbour.sql, limits)
        if rows is None:
            continue
        valid += 1
        if results_match(gold_rows, rows, ordered=ordered):
            remaining.append(neighbour.sql)
    tables = _tables_needed(tree, every_table, ddl, script_ddl)
    kept = {table.name.lower() for table in tables}
    ddl = [sql for table, sql in ddl if table in kept]
    script_ddl = [sql for table, sql in script_ddl if table in kept]
    fuzz.add_constants(tables, gold)
    rng = random.Random(f"{options.seed}\0{schema_key(example)}\0{example.gold}")
    candidates: list[_Candidate] = []
    covered: set[int] = set()
    for _ in range(options.candidates):
        if len(candidates) >= options.size - 1 and len(covered) == len(remaining):
            break
        rows_by_table = fuzz.random_rows(tables, rng, options.max_rows)
        candidate = _candidate(ddl, tables, rows_by_table, gold, ordered, remaining, limits)
        if candidate is not None:
            candidates.append(candidate)
            covered |= candidate.coverage
    chosen = _greedy([candidate.coverage for candidate in candidates], len(remaining), options.size - 1)
    uncovered = set(range(len(remaining))).difference(*(candidates[i].coverage for i in chosen))
    databases = [example] + [
        dataclasses.replace(example, schema=fuzz.script(script_ddl, script_dialect, tables, candidates[i].rows),
                            dialect=script_dialect, database=None)
        for i in chosen
    ]
    return Suite(tuple(databases), valid, tuple(remaining[i] for i in sorted(uncovered)),
                 tuple(candidates[i].image for i in chosen))


def example_neighbours(example: Example) -> list[Neighbour]:
    """The gold's neighbour queries in SQLite, with swapped columns and text values from the example's database.

    What each suite is distilled against, for scripts that measure how many of them a verdict still accepts.
    """
    try:
        original, _, _, _ = _original(example)
    except (sqlite3.Error, QueryFailed, SqlglotError, OSError):
        return []
    try:
        gold = _sqlite_gold(example)
        return _neighbours(gold, fuzz.introspect(original))
    except (sqlite3.Error, SqlglotError):
        return []
    finally:
        original.close()


def _sqlite_gold(example: Example) -> str:
    return example.gold if example.dialect == "sqlite" else sqlglot.transpile(example.gold, read=example.dialect, write="sqlite")[0]


def _neighbours(gold: str, tables: list[fuzz.TableInfo]) -> list[Neighbour]:
    columns = {table.name.lower(): [column.name for column in table.columns] for table in tables}
    text_values = {column.name.lower(): [v for v in column.pool if isinstance(v, str)] for table in tables for column in table.columns}
    return neighbour_queries(gold, "sqlite", columns=columns, text_values=text_values)


@dataclass(frozen=True)
class _Candidate:
    rows: dict
    coverage: set[int]
    """Indexes of the remaining neighbours it tells apart from the gold."""
    image: bytes


def _candidate(ddl: list[str], tables: list[fuzz.TableInfo], rows_by_table: dict, gold: str, ordered: bool,
               remaining: list[str], limits: Limits) -> _Candidate | None:
    """A random database and which remaining neighbours it tells apart; None when it cannot serve.

    A candidate serves when the gold runs on it and its answer does not hang
    on the order rows happen to be stored in: ties under ORDER BY ... LIMIT, or
    a bare column of a GROUP BY, would fail an equivalent prediction that
    breaks the tie another way. SQLite's ``reverse_unordered_selects`` finds
    them: the gold must give the same answer with scans reversed.
    """
    try:
        connection = fuzz.build(ddl, tables, rows_by_table)
    except sqlite3.Error:
        return None
    try:
        image = connection.serialize()
        connection.execute("PRAGMA reverse_unordered_selects = 1")
        backward = _rows(_Database(connection, sandbox(connection, limits)), gold, limits)
        connection.set_authorizer(None)
        connection.execute("PRAGMA reverse_unordered_selects = 0")
        database = _Database(connection, sandbox(connection, limits))
        gold_rows = _rows(database, gold, limits)
        if gold_rows is None or backward is None or not results_match(gold_rows, backward, ordered=ordered):
            return None
        coverage = set()
        for index, sql in enumerate(remaining):
            rows = _rows(database, sql, limits)
            if rows is None or not results_match(gold_rows, rows, ordered=ordered):
                coverage.add(index)
        return _Candidate(rows_by_table, coverage, image)
    finally:
        connection.close()


def _rows(database: _Database, sql: str, limits: Limits) -> list | None:
    """The query's rows, or None when it fails or runs past the limits."""
    try:
        return run_sandboxed(database.connection, database.budget, sql, limits.max_rows)
    except QueryFailed:
        return None


def _greedy(coverages: list[set[int]], total: int, room: int) -> list[int]:
    """Indexes of up to ``room`` candidates: most new neighbours told apart first, then the earliest others."""
    chosen: list[int] = []
    uncovered = set(range(total))
    while len(chosen) < room and uncovered:
        best = max((i for i in range(len(coverages)) if i not in chosen),
                   key=lambda i: (len(coverages[i] & uncovered), -i), default=None)
        if best is None or not coverages[best] & uncovered:
            break
        chosen.append(best)
        uncovered -= coverages[best]
    chosen += [i for i in range(len(coverages)) if i not in chosen][: room - len(chosen)]
    return chosen

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
from pathlib import Path

import sqlglot
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


def _original(example: Example) -> tuple[sqlite3.Connection, list[str], list[str], str]:
    """The example's database in SQLite, its DDL in SQLite, and the DDL generated scripts start from (and their dialect)."""
    if example.database:
        path = Path(example.database).resolve()
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None)
    else:
        connection = sqlite3.connect(":memory:", isolation_level=None)
        script = example.schema if example.dialect == "sqlite" else translate_script(example.schema, example.dialect, "sqlite")
        connection.executescript(script)
    ddl = [row[0] for row in connection.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
    if example.database:
        return connection, ddl, ddl, "sqlite"
    return connection, ddl, create_statements(example.schema), example.dialect


def _distil(example: Example, options: SuiteOptions, limits: Limits, original: sqlite3.Connection,
            ddl: list[str], script_ddl: list[str], script_dialect: str) -> Suite | None:
    gold = _sqlite_gold(example)
    ordered = is_ordered(sqlglot.parse_one(gold, read="sqlite"))
    tables = fuzz.introspect(original)
    base = _Database(original, sandbox(original, limits))
    gold_rows = _rows(base, gold, limits)
    if gold_rows is None:
        return None
    valid, remaining = 0, []
    for neighbour in _neighbours(gold, tables):
        rows = _rows(base, neighbour.sql, limits)
        if rows is None:
            continue
        valid += 1
        if results_match(gold_rows, rows, ordered=ordered):
            remaining.append(neighbour.sql)
    fuzz.add_constants(tables, gold)
    rng = random.Random(f"{options.seed}\0{schema_key(example)}\0{example.gold}")
    candidates: list[tuple[dict, set[int]]] = []
    covered: set[int] = set()
    for _ in range(options.candidates):
        if len(candidates) >= options.size - 1 and len(covered) == len(remaining):
            break
        rows_by_table = fuzz.random_rows(tables, rng, options.max_rows)
        coverage = _coverage(ddl, tables, rows_by_table, gold, ordered, remaining, limits)
        if coverage is not None:
            candidates.append((rows_by_table, coverage))
            covered |= coverage
    chosen = _greedy(candidates, len(remaining), options.size - 1)
    uncovered = set(range(len(remaining))).difference(*(candidates[i][1] for i in chosen))
    databases = [example] + [
        dataclasses.replace(example, schema=fuzz.script(script_ddl, script_dialect, tables, candidates[i][0]),
                            dialect=script_dialect, database=None)
        for i in chosen
    ]
    return Suite(tuple(databases), valid, tuple(remaining[i] for i in sorted(uncovered)))


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


def _coverage(ddl: list[str], tables: list[fuzz.TableInfo], rows_by_table: dict, gold: str, ordered: bool,
              remaining: list[str], limits: Limits) -> set[int] | None:
    """Which remaining neighbours a candidate database tells apart; None when it cannot serve.

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
        return coverage
    finally:
        connection.close()


def _rows(database: _Database, sql: str, limits: Limits) -> list | None:
    """The query's rows, or None when it fails or runs past the limits."""
    try:
        return run_sandboxed(database.connection, database.budget, sql, limits.max_rows)
    except QueryFailed:
        return None


def _greedy(candidates: list[tuple[dict, set[int]]], total: int, room: int) -> list[int]:
    """Indexes of up to ``room`` candidates: most new neighbours told apart first, then the earliest others."""
    chosen: list[int] = []
    uncovered = set(range(total))
    while len(chosen) < room and uncovered:
        best = max((i for i in range(len(candidates)) if i not in chosen),
                   key=lambda i: (len(candidates[i][1] & uncovered), -i), default=None)
        if best is None or not candidates[best][1] & uncovered:
            break
        chosen.append(best)
        uncovered -= candidates[best][1]
    chosen += [i for i in range(len(candidates)) if i not in chosen][: room - len(chosen)]
    return chosen

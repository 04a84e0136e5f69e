"""Model-like predictions with known outcomes, for benchmarks and demos of the scorer.

A prediction is the gold query, edited or not, dressed the way a model writes
it: in a ```sql fence, after a line of prose or a ``<think>`` section, with a
trailing semicolon, lower-case keywords or line breaks. Its kind says what
the edit was meant to do:

- ``correct``: the gold query itself, only dressed;
- ``near_miss``: one small change (a literal, a dropped condition, LIMIT off
  by one, MIN for MAX or the sort flipped, a projected column swapped for
  another of its table);
- ``wrong``: a query over a table the gold does not use;
- ``non_executing``: a misspelled column, an unknown table, or a syntax error.

The kind is the intent, not a verdict: a near miss can still return the gold
rows (a dropped condition that filtered nothing), so scorers are compared on
the same predictions rather than against these labels.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from ..example import Example
from ..prompts import create_statements

MIX: dict[str, float] = {"correct": 0.4, "near_miss": 0.3, "wrong": 0.1, "non_executing": 0.2}
"""How often :func:`perturb` makes each kind when it is not told which."""

PREDICTION_KINDS: tuple[str, ...] = tuple(MIX)

_WRAPPERS = (
    "{sql}",
    "```sql\n{sql}\n```",
    "Here is the query:\n\n```sql\n{sql}\n```",
    "<think>\nI need to find the table that holds this and filter it.\n</think>\n\n```sql\n{sql}\n```",
    "SQL query:\n{sql}",
    "```sql\n{sql}\n```\n\nThis query returns the requested rows.",
)
_LINE_BREAK_BEFORE = {
    TokenType.FROM, TokenType.WHERE, TokenType.GROUP_BY, TokenType.HAVING, TokenType.ORDER_BY, TokenType.LIMIT,
}
_CUT_AFTER = {
    TokenType.SELECT, TokenType.FROM, TokenType.WHERE, TokenType.JOIN, TokenType.ON, TokenType.AND,
    TokenType.GROUP_BY, TokenType.ORDER_BY, TokenType.EQ, TokenType.GT, TokenType.LT, TokenType.COMMA,
}


class Prediction(NamedTuple):
    """A model-like output for ``example``, and the kind of mistake it was made to have."""

    example: Example
    kind: str
    text: str


class _Table(NamedTuple):
    name: str
    columns: list[str]


_Change = Callable[[exp.Expression, dict[str, _Table], random.Random], bool]
"""An edit of a parse in place; it returns whether it found something to edit."""


@dataclass(frozen=True)
class _Gold:
    """The gold query, its parse (None when sqlglot cannot parse it) and the schema's tables by lower-cased name."""

    sql: str
    dialect: str
    tree: exp.Expression | None
    tables: dict[str, _Table]

    def edit(self, change: _Change, rng: random.Random) -> str | None:
        """The gold query with ``change`` applied to a copy of its parse, or None when it did not apply."""
        if self.tree is None:
            return None
        tree = self.tree.copy()
        return tree.sql(dialect=self.dialect) if change(tree, self.tables, rng) else None


def perturb(example: Example, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """One prediction for ``example`` as (kind, model text); the kind is drawn from :data:`MIX` unless given.

    A near miss asked of a query with nothing to edit comes back as "wrong".
    """
    if kind is None:
        kind = rng.choices(PREDICTION_KINDS, weights=list(MIX.values()))[0]
    if kind not in MIX:
        raise ValueError(f"unknown prediction kind {kind!r}; choose from {', '.join(PREDICTION_KINDS)}")
    dialect = example.dialect
    gold = _Gold(example.gold, dialect, _parse(example.gold, dialect), _tables(example.schema, dialect))
    sql = _MAKERS[kind](gold, rng)
    if sql is None:
        kind, sql = "wrong", _wrong(gold, rng)
    return kind, _dress(sql, dialect, rng)


def perturbed_predictions(examples: Iterable[Example], seed: int = 0, per_example: int = 4) -> list[Prediction]:
    """``per_example`` predictions for each example (like a GRPO group of completions), kinds drawn from :data:`MIX`."""
    rng = random.Random(seed)
    return [Prediction(example, *perturb(example, rng)) for example in examples for _ in range(per_example)]


@lru_cache(maxsize=4096)
def _parse(sql: str, dialect: str) -> exp.Expression | None:
    try:
        return sqlglot.parse_one(sql, read=dialect)
    except SqlglotError:
        return None


@lru_cache(maxsize=256)
def _tables(schema: str, dialect: str) -> dict[str, _Table]:
    tables = {}
    for statement in create_statements(schema):
        tree = _parse(statement, dialect)
        if isinstance(tree, exp.Create) and isinstance(tree.this, exp.Schema):  # a view has no column list
            name = tree.this.this.name
            columns = [column.name for column in tree.this.expressions if isinstance(column, exp.ColumnDef)]
            tables[name.lower()] = _Table(name, columns)
    return tables


# Dress


def _dress(sql: str, dialect: str, rng: random.Random) -> str:
    sql = _restyle(sql.strip().rstrip(";").rstrip(), dialect, rng)
    if rng.random() < 0.5:
        sql += ";"
    return rng.choice(_WRAPPERS).format(sql=sql)


def _restyle(sql: str, dialect: str, rng: random.Random) -> str:
    """The same query with keyword case and line breaks changed: identifiers and literals keep their text."""
    try:
        tokens = sqlglot.tokenize(sql, read=dialect)
    except SqlglotError:
        return sql
    lower, breaks = rng.random() < 0.4, rng.random() < 0.4
    pieces, end = [], 0
    for token in tokens:
        gap, text = sql[end : token.start], sql[token.start : token.end + 1]
        if breaks and gap.isspace() and token.token_type in _LINE_BREAK_BEFORE:
            gap = "\n"
        if lower and token.token_type not in (TokenType.VAR, TokenType.IDENTIFIER) and text.replace(" ", "").isalpha():
            text = text.lower()
        pieces += [gap, text]
        end = token.end + 1
    return "".join(pieces) + sql[end:]


# Kinds


def _correct(gold: _Gold, rng: random.Random) -> str:
    return gold.sql


def _near_miss(gold: _Gold, rng: random.Random) -> str | None:
    for change in rng.sample(_NEAR_MISSES, len(_NEAR_MISSES)):
        edited = gold.edit(change, rng)
        if edited is not None:
            return edited
    return None


def _wrong(gold: _Gold, rng: random.Random) -> str:
    """One or two columns of a table the gold query does not read (of its own table when there is no other)."""
    used = {table.name.lower() for table in gold.tree.find_all(exp.Table)} if gold.tree else set()
    names = [name for name in gold.tables if name not in used] or list(gold.tables)
    if not names:  # no CREATE TABLE to draw from
        return "SELECT 1"
    table = gold.tables[rng.choice(names)]
    columns = rng.sample(table.columns, min(len(table.columns), rng.randint(1, 2)))
    return exp.select(*(exp.column(name) for name in columns)).from_(exp.table_(table.name)).sql(dialect=gold.dialect)


def _non_executing(gold: _Gold, rng: random.Random) -> str:
    if rng.random() < 2 / 3:
        edited = gold.edit(rng.choice((_misspell_column, _unknown_table)), rng)
        if edited is not None:
            return edited
    return _syntax_error(gold.sql, gold.dialect, rng)


_MAKERS: dict[str, Callable[[_Gold, random.Random], str | None]] = {
    "correct": _correct,
    "near_miss": _near_miss,
    "wrong": _wrong,
    "non_executing": _non_executing,
}


# Near misses


def _change_literal(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    literals = [literal for literal in tree.find_all(exp.Literal) if not literal.find_ancestor(exp.Limit)]
    if not literals:
        return False
    literal = rng.choice(literals)
    text = literal.this
    if literal.is_string:
        changed = next(variant for variant in (text.lower(), text.upper(), f"{text}s") if variant != text)
        literal.replace(exp.Literal.string(changed))
    elif text.isdigit():
        literal.replace(exp.Literal.number(int(text) + rng.choice((-10, -1, 1, 10))))
    else:
        literal.replace(exp.Literal.number(f"{float(text) * rng.choice((0.9, 1.1)):.2f}"))
    return True


def _drop_condition(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    wheres = list(tree.find_all(exp.Where))
    if not wheres:
        return False
    where = rng.choice(wheres)
    if isinstance(where.this, exp.And):
        where.this.replace(rng.choice((where.this.left, where.this.right)).copy())
    else:
        where.pop()
    return True


def _shift_limit(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    limit = tree.find(exp.Limit)
    count = limit.expression if limit else None
    if not isinstance(count, exp.Literal) or not count.this.isdigit():
        return False
    value = int(count.this)
    count.replace(exp.Literal.number(value + 1 if value <= 1 or rng.random() < 0.5 else value - 1))
    return True


def _flip_extreme(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    """MIN for MAX (or back), or the sort order reversed."""
    nodes = list(tree.find_all(exp.Min, exp.Max, exp.Ordered))
    if not nodes:
        return False
    node = rng.choice(nodes)
    if isinstance(node, exp.Ordered):
        descending = not node.args.get("desc")
        node.set("desc", descending)
        node.set("nulls_first", not descending)  # SQLite's default, so no NULLS clause is printed
    else:
        flipped = exp.Min if isinstance(node, exp.Max) else exp.Max
        node.replace(flipped(**node.copy().args))
    return True


def _swap_column(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    """A projected column replaced by another of the same table, one no other table of the query has."""
    aliases = {table.alias_or_name.lower(): table.name.lower() for table in tree.find_all(exp.Table)}
    read = [tables[name] for name in set(aliases.values()) if name in tables]
    options = []
    for select in tree.find_all(exp.Select):
        for column in (column for projection in select.expressions for column in projection.find_all(exp.Column)):
            owner = _owner(column, aliases, tables, read)
            if owner is None:
                continue
            elsewhere = {name.lower() for table in read if table is not owner for name in table.columns}
            others = [name for name in owner.columns if name.lower() not in elsewhere | {column.name.lower()}]
            if others:
                options.append((column, others))
    if not options:
        return False
    column, others = rng.choice(options)
    column.set("this", exp.to_identifier(rng.choice(others)))
    return True


def _owner(column: exp.Column, aliases: dict[str, str], tables: dict[str, _Table], read: list[_Table]) -> _Table | None:
    """The schema table a column belongs to, when the query makes that unambiguous."""
    if column.table:
        return tables.get(aliases.get(column.table.lower(), ""))
    owners = [table for table in read if column.name.lower() in {name.lower() for name in table.columns}]
    return owners[0] if len(owners) == 1 else None


_NEAR_MISSES = (_change_literal, _drop_condition, _shift_limit, _flip_extreme, _swap_column)


# Queries that cannot run.


def _misspell_column(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    columns = list(tree.find_all(exp.Column))
    if not columns:
        return False
    known = {name.lower() for table in tables.values() for name in table.columns}
    column = rng.choice(columns)
    name = column.name
    cut = rng.randrange(len(name))
    typos = [name[:cut] + name[cut + 1 :], name[:cut] + name[cut] + name[cut:], f"{name}s"]
    typo = next((typo for typo in rng.sample(typos, len(typos)) if typo and typo.lower() not in known), None)
    if typo is None:
        return False
    # Unquoted: SQLite reads an unknown double-quoted name as a string literal, which would run.
    column.set("this", exp.Identifier(this=typo, quoted=False))
    return True


def _unknown_table(tree: exp.Expression, tables: dict[str, _Table], rng: random.Random) -> bool:
    references = list(tree.find_all(exp.Table))
    if not references:
        return False
    table = rng.choice(references)
    name = table.name
    singular_or_plural = name[:-1] if name.lower().endswith("s") else f"{name}s"
    unknown = next((n for n in (singular_or_plural, f"{name}_info") if n.lower() not in tables), None)
    if unknown is None:
        return False
    table.set("this", exp.to_identifier(unknown))
    return True


def _syntax_error(sql: str, dialect: str, rng: random.Random) -> str:
    """FROM misspelled as FORM, or the query cut off after a keyword or operator, as when generation stops short."""
    try:
        tokens = sqlglot.tokenize(sql, read=dialect)
    except SqlglotError:
        tokens = []
    froms = [token for token in tokens if token.token_type is TokenType.FROM]
    cuts = [token for token in tokens if token.token_type in _CUT_AFTER]
    if froms and (not cuts or rng.random() < 0.5):
        token = rng.choice(froms)
        return f"{sql[: token.start]}FORM{sql[token.end + 1 :]}"
    if cuts:
        return sql[: rng.choice(cuts).end + 1]
    return f"{sql} WHERE"

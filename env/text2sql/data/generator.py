"""A deterministic synthetic text-to-SQL generator, for work without network access.

Each domain (see :mod:`.domains`) is filled with seeded random rows a few
times, and each filling is one schema script, so a scorer builds few
databases. Question templates draw their literals from those rows, and every
gold query is run on its database and kept only when it returns a non-NULL
value. Gold SQL stays portable across SQLite, PostgreSQL and MariaDB: no
division, AVG only returned over REAL columns, no ordering or MIN/MAX over
text, and ORDER BY ... LIMIT only where the sort keys up to the cut are
distinct (with an ``id`` tiebreaker besides).

Templates build gold queries from parts (:class:`_Query`, :class:`_Comparison`),
and a candidate is also rejected as degenerate when its question does not
hinge on its predicates: when, on its database, dropping its WHERE or HAVING
clause, or changing one of its predicates (in the outer query or a subquery,
in every place it occurs) gives the same rows as the gold, compared as the
verdict does. A predicate is changed by dropping it, reversing it (``>`` to
``<=``, ``=`` to ``<>``, ``IN`` to ``NOT IN``) or moving its constant to the
nearest whole number, either way, that changes its truth for some row.
"""

from __future__ import annotations

import logging
import math
import operator
import random
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from ..compare import results_match
from ..example import Example
from .domains import ALL, Column, Domain, Table

DOMAINS: tuple[str, ...] = tuple(domain.name for domain in ALL)

_INSTANCES = 2  # databases per domain: different rows, same tables
_PATIENCE = 2000  # consecutive rejected candidates before the question space counts as exhausted
_FILTERABLE = ("category", "measure", "year")
_NUMERIC = ("measure", "year")
_COMPARISONS = {
    "measure": ((">", "above"), ("<", "below"), (">=", "at least"), ("<=", "at most")),
    "year": ((">", "after"), ("<", "before"), (">=", "in or after"), ("<=", "in or before")),
}
_OPERATORS = {"=": operator.eq, ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}
_REVERSED = {"=": "<>", "<>": "=", ">": "<=", "<=": ">", "<": ">=", ">=": "<", "IN": "NOT IN", "NOT IN": "IN"}

_log = logging.getLogger(__name__)

Value = int | float | str
Row = dict[str, Value]
Link = tuple[Table, Column, Table]


@dataclass(frozen=True)
class GenerationReport:
    """How many candidates :func:`generate` drew, and why it rejected the ones it did not keep."""

    candidates: int = 0
    unfit: int = 0  # the template found nothing to ask of the database
    repeated: int = 0  # the question, or its gold query, was already drawn
    empty: int = 0  # the gold query returned no non-NULL value
    degenerate: int = 0  # a predicate dropped, reversed or shifted gave the gold's rows

    @property
    def kept(self) -> int:
        return self.candidates - self.unfit - self.repeated - self.empty - self.degenerate


@dataclass(frozen=True)
class _Instance:
    """One populated database of a domain: its script, its rows, and a connection to check gold on."""

    domain: Domain
    schema: str
    rows: dict[str, list[Row]]
    connection: sqlite3.Connection

    def values(self, table: Table, column: Column) -> list[Value]:
        return [row[column.name] for row in self.rows[table.name]]


@dataclass(frozen=True)
class _Comparison:
    """One predicate of a gold query, ``left op right``; ``right`` is an SQL literal or a subquery.

    ``shifts`` are the constants nearest to ``right`` (one below, one above)
    that change the predicate's truth for some row.
    """

    left: str
    op: str
    right: str | _Query
    shifts: tuple[int, ...] = ()

    @property
    def sql(self) -> str:
        right = f"({self.right.sql})" if isinstance(self.right, _Query) else self.right
        return f"{self.left} {self.op} {right}"

    def alternatives(self) -> Iterator[_Comparison]:
        """This predicate reversed, and with its constant shifted each way."""
        yield replace(self, op=_REVERSED[self.op])
        for shift in self.shifts:
            yield replace(self, right=_literal(shift), shifts=())


@dataclass(frozen=True)
class _Query:
    """A gold SELECT in parts: ``select`` is everything up to WHERE (columns, tables, joins)."""

    select: str
    where: tuple[_Comparison, ...] = ()
    group_by: str = ""
    having: tuple[_Comparison, ...] = ()
    order_by: str = ""
    limit: int = 0

    @property
    def sql(self) -> str:
        parts = [self.select]
        if self.where:
            parts.append("WHERE " + " AND ".join(predicate.sql for predicate in self.where))
        if self.group_by:
            parts.append(f"GROUP BY {self.group_by}")
        if self.having:
            parts.append("HAVING " + " AND ".join(predicate.sql for predicate in self.having))
        if self.order_by:
            parts.append(f"ORDER BY {self.order_by}")
        if self.limit:
            parts.append(f"LIMIT {self.limit}")
        return " ".join(parts)

    def variants(self) -> Iterator[_Query]:
        """This query with one change to its predicates.

        Its WHERE or its HAVING dropped whole, or one predicate dropped,
        reversed or shifted wherever it occurs, subqueries included.
        """
        for clause in ("where", "having"):
            if getattr(self, clause):
                yield replace(self, **{clause: ()})
        for predicate in dict.fromkeys(self.predicates()):
            yield self.substitute(predicate, None)
            for alternative in predicate.alternatives():
                yield self.substitute(predicate, alternative)

    def predicates(self) -> Iterator[_Comparison]:
        """Every predicate of the query and of its subqueries, outer first."""
        for predicate in self.where + self.having:
            yield predicate
            if isinstance(predicate.right, _Query):
                yield from predicate.right.predicates()

    def substitute(self, old: _Comparison, new: _Comparison | None) -> _Query:
        """The query with ``new`` (or nothing, when None) in place of ``old`` wherever it occurs."""

        def each(predicates: tuple[_Comparison, ...]) -> tuple[_Comparison, ...]:
            kept = []
            for predicate in predicates:
                if predicate == old:
                    predicate = new
                elif isinstance(predicate.right, _Query):
                    predicate = replace(predicate, right=predicate.right.substitute(old, new))
                if predicate is not None:
                    kept.append(predicate)
            return tuple(kept)

        return replace(self, where=each(self.where), having=each(self.having))


@dataclass(frozen=True)
class _Condition:
    """A WHERE condition in English and as a predicate, and as a row test for checks done in Python."""

    text: str
    predicate: _Comparison
    column: Column
    test: Callable[[Row], bool]


def generate(
    n_train: int, n_eval: int, seed: int = 0, domains: Sequence[str] | None = None
) -> tuple[list[Example], list[Example]]:
    """Make ``n_train + n_eval`` distinct, checked examples and split them.

    The same arguments always give the same examples, in the same order. No
    question (compared lower-cased, whitespace-collapsed) occurs twice, so the
    two splits share none, and none is degenerate (see the module docstring).
    Raises ``ValueError`` when the chosen domains cannot yield that many
    distinct questions. :func:`generate_with_report` also says how many
    candidates were drawn and rejected.
    """
    train, held_out, _ = generate_with_report(n_train, n_eval, seed, domains)
    return train, held_out


def generate_with_report(
    n_train: int, n_eval: int, seed: int = 0, domains: Sequence[str] | None = None
) -> tuple[list[Example], list[Example], GenerationReport]:
    """:func:`generate`'s two splits, and a report of the candidates it drew (also logged at INFO)."""
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be non-negative")
    rng = random.Random(seed)
    instances = [_instance(domain, seed, number) for domain in _select(domains) for number in range(_INSTANCES)]
    try:
        examples, report = _draw(instances, n_train + n_eval, rng)
    finally:
        for instance in instances:
            instance.connection.close()
    _log.info(
        "generated %d examples from %d candidates; redrew %d degenerate, %d repeated, %d empty, %d unfit",
        report.kept, report.candidates, report.degenerate, report.repeated, report.empty, report.unfit,
    )
    rng.shuffle(examples)
    return examples[:n_train], examples[n_train:], report


def _select(names: Sequence[str] | None) -> tuple[Domain, ...]:
    if names is None:
        return ALL
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domain(s): {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    if not names:
        raise ValueError("domains is empty")
    return tuple(domain for domain in ALL if domain.name in names)


def _draw(instances: list[_Instance], wanted: int, rng: random.Random) -> tuple[list[Example], GenerationReport]:
    """Cycle through databases and template kinds, keeping the candidates :func:`_rejection` lets through."""
    examples: list[Example] = []
    seen: set[str] = set()
    numbers: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    attempts = misses = 0
    while len(examples) < wanted:
        if misses == _PATIENCE:
            names = ", ".join(dict.fromkeys(instance.domain.name for instance in instances))
            raise ValueError(
                f"only {len(examples)} distinct questions could be generated for {names}; "
                f"ask for fewer examples or more domains"
            )
        instance = instances[attempts % len(instances)]
        kind = TEMPLATE_KINDS[attempts // len(instances) % len(TEMPLATE_KINDS)]
        attempts += 1
        candidate = rng.choice(_TEMPLATES[kind])(instance, rng)
        reason = _rejection(instance, candidate, seen)
        if reason:
            rejected[reason] += 1
            misses += 1
            continue
        question, query = candidate
        misses = 0
        seen.update((_key(question), _key(query.sql)))
        name = instance.domain.name
        numbers[name] += 1
        examples.append(Example(
            id=f"{name}-{numbers[name]:04d}", question=question, schema=instance.schema, gold=query.sql, domain=name
        ))
    return examples, GenerationReport(candidates=attempts, **rejected)


def _key(question: str) -> str:
    return " ".join(question.lower().split())


def _rejection(instance: _Instance, candidate: Candidate, seen: set[str]) -> str | None:
    """Why a candidate is rejected, as a :class:`GenerationReport` field name; None when it is kept.

    A usable gold query asks a new question, is a query no earlier example
    has (a paraphrase of a training example's question in the held-out split
    would be scored on a query the model was trained to write), runs, returns
    at least one non-NULL value, and is not degenerate.
    """
    if candidate is None:
        return "unfit"
    question, query = candidate
    if _key(question) in seen or _key(query.sql) in seen:
        return "repeated"
    rows = _rows(instance.connection, query.sql)
    if rows is None or not any(value is not None for row in rows for value in row):
        return "empty"
    if _degenerate(instance.connection, query, rows):
        return "degenerate"
    return None


def _rows(connection: sqlite3.Connection, sql: str) -> list[tuple] | None:
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.Error:
        return None


def _degenerate(connection: sqlite3.Connection, query: _Query, rows: list[tuple]) -> bool:
    """Some variant of the query's predicates gives the gold's rows: the question does not hinge on them.

    A variant that fails to run counts as a different result.
    """
    for variant in dict.fromkeys(variant.sql for variant in query.variants()):
        found = _rows(connection, variant)
        if found is not None and results_match(rows, found, ordered=bool(query.order_by)):
            return True
    return False


# Databases


def _instance(domain: Domain, seed: int, number: int) -> _Instance:
    rows = _populate(domain, random.Random(f"{seed}/{domain.name}/{number}"))
    schema = _script(domain, rows)
    connection = sqlite3.connect(":memory:")
    connection.executescript(schema)
    return _Instance(domain, schema, rows, connection)


def _populate(domain: Domain, rng: random.Random) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {}
    for table in domain.tables:
        size = rng.randint(*table.size)
        columns = {column.name: _values(column, size, rows, rng) for column in table.columns}
        rows[table.name] = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return rows


def _values(column: Column, size: int, rows: dict[str, list[Row]], rng: random.Random) -> list[Value]:
    if column.role == "key":
        return list(range(1, size + 1))
    if column.role == "ref":
        return [rng.randint(1, len(rows[column.ref])) for _ in range(size)]
    if column.role == "label":
        return rng.sample(column.values, size)
    if column.role == "category":
        return [rng.choice(column.values) for _ in range(size)]
    low, high = column.bounds
    if column.real:
        return [round(rng.uniform(low, high), 2) for _ in range(size)]
    return [rng.randint(low, high) for _ in range(size)]


def _script(domain: Domain, rows: dict[str, list[Row]]) -> str:
    creates = [_create(table) for table in domain.tables]
    inserts = [_insert(table, rows[table.name]) for table in domain.tables]
    return "\n\n".join(creates + inserts) + "\n"


def _create(table: Table) -> str:
    lines = [
        f"  {column.name} {column.type} {'PRIMARY KEY' if column.role == 'key' else 'NOT NULL'}"
        for column in table.columns
    ]
    lines += [f"  FOREIGN KEY ({column.name}) REFERENCES {column.ref} (id)" for column in table.role("ref")]
    return f"CREATE TABLE {table.name} (\n" + ",\n".join(lines) + "\n);"


def _insert(table: Table, rows: list[Row]) -> str:
    names = ", ".join(column.name for column in table.columns)
    values = ",\n".join("  (" + ", ".join(_literal(value) for value in row.values()) + ")" for row in rows)
    return f"INSERT INTO {table.name} ({names}) VALUES\n{values};"


def _literal(value: Value) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


# Template parts


def _plural(noun: str) -> str:
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def _how_many(count: int, table: Table) -> str:
    return f"one {table.singular}" if count == 1 else f"{count} {table.plural}"


def _extreme_word(column: Column, highest: bool) -> str:
    if column.role == "year":
        return "latest" if highest else "earliest"
    return "highest" if highest else "lowest"


def _aggregates(column: Column) -> list[tuple[str, str]]:
    """(SQL function, English word) pairs that make sense for a numeric column.

    AVG is offered over REAL columns only: over integers MariaDB returns a
    4-decimal DECIMAL where the other engines return a full float.
    """
    if column.role == "year":
        return [("MIN", "earliest"), ("MAX", "latest")]
    pairs = [("MIN", "lowest"), ("MAX", "highest")]
    if column.additive:
        pairs.append(("SUM", "total"))
    if column.real:
        pairs.append(("AVG", "average"))
    return pairs


def _choose_table(db: _Instance, rng: random.Random, accept: Callable[[Table], object]) -> Table | None:
    tables = [table for table in db.domain.tables if accept(table)]
    return rng.choice(tables) if tables else None


def _choose_link(db: _Instance, rng: random.Random, accept: Callable[[Table, Column, Table], object]) -> Link | None:
    links = [link for link in db.domain.links() if accept(*link)]
    return rng.choice(links) if links else None


def _aliases(child: Table, parent: Table) -> tuple[str, str]:
    child_alias, parent_alias = child.name[0], parent.name[0]
    return (child_alias, parent_alias) if child_alias != parent_alias else ("t1", "t2")


def _others(table: Table, column: Column | None = None) -> list[Column]:
    """The columns a WHERE condition can use, but ``column``."""
    return [other for other in table.role(*_FILTERABLE) if other is not column]


def _condition(
    db: _Instance, table: Table, rng: random.Random, alias: str = "", owner: str = "", exclude: Column | None = None
) -> _Condition:
    """A random condition on one of ``table``'s columns, with a literal taken from its rows.

    Thresholds come from the middle half of the column's values, so the
    condition keeps some rows and drops others. ``owner`` is the possessive
    that names the table in a join ("author's ").
    """
    column = rng.choice(_others(table, exclude))
    values = sorted(db.values(table, column))
    shifts: tuple[int, ...] = ()
    if column.role == "category":
        op, value = "=", rng.choice(values)
        text = f"whose {owner}{column.phrase} is {value}"
    else:
        op, word = rng.choice(_COMPARISONS[column.role])
        value = int(rng.choice(values[len(values) // 4 : 3 * len(values) // 4 + 1]))
        text = f"whose {owner}{column.phrase} is {word} {value}"
        shifts = _shifts(op, value, values)
    check = _OPERATORS[op]
    predicate = _Comparison(f"{alias}{column.name}", op, _literal(value), shifts)
    return _Condition(text, predicate, column, lambda row: check(row[column.name], value))


def _shifts(op: str, constant: int, values: Sequence[Value]) -> tuple[int, ...]:
    """The whole numbers nearest to ``constant``, below and above, for which ``value op number`` differs for some value.

    The truth of ``value op number`` only changes between whole numbers next
    to a value's floor or ceiling, so those are the only candidates to try.
    """
    check = _OPERATORS[op]

    def truth(number: int) -> list[bool]:
        return [check(value, number) for value in values]

    here = truth(constant)
    near = {bound + step for value in values for bound in (math.floor(value), math.ceil(value)) for step in (-1, 0, 1)}
    changed = [number for number in sorted(near) if truth(number) != here]
    below = [number for number in changed if number < constant][-1:]
    above = [number for number in changed if number > constant][:1]
    return tuple(below + above)


def _distinct_top(keys: list[Value], count: int, descending: bool) -> bool:
    """The first ``count + 1`` sort keys are distinct: LIMIT ``count`` picks the same rows on every engine."""
    ranked = sorted(keys, reverse=descending)
    return len(ranked) > count and len(set(ranked[: count + 1])) == count + 1


# Templates: each takes a database and a random source, and returns the question and its gold query in parts, or
# None when the database has nothing the template fits.

Candidate = tuple[str, _Query] | None


def _filter(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and _others(t))
    if table is None:
        return None
    condition = _condition(db, table, rng)
    labels = _plural(table.label.phrase)
    question = rng.choice((
        f"List the {labels} of {table.plural} {condition.text}.",
        f"What are the {labels} of the {table.plural} {condition.text}?",
    ))
    return question, _Query(f"SELECT {table.label.name} FROM {table.name}", (condition.predicate,))


def _filter_two(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and len(_others(t)) >= 2)
    if table is None:
        return None
    first = _condition(db, table, rng)
    second = _condition(db, table, rng, exclude=first.column)
    return (
        f"List the {_plural(table.label.phrase)} of {table.plural} {first.text} and {second.text}.",
        _Query(f"SELECT {table.label.name} FROM {table.name}", (first.predicate, second.predicate)),
    )


def _lookup(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and _others(t))
    if table is None:
        return None
    label = table.label
    row = rng.choice(db.rows[table.name])
    column = rng.choice(_others(table))
    return (
        f"What is the {column.phrase} of the {table.singular} whose {label.phrase} is {row[label.name]}?",
        _Query(f"SELECT {column.name} FROM {table.name}", (_Comparison(label.name, "=", _literal(row[label.name])),)),
    )


def _count(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, _others)
    if table is None:
        return None
    condition = _condition(db, table, rng)
    question = rng.choice((
        f"How many {table.plural} are there {condition.text}?",
        f"Count the {table.plural} {condition.text}.",
    ))
    return question, _Query(f"SELECT COUNT(*) FROM {table.name}", (condition.predicate,))


def _count_distinct(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    column = rng.choice(table.role("category"))
    return (
        f"How many different {_plural(column.phrase)} appear among the {table.plural}?",
        _Query(f"SELECT COUNT(DISTINCT {column.name}) FROM {table.name}"),
    )


def _aggregate(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    function, word = rng.choice(_aggregates(column))
    query = _Query(f"SELECT {function}({column.name}) FROM {table.name}")
    if not _others(table, column) or rng.random() < 0.3:
        return f"What is the {word} {column.phrase} of all {table.plural}?", query
    condition = _condition(db, table, rng, exclude=column)
    return (
        f"What is the {word} {column.phrase} of {table.plural} {condition.text}?",
        replace(query, where=(condition.predicate,)),
    )


def _group_count(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    query = _Query(f"SELECT {group.name}, COUNT(*) FROM {table.name}", group_by=group.name)
    if _others(table, group) and rng.random() < 0.6:
        condition = _condition(db, table, rng, exclude=group)
        return (
            f"For each {group.phrase}, how many {table.plural} are there {condition.text}?",
            replace(query, where=(condition.predicate,)),
        )
    question = rng.choice((
        f"For each {group.phrase}, how many {table.plural} are there?",
        f"How many {table.plural} are there for each {group.phrase}?",
    ))
    return question, query


def _group_aggregate(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category") and t.role(*_NUMERIC))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    column = rng.choice(table.role(*_NUMERIC))
    function, word = rng.choice(_aggregates(column))
    return (
        f"What is the {word} {column.phrase} of {table.plural} for each {group.phrase}?",
        _Query(f"SELECT {group.name}, {function}({column.name}) FROM {table.name}", group_by=group.name),
    )


def _group_join(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.label)
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    label = parent.label
    group_by = f"{p}.id, {p}.{label.name}"
    numeric = child.role(*_NUMERIC)
    if numeric and rng.random() < 0.5:
        column = rng.choice(numeric)
        function, word = rng.choice(_aggregates(column))
        return (
            f"For each {ref.phrase}, give the {label.phrase} and the {word} {column.phrase} of their {child.plural}.",
            _Query(
                f"SELECT {p}.{label.name}, {function}({c}.{column.name}) FROM {parent.name} AS {p} "
                f"JOIN {child.name} AS {c} ON {c}.{ref.name} = {p}.id",
                group_by=group_by,
            ),
        )
    return (
        f"For each {ref.phrase}, give the {label.phrase} and the number of {child.plural}.",
        _Query(
            f"SELECT {p}.{label.name}, COUNT({c}.id) FROM {parent.name} AS {p} "
            f"LEFT JOIN {child.name} AS {c} ON {c}.{ref.name} = {p}.id",
            group_by=group_by,
        ),
    )


def _threshold(values: list[float], rng: random.Random) -> int | None:
    """A whole number below the largest value and at or above another: a filter that keeps some but not all."""
    distinct = sorted(set(values))
    return int(rng.choice(distinct[:-1])) if len(distinct) > 1 else None


def _above(aggregate: str, threshold: int, values: list[float]) -> _Comparison:
    """The HAVING predicate ``aggregate > threshold``, where ``values`` are the aggregate's values over the groups."""
    return _Comparison(aggregate, ">", str(threshold), _shifts(">", threshold, values))


def _having_count(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    counts = list(Counter(db.values(table, group)).values())
    threshold = _threshold(counts, rng)
    if threshold is None:
        return None
    having = _above("COUNT(*)", threshold, counts)
    return (
        f"Which {_plural(group.phrase)} have more than {_how_many(threshold, table)}?",
        _Query(f"SELECT {group.name} FROM {table.name}", group_by=group.name, having=(having,)),
    )


def _having_aggregate(db: _Instance, rng: random.Random) -> Candidate:
    def summable(table: Table) -> list[Column]:
        return [column for column in table.role("measure") if column.real or column.additive]

    table = _choose_table(db, rng, lambda t: t.role("category") and summable(t))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    column = rng.choice(summable(table))
    function, word = rng.choice([pair for pair in _aggregates(column) if pair[0] in ("SUM", "AVG")])
    groups: defaultdict[Value, list[float]] = defaultdict(list)
    for row in db.rows[table.name]:
        groups[row[group.name]].append(float(row[column.name]))
    reduce = sum if function == "SUM" else lambda values: sum(values) / len(values)
    totals = [reduce(values) for values in groups.values()]
    threshold = _threshold(totals, rng)
    if threshold is None:
        return None
    article = "an" if word[0] in "aeiou" else "a"
    having = _above(f"{function}({column.name})", threshold, totals)
    return (
        f"Which {_plural(group.phrase)} have {article} {word} {column.phrase} of {table.plural} above {threshold}?",
        _Query(f"SELECT {group.name} FROM {table.name}", group_by=group.name, having=(having,)),
    )


def _having_join(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.label)
    if link is None:
        return None
    child, ref, parent = link
    counts = list(Counter(row[ref.name] for row in db.rows[child.name]).values())
    threshold = _threshold(counts, rng)
    if threshold is None:
        return None
    c, p = _aliases(child, parent)
    label = parent.label
    return (
        f"Which {parent.plural} have more than {_how_many(threshold, child)}? Give their {_plural(label.phrase)}.",
        _Query(
            f"SELECT {p}.{label.name} FROM {parent.name} AS {p} JOIN {child.name} AS {c} ON {c}.{ref.name} = {p}.id",
            group_by=f"{p}.id, {p}.{label.name}",
            having=(_above("COUNT(*)", threshold, counts),),
        ),
    )


def _top(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    descending = rng.random() < 0.5
    count = rng.randint(1, 5)
    label, rows, where, scope = table.label, db.rows[table.name], (), ""
    if _others(table, column) and rng.random() < 0.4:
        condition = _condition(db, table, rng, exclude=column)
        rows = [row for row in rows if condition.test(row)]
        where, scope = (condition.predicate,), f"Among {table.plural} {condition.text}, "
    if not _distinct_top([row[column.name] for row in rows], count, descending):
        return None
    extreme = f"the {_extreme_word(column, descending)} {column.phrase}"
    if scope and count == 1:
        question = f"{scope}what is the {label.phrase} of the one with {extreme}?"
    elif scope:
        question = f"{scope}list the {_plural(label.phrase)} of the {count} with {extreme}."
    elif count == 1:
        question = f"What is the {label.phrase} of the {table.singular} with {extreme}?"
    else:
        question = f"List the {_plural(label.phrase)} of the {count} {table.plural} with {extreme}."
    direction = " DESC" if descending else ""
    return question, _Query(
        f"SELECT {label.name} FROM {table.name}", where, order_by=f"{column.name}{direction}, id", limit=count
    )


def _sorted(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC) and len(_others(t)) >= 2)
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    condition = _condition(db, table, rng, exclude=column)
    keys = [row[column.name] for row in db.rows[table.name] if condition.test(row)]
    if len(keys) < 2 or len(set(keys)) < len(keys):
        return None
    descending = rng.random() < 0.5
    first, last = _extreme_word(column, descending), _extreme_word(column, not descending)
    direction = " DESC" if descending else ""
    return (
        f"List the {_plural(table.label.phrase)} of {table.plural} {condition.text}, "
        f"sorted by {column.phrase} from {first} to {last}.",
        _Query(f"SELECT {table.label.name} FROM {table.name}", (condition.predicate,),
               order_by=f"{column.name}{direction}, id"),
    )


def _distinct(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    column = rng.choice(table.role("category"))
    query = _Query(f"SELECT DISTINCT {column.name} FROM {table.name}")
    if not _others(table, column) or rng.random() < 0.2:
        return f"List the different {_plural(column.phrase)} of {table.plural}.", query
    condition = _condition(db, table, rng, exclude=column)
    return (
        f"List the different {_plural(column.phrase)} of {table.plural} {condition.text}.",
        replace(query, where=(condition.predicate,)),
    )


def _distinct_join(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.role("category") and _others(child))
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    column = rng.choice(parent.role("category"))
    condition = _condition(db, child, rng, alias=f"{c}.")
    return (
        f"List the different {_plural(column.phrase)} of the {_plural(ref.phrase)} of {child.plural} {condition.text}.",
        _Query(
            f"SELECT DISTINCT {p}.{column.name} FROM {child.name} AS {c} JOIN {parent.name} AS {p} "
            f"ON {c}.{ref.name} = {p}.id",
            (condition.predicate,),
        ),
    )


def _join_filter(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: child.label and _others(parent))
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    condition = _condition(db, parent, rng, alias=f"{p}.", owner=f"{ref.phrase}'s ")
    return (
        f"List the {_plural(child.label.phrase)} of {child.plural} {condition.text}.",
        _Query(
            f"SELECT {c}.{child.label.name} FROM {child.name} AS {c} JOIN {parent.name} AS {p} "
            f"ON {c}.{ref.name} = {p}.id",
            (condition.predicate,),
        ),
    )


def _join_pair(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: child.label and parent.label and _others(child))
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    condition = _condition(db, child, rng, alias=f"{c}.")
    return (
        f"For each {child.singular} {condition.text}, give its {child.label.phrase} "
        f"and the {parent.label.phrase} of its {ref.phrase}.",
        _Query(
            f"SELECT {c}.{child.label.name}, {p}.{parent.label.name} FROM {child.name} AS {c} "
            f"JOIN {parent.name} AS {p} ON {c}.{ref.name} = {p}.id",
            (condition.predicate,),
        ),
    )


def _join_aggregate(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: _others(parent))
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    condition = _condition(db, parent, rng, alias=f"{p}.", owner=f"{ref.phrase}'s ")
    joined = f"FROM {child.name} AS {c} JOIN {parent.name} AS {p} ON {c}.{ref.name} = {p}.id"
    numeric = child.role(*_NUMERIC)
    if not numeric or rng.random() < 0.4:
        return (
            f"How many {child.plural} are there {condition.text}?",
            _Query(f"SELECT COUNT(*) {joined}", (condition.predicate,)),
        )
    column = rng.choice(numeric)
    function, word = rng.choice(_aggregates(column))
    return (
        f"What is the {word} {column.phrase} of {child.plural} {condition.text}?",
        _Query(f"SELECT {function}({c}.{column.name}) {joined}", (condition.predicate,)),
    )


def _in(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.label and _others(child))
    if link is None:
        return None
    child, ref, parent = link
    condition = _condition(db, child, rng)
    negated = rng.random() < 0.35
    inner = _Query(f"SELECT {ref.name} FROM {child.name}", (condition.predicate,))
    membership = _Comparison("id", "NOT IN" if negated else "IN", inner)
    return (
        f"List the {_plural(parent.label.phrase)} of {parent.plural} that have "
        f"{'no' if negated else 'at least one'} {child.singular} {condition.text}.",
        _Query(f"SELECT {parent.label.name} FROM {parent.name}", (membership,)),
    )


def _versus_average(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    op, word = rng.choice(_COMPARISONS[column.role][:2])
    inner, scope = _Query(f"SELECT AVG({column.name}) FROM {table.name}"), f"all {table.plural}"
    if _others(table, column) and rng.random() < 0.4:
        condition = _condition(db, table, rng, exclude=column)
        inner, scope = replace(inner, where=(condition.predicate,)), f"{table.plural} {condition.text}"
    return (
        f"List the {_plural(table.label.phrase)} of {table.plural} whose {column.phrase} is {word} "
        f"the average {column.phrase} of {scope}.",
        _Query(f"SELECT {table.label.name} FROM {table.name}", (_Comparison(column.name, op, inner),)),
    )


def _extreme(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    highest = rng.random() < 0.5
    extreme = f"the {_extreme_word(column, highest)} {column.phrase}"
    inner = _Query(f"SELECT {'MAX' if highest else 'MIN'}({column.name}) FROM {table.name}")
    label = table.label
    query = _Query(f"SELECT {label.name} FROM {table.name}")
    if _others(table, column) and rng.random() < 0.5:
        condition = _condition(db, table, rng, exclude=column)
        inner = replace(inner, where=(condition.predicate,))
        return (
            f"Among {table.plural} {condition.text}, which one has {extreme}? Give its {label.phrase}.",
            replace(query, where=(condition.predicate, _Comparison(column.name, "=", inner))),
        )
    return (
        f"Which {table.singular} has {extreme}? Give its {label.phrase}.",
        replace(query, where=(_Comparison(column.name, "=", inner),)),
    )


_TEMPLATES: dict[str, tuple[Callable[[_Instance, random.Random], Candidate], ...]] = {
    "filter": (_filter, _filter_two, _lookup),
    "count": (_count, _count_distinct),
    "aggregate": (_aggregate,),
    "group_by": (_group_count, _group_aggregate, _group_join),
    "having": (_having_count, _having_aggregate, _having_join),
    "order_limit": (_top, _sorted),
    "distinct": (_distinct, _distinct_join),
    "join": (_join_filter, _join_pair, _join_aggregate),
    "subquery_in": (_in,),
    "subquery_scalar": (_versus_average, _extreme),
}

TEMPLATE_KINDS: tuple[str, ...] = tuple(_TEMPLATES)
"""The template kinds, each a family of question shapes."""

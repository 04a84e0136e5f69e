"""A deterministic synthetic text-to-SQL generator, for work without network access.

Each domain (see :mod:`.domains`) is filled with seeded random rows a few
times, and each filling is one schema script, so a scorer builds few
databases. Question templates draw their literals from those rows, and every
gold query is run on its database and kept only when it returns a non-NULL
value. Gold SQL stays portable across SQLite, PostgreSQL and MariaDB: no
division, AVG only returned over REAL columns, no ordering or MIN/MAX over
text, and ORDER BY ... LIMIT only where the sort keys up to the cut are
distinct (with an ``id`` tiebreaker besides).
"""

from __future__ import annotations

import operator
import random
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

Value = int | float | str
Row = dict[str, Value]
Link = tuple[Table, Column, Table]


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
class _Condition:
    """A WHERE condition in English and in SQL, and as a row test for checks done in Python."""

    text: str
    sql: str
    column: Column
    test: Callable[[Row], bool]


def generate(
    n_train: int, n_eval: int, seed: int = 0, domains: Sequence[str] | None = None
) -> tuple[list[Example], list[Example]]:
    """Make ``n_train + n_eval`` distinct, checked examples and split them.

    The same arguments always give the same examples, in the same order. No
    question (compared lower-cased, whitespace-collapsed) occurs twice, so the
    two splits share none. Raises ``ValueError`` when the chosen domains
    cannot yield that many distinct questions.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be non-negative")
    rng = random.Random(seed)
    instances = [_instance(domain, seed, number) for domain in _select(domains) for number in range(_INSTANCES)]
    try:
        examples = _draw(instances, n_train + n_eval, rng)
    finally:
        for instance in instances:
            instance.connection.close()
    rng.shuffle(examples)
    return examples[:n_train], examples[n_train:]


def _select(names: Sequence[str] | None) -> tuple[Domain, ...]:
    if names is None:
        return ALL
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domain(s): {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    if not names:
        raise ValueError("domains is empty")
    return tuple(domain for domain in ALL if domain.name in names)


def _draw(instances: list[_Instance], wanted: int, rng: random.Random) -> list[Example]:
    """Cycle through databases and template kinds, keeping new questions whose gold returns rows."""
    examples: list[Example] = []
    seen: set[str] = set()
    numbers: Counter[str] = Counter()
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
        if candidate is None:
            misses += 1
            continue
        question, gold = candidate
        key = " ".join(question.lower().split())
        if key in seen or not _returns_rows(instance.connection, gold):
            misses += 1
            continue
        misses = 0
        seen.add(key)
        name = instance.domain.name
        numbers[name] += 1
        examples.append(
            Example(id=f"{name}-{numbers[name]:04d}", question=question, schema=instance.schema, gold=gold, domain=name)
        )
    return examples


def _returns_rows(connection: sqlite3.Connection, sql: str) -> bool:
    """A usable gold query runs and returns at least one non-NULL value."""
    try:
        rows = connection.execute(sql).fetchall()
    except sqlite3.Error:
        return False
    return any(value is not None for row in rows for value in row)


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
    if column.role == "category":
        op, value = "=", rng.choice(values)
        text = f"whose {owner}{column.phrase} is {value}"
    else:
        op, word = rng.choice(_COMPARISONS[column.role])
        value = int(rng.choice(values[len(values) // 4 : 3 * len(values) // 4 + 1]))
        text = f"whose {owner}{column.phrase} is {word} {value}"
    check = _OPERATORS[op]
    sql = f"{alias}{column.name} {op} {_literal(value)}"
    return _Condition(text, sql, column, lambda row: check(row[column.name], value))


def _distinct_top(keys: list[Value], count: int, descending: bool) -> bool:
    """The first ``count + 1`` sort keys are distinct: LIMIT ``count`` picks the same rows on every engine."""
    ranked = sorted(keys, reverse=descending)
    return len(ranked) > count and len(set(ranked[: count + 1])) == count + 1


# Templates: each takes a database and a random source, and returns (question, gold SQL), or None when
# the database has nothing the template fits.

Candidate = tuple[str, str] | None


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
    return question, f"SELECT {table.label.name} FROM {table.name} WHERE {condition.sql}"


def _filter_two(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and len(_others(t)) >= 2)
    if table is None:
        return None
    first = _condition(db, table, rng)
    second = _condition(db, table, rng, exclude=first.column)
    return (
        f"List the {_plural(table.label.phrase)} of {table.plural} {first.text} and {second.text}.",
        f"SELECT {table.label.name} FROM {table.name} WHERE {first.sql} AND {second.sql}",
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
        f"SELECT {column.name} FROM {table.name} WHERE {label.name} = {_literal(row[label.name])}",
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
    return question, f"SELECT COUNT(*) FROM {table.name} WHERE {condition.sql}"


def _count_distinct(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    column = rng.choice(table.role("category"))
    return (
        f"How many different {_plural(column.phrase)} appear among the {table.plural}?",
        f"SELECT COUNT(DISTINCT {column.name}) FROM {table.name}",
    )


def _aggregate(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    function, word = rng.choice(_aggregates(column))
    sql = f"SELECT {function}({column.name}) FROM {table.name}"
    if not _others(table, column) or rng.random() < 0.3:
        return f"What is the {word} {column.phrase} of all {table.plural}?", sql
    condition = _condition(db, table, rng, exclude=column)
    return f"What is the {word} {column.phrase} of {table.plural} {condition.text}?", f"{sql} WHERE {condition.sql}"


def _group_count(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    sql = f"SELECT {group.name}, COUNT(*) FROM {table.name}"
    if _others(table, group) and rng.random() < 0.6:
        condition = _condition(db, table, rng, exclude=group)
        return (
            f"For each {group.phrase}, how many {table.plural} are there {condition.text}?",
            f"{sql} WHERE {condition.sql} GROUP BY {group.name}",
        )
    question = rng.choice((
        f"For each {group.phrase}, how many {table.plural} are there?",
        f"How many {table.plural} are there for each {group.phrase}?",
    ))
    return question, f"{sql} GROUP BY {group.name}"


def _group_aggregate(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category") and t.role(*_NUMERIC))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    column = rng.choice(table.role(*_NUMERIC))
    function, word = rng.choice(_aggregates(column))
    return (
        f"What is the {word} {column.phrase} of {table.plural} for each {group.phrase}?",
        f"SELECT {group.name}, {function}({column.name}) FROM {table.name} GROUP BY {group.name}",
    )


def _group_join(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.label)
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    label = parent.label
    group_by = f"GROUP BY {p}.id, {p}.{label.name}"
    numeric = child.role(*_NUMERIC)
    if numeric and rng.random() < 0.5:
        column = rng.choice(numeric)
        function, word = rng.choice(_aggregates(column))
        return (
            f"For each {ref.phrase}, give the {label.phrase} and the {word} {column.phrase} of their {child.plural}.",
            f"SELECT {p}.{label.name}, {function}({c}.{column.name}) FROM {parent.name} AS {p} "
            f"JOIN {child.name} AS {c} ON {c}.{ref.name} = {p}.id {group_by}",
        )
    return (
        f"For each {ref.phrase}, give the {label.phrase} and the number of {child.plural}.",
        f"SELECT {p}.{label.name}, COUNT({c}.id) FROM {parent.name} AS {p} "
        f"LEFT JOIN {child.name} AS {c} ON {c}.{ref.name} = {p}.id {group_by}",
    )


def _threshold(values: list[float], rng: random.Random) -> int | None:
    """A whole number below the largest value and at or above another: a filter that keeps some but not all."""
    distinct = sorted(set(values))
    return int(rng.choice(distinct[:-1])) if len(distinct) > 1 else None


def _having_count(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    group = rng.choice(table.role("category"))
    threshold = _threshold(list(Counter(db.values(table, group)).values()), rng)
    if threshold is None:
        return None
    return (
        f"Which {_plural(group.phrase)} have more than {_how_many(threshold, table)}?",
        f"SELECT {group.name} FROM {table.name} GROUP BY {group.name} HAVING COUNT(*) > {threshold}",
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
    threshold = _threshold([reduce(values) for values in groups.values()], rng)
    if threshold is None:
        return None
    article = "an" if word[0] in "aeiou" else "a"
    return (
        f"Which {_plural(group.phrase)} have {article} {word} {column.phrase} of {table.plural} above {threshold}?",
        f"SELECT {group.name} FROM {table.name} GROUP BY {group.name} HAVING {function}({column.name}) > {threshold}",
    )


def _having_join(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.label)
    if link is None:
        return None
    child, ref, parent = link
    threshold = _threshold(list(Counter(row[ref.name] for row in db.rows[child.name]).values()), rng)
    if threshold is None:
        return None
    c, p = _aliases(child, parent)
    label = parent.label
    return (
        f"Which {parent.plural} have more than {_how_many(threshold, child)}? Give their {_plural(label.phrase)}.",
        f"SELECT {p}.{label.name} FROM {parent.name} AS {p} JOIN {child.name} AS {c} ON {c}.{ref.name} = {p}.id "
        f"GROUP BY {p}.id, {p}.{label.name} HAVING COUNT(*) > {threshold}",
    )


def _top(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    descending = rng.random() < 0.5
    count = rng.randint(1, 5)
    label, rows, where, scope = table.label, db.rows[table.name], "", ""
    if _others(table, column) and rng.random() < 0.4:
        condition = _condition(db, table, rng, exclude=column)
        rows = [row for row in rows if condition.test(row)]
        where, scope = f" WHERE {condition.sql}", f"Among {table.plural} {condition.text}, "
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
    return question, f"SELECT {label.name} FROM {table.name}{where} ORDER BY {column.name}{direction}, id LIMIT {count}"


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
        f"SELECT {table.label.name} FROM {table.name} WHERE {condition.sql} ORDER BY {column.name}{direction}, id",
    )


def _distinct(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.role("category"))
    if table is None:
        return None
    column = rng.choice(table.role("category"))
    sql = f"SELECT DISTINCT {column.name} FROM {table.name}"
    if not _others(table, column) or rng.random() < 0.2:
        return f"List the different {_plural(column.phrase)} of {table.plural}.", sql
    condition = _condition(db, table, rng, exclude=column)
    return (
        f"List the different {_plural(column.phrase)} of {table.plural} {condition.text}.",
        f"{sql} WHERE {condition.sql}",
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
        f"SELECT DISTINCT {p}.{column.name} FROM {child.name} AS {c} JOIN {parent.name} AS {p} "
        f"ON {c}.{ref.name} = {p}.id WHERE {condition.sql}",
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
        f"SELECT {c}.{child.label.name} FROM {child.name} AS {c} JOIN {parent.name} AS {p} "
        f"ON {c}.{ref.name} = {p}.id WHERE {condition.sql}",
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
        f"SELECT {c}.{child.label.name}, {p}.{parent.label.name} FROM {child.name} AS {c} "
        f"JOIN {parent.name} AS {p} ON {c}.{ref.name} = {p}.id WHERE {condition.sql}",
    )


def _join_aggregate(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: _others(parent))
    if link is None:
        return None
    child, ref, parent = link
    c, p = _aliases(child, parent)
    condition = _condition(db, parent, rng, alias=f"{p}.", owner=f"{ref.phrase}'s ")
    joined = f"FROM {child.name} AS {c} JOIN {parent.name} AS {p} ON {c}.{ref.name} = {p}.id WHERE {condition.sql}"
    numeric = child.role(*_NUMERIC)
    if not numeric or rng.random() < 0.4:
        return f"How many {child.plural} are there {condition.text}?", f"SELECT COUNT(*) {joined}"
    column = rng.choice(numeric)
    function, word = rng.choice(_aggregates(column))
    return (
        f"What is the {word} {column.phrase} of {child.plural} {condition.text}?",
        f"SELECT {function}({c}.{column.name}) {joined}",
    )


def _in(db: _Instance, rng: random.Random) -> Candidate:
    link = _choose_link(db, rng, lambda child, ref, parent: parent.label and _others(child))
    if link is None:
        return None
    child, ref, parent = link
    condition = _condition(db, child, rng)
    negated = rng.random() < 0.35
    return (
        f"List the {_plural(parent.label.phrase)} of {parent.plural} that have "
        f"{'no' if negated else 'at least one'} {child.singular} {condition.text}.",
        f"SELECT {parent.label.name} FROM {parent.name} WHERE id {'NOT IN' if negated else 'IN'} "
        f"(SELECT {ref.name} FROM {child.name} WHERE {condition.sql})",
    )


def _versus_average(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    op, word = rng.choice(_COMPARISONS[column.role][:2])
    inner, scope = f"SELECT AVG({column.name}) FROM {table.name}", f"all {table.plural}"
    if _others(table, column) and rng.random() < 0.4:
        condition = _condition(db, table, rng, exclude=column)
        inner, scope = f"{inner} WHERE {condition.sql}", f"{table.plural} {condition.text}"
    return (
        f"List the {_plural(table.label.phrase)} of {table.plural} whose {column.phrase} is {word} "
        f"the average {column.phrase} of {scope}.",
        f"SELECT {table.label.name} FROM {table.name} WHERE {column.name} {op} ({inner})",
    )


def _extreme(db: _Instance, rng: random.Random) -> Candidate:
    table = _choose_table(db, rng, lambda t: t.label and t.role(*_NUMERIC))
    if table is None:
        return None
    column = rng.choice(table.role(*_NUMERIC))
    highest = rng.random() < 0.5
    extreme = f"the {_extreme_word(column, highest)} {column.phrase}"
    inner = f"SELECT {'MAX' if highest else 'MIN'}({column.name}) FROM {table.name}"
    label = table.label
    if _others(table, column) and rng.random() < 0.5:
        condition = _condition(db, table, rng, exclude=column)
        return (
            f"Among {table.plural} {condition.text}, which one has {extreme}? Give its {label.phrase}.",
            f"SELECT {label.name} FROM {table.name} WHERE {condition.sql} "
            f"AND {column.name} = ({inner} WHERE {condition.sql})",
        )
    return (
        f"Which {table.singular} has {extreme}? Give its {label.phrase}.",
        f"SELECT {label.name} FROM {table.name} WHERE {column.name} = ({inner})",
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

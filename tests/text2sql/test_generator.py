"""The synthetic generator: deterministic, varied, and every gold query checked."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import time
from collections import Counter

import pytest
import sqlglot
from sqlglot import exp

from env.text2sql.compare import results_match
from env.text2sql.data import DOMAINS, TEMPLATE_KINDS, generate
from env.text2sql.data import generator
from env.text2sql.data.generator import generate_with_report

from .cases import sqlite_databases


@pytest.fixture(scope="module")
def splits():
    return generate(400, 100, seed=7)


@pytest.fixture(scope="module")
def examples(splits):
    train, held_out = splits
    return train + held_out


def test_same_seed_gives_identical_output():
    assert generate(120, 30, seed=3) == generate(120, 30, seed=3)
    assert generate(120, 30, seed=3) != generate(120, 30, seed=4)
    assert generate_with_report(120, 30, seed=3) == generate_with_report(120, 30, seed=3)
    assert generate_with_report(120, 30, seed=3)[:2] == generate(120, 30, seed=3)


def test_sizes_and_stable_ids(splits, examples):
    train, held_out = splits
    assert (len(train), len(held_out)) == (400, 100)
    assert len({example.id for example in examples}) == len(examples)
    for example in examples:
        assert re.fullmatch(r"[a-z]+-\d{4}", example.id)
        assert example.id.rsplit("-", 1)[0] == example.domain
        assert example.dialect == "sqlite" and example.database is None


def test_at_least_six_domains_all_used(examples):
    assert len(DOMAINS) >= 6
    assert set(Counter(example.domain for example in examples)) == set(DOMAINS)


def test_few_schemas_each_with_two_to_four_tables_and_foreign_keys(examples):
    schemas = {example.schema for example in examples}
    assert len(schemas) <= 3 * len(DOMAINS)
    for schema, connection in sqlite_databases(examples).items():
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert 2 <= len(tables) <= 4
        assert "FOREIGN KEY" in schema
        for table in tables:
            assert 10 <= connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] <= 40
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []


def test_every_template_kind_is_present(examples):
    features = Counter()
    for example in examples:
        tree = sqlglot.parse_one(example.gold, read="sqlite")
        select = tree if isinstance(tree, exp.Select) else tree.find(exp.Select)
        features["filter"] += bool(select.args.get("where")) and not tree.find(exp.Join, exp.Subquery, exp.Group)
        features["count"] += bool(tree.find(exp.Count))
        features["aggregate"] += bool(tree.find(exp.Sum, exp.Avg, exp.Min, exp.Max))
        features["group_by"] += bool(tree.find(exp.Group))
        features["having"] += bool(tree.find(exp.Having))
        features["order_limit"] += bool(tree.find(exp.Order) and tree.find(exp.Limit))
        features["distinct"] += bool(tree.find(exp.Distinct))
        features["join"] += bool(tree.find(exp.Join))
        features["subquery_in"] += any(node.find(exp.Select) for node in tree.find_all(exp.In))
        features["subquery_scalar"] += any(isinstance(node.expression, exp.Subquery) for node in tree.find_all(exp.GT, exp.LT, exp.EQ))
    assert set(TEMPLATE_KINDS) == set(features)
    assert all(count >= 5 for count in features.values()), features


def test_every_gold_runs_and_returns_a_value(examples):
    databases = sqlite_databases(examples)
    for example in examples:
        rows = databases[example.schema].execute(example.gold).fetchall()
        assert any(value is not None for row in rows for value in row), example


def test_splits_share_no_question(splits, examples):
    train, held_out = splits

    def normalised(example):
        return " ".join(example.question.lower().split())

    assert not {normalised(e) for e in train} & {normalised(e) for e in held_out}
    assert len({normalised(e) for e in examples}) == len(examples)


def test_limit_queries_break_ties_by_id(examples):
    limited = [sqlglot.parse_one(e.gold) for e in examples if " LIMIT " in e.gold]
    assert limited
    for tree in limited:
        keys = tree.args["order"].expressions
        assert len(keys) >= 2 and keys[-1].this.name == "id"


def test_schema_and_gold_transpile_to_postgres_and_mysql(examples):
    for schema in {example.domain: example.schema for example in examples}.values():
        for dialect in ("postgres", "mysql"):
            assert len(sqlglot.transpile(schema, read="sqlite", write=dialect)) >= 4
    for example in examples[:100]:
        for dialect in ("postgres", "mysql"):
            sqlglot.transpile(example.gold, read="sqlite", write=dialect)


def test_domain_selection():
    train, held_out = generate(20, 5, domains=["library", "movies"])
    assert {example.domain for example in train + held_out} == {"library", "movies"}
    with pytest.raises(ValueError, match="unknown domain.*nowhere"):
        generate(1, 1, domains=["nowhere"])
    with pytest.raises(ValueError, match="non-negative"):
        generate(-1, 1)


def test_exhausted_question_space_raises(monkeypatch):
    monkeypatch.setattr(generator, "_PATIENCE", 1)
    with pytest.raises(ValueError, match="distinct questions could be generated"):
        generate(10**6, 0, domains=["hr"])


def test_held_out_golds_are_never_training_golds():
    """A paraphrase of a training question in the held-out split would be scored on a query the model was
    trained to write. One domain and many training examples is where that happened (22 of 100 held-out golds)."""
    train, held_out = generate(2000, 100, seed=0, domains=["retail"])
    assert not {e.gold for e in train} & {e.gold for e in held_out}
    assert len({e.gold for e in train + held_out}) == len(train) + len(held_out)


def test_two_thousand_examples_are_generated():
    train, held_out = generate(1600, 400)
    assert (len(train), len(held_out)) == (1600, 400)


_REVERSED = {exp.GT: exp.LTE, exp.LTE: exp.GT, exp.LT: exp.GTE, exp.GTE: exp.LT, exp.EQ: exp.NEQ, exp.NEQ: exp.EQ}


@pytest.fixture(scope="module")
def held_out_seed_0():
    return generate(0, 300, seed=0)[1]


def _changes_result(connection, example, tree) -> bool:
    gold = connection.execute(example.gold).fetchall()
    try:
        rows = connection.execute(tree.sql(dialect="sqlite")).fetchall()
    except sqlite3.Error:
        return True
    return not results_match(gold, rows, ordered=bool(tree.args.get("order")))


def test_no_held_out_example_survives_dropping_its_where(held_out_seed_0):
    """A question hinges on its filter: without the WHERE the gold gives other rows on its own database."""
    databases = sqlite_databases(held_out_seed_0)
    checked = 0
    for example in held_out_seed_0:
        tree = sqlglot.parse_one(example.gold, read="sqlite")
        if tree.args.get("where"):
            checked += 1
            tree.set("where", None)
            assert _changes_result(databases[example.schema], example, tree), example
    assert checked > 150


def test_no_held_out_example_survives_reversing_its_first_comparison(held_out_seed_0):
    """Reversing the first comparison outside a JOIN's ON (``>`` to ``<=``, ``=`` to ``<>``...) changes the rows."""
    databases = sqlite_databases(held_out_seed_0)
    checked = 0
    for example in held_out_seed_0:
        tree = sqlglot.parse_one(example.gold, read="sqlite")
        comparisons = [
            node for node in tree.walk()
            if isinstance(node, tuple(_REVERSED)) and node.find_ancestor(exp.Join) is None
        ]
        if comparisons:
            checked += 1
            first = comparisons[0]
            first.replace(_REVERSED[type(first)](this=first.this.copy(), expression=first.expression.copy()))
            assert _changes_result(databases[example.schema], example, tree), example
    assert checked > 200


def test_redrawn_degenerate_candidates_are_counted_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger=generator.__name__):
        train, held_out, report = generate_with_report(0, 300, seed=0)
    assert (len(train), len(held_out)) == (0, 300) and report.kept == 300
    assert report.degenerate > 0
    assert report.candidates == report.kept + report.unfit + report.repeated + report.empty + report.degenerate
    assert f"redrew {report.degenerate} degenerate" in caplog.text


def test_the_tiny_study_dataset_still_generates():
    """The dataset of studies/text2sql-tiny.toml (one domain) has room for its examples without degenerate ones."""
    import tomllib
    from pathlib import Path

    dataset = tomllib.loads((Path(__file__).parents[2] / "studies" / "text2sql-tiny.toml").read_text())["dataset"]
    domain = dataset["source"].removeprefix("synthetic:")
    train, held_out, report = generate_with_report(dataset["n_train"], dataset["n_eval"], seed=dataset["seed"], domains=[domain])
    assert (len(train), len(held_out)) == (dataset["n_train"], dataset["n_eval"]) and report.degenerate > 0


def test_shifts_are_the_nearest_constants_that_change_a_condition():
    assert generator._shifts(">", 5, [3, 5, 5, 8]) == (4, 8)
    assert generator._shifts(">=", 5, [3, 5, 5, 8]) == (3, 6)
    assert generator._shifts("<", 10, [9.37, 12.5, 20.0]) == (9, 13)
    assert generator._shifts("<=", 2, [5, 6]) == (5,)  # no smaller number changes anything


def test_a_predicate_that_does_not_matter_is_degenerate():
    connection = sqlite3.connect(":memory:")
    connection.executescript(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, kind TEXT, size INTEGER);"
        "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2), (3, 'a', 5), (4, 'b', 6), (5, 'b', 7);"
    )
    sizes = [1, 2, 5, 6, 7]

    def degenerate(*where, select="SELECT DISTINCT kind FROM t"):
        query = generator._Query(select, where)
        return generator._degenerate(connection, query, connection.execute(query.sql).fetchall())

    def size(op, constant, shifted=True):
        shifts = generator._shifts(op, constant, sizes) if shifted else ()
        return generator._Comparison("size", op, str(constant), shifts)

    assert degenerate(size(">", 1))  # every kind with the filter or without: it is decorative
    # ids 4 and 5; dropped, reversed (< 6) or shifted (>= 5, >= 7), other ids
    assert not degenerate(size(">=", 6), select="SELECT id FROM t")
    # 'size > 6' keeps only kind 'b', and so does 'size > 5', the nearest constant below that changes a row's truth
    assert not degenerate(size(">", 6, shifted=False))
    assert degenerate(size(">", 6))
    # Two conditions: each is dropped alone, and the WHERE whole; 'kind = b' adds nothing to 'size >= 6'.
    assert degenerate(size(">=", 6), generator._Comparison("kind", "=", "'b'"), select="SELECT id FROM t")
    # A predicate repeated in a subquery is varied in every place at once.
    kind_a = generator._Comparison("kind", "=", "'a'")
    inner = generator._Query("SELECT MAX(size) FROM t", (kind_a,))
    query = generator._Query("SELECT id FROM t", (kind_a, generator._Comparison("size", "=", inner)))
    assert query.sql == "SELECT id FROM t WHERE kind = 'a' AND size = (SELECT MAX(size) FROM t WHERE kind = 'a')"
    variants = {variant.sql for variant in query.variants()}
    assert "SELECT id FROM t WHERE kind <> 'a' AND size = (SELECT MAX(size) FROM t WHERE kind <> 'a')" in variants
    assert "SELECT id FROM t WHERE size = (SELECT MAX(size) FROM t)" in variants
    assert "SELECT id FROM t" in variants
    assert "SELECT id FROM t WHERE kind = 'a' AND size <> (SELECT MAX(size) FROM t WHERE kind = 'a')" in variants


def _same_rows(got, want, ordered):
    def normal(rows):
        return [tuple(round(float(v), 4) if isinstance(v, (int, float)) or type(v).__name__ == "Decimal" else v for v in row) for row in rows]

    got, want = normal(got), normal(want)
    if not ordered:
        got, want = sorted(got, key=repr), sorted(want, key=repr)
    return len(got) == len(want) and all(
        math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b
        for row_a, row_b in zip(got, want)
        for a, b in zip(row_a, row_b)
    )


@pytest.mark.parametrize(
    "server, dialect",
    [pytest.param("postgres_url", "postgres", marks=pytest.mark.postgres), pytest.param("mariadb_url", "mysql", marks=pytest.mark.mariadb)],
)
def test_gold_gives_the_same_rows_on_servers(request, server, dialect):
    """The portability promise: each gold query returns the same rows on PostgreSQL and MariaDB as on SQLite."""
    from sqlalchemy import create_engine, text

    url = request.getfixturevalue(server)
    train, _ = generate(80, 0, seed=11, domains=["retail", "movies"])
    databases = sqlite_databases(train)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            for number, (schema, lite) in enumerate(databases.items()):
                namespace = f"t2s_generator_check_{number}"
                if dialect == "postgres":
                    connection.execute(text(f"DROP SCHEMA IF EXISTS {namespace} CASCADE"))
                    connection.execute(text(f"CREATE SCHEMA {namespace}"))
                    connection.execute(text(f"SET search_path TO {namespace}"))
                else:
                    connection.execute(text(f"DROP DATABASE IF EXISTS {namespace}"))
                    connection.execute(text(f"CREATE DATABASE {namespace}"))
                    connection.execute(text(f"USE {namespace}"))
                try:
                    for statement in sqlglot.transpile(schema, read="sqlite", write=dialect):
                        connection.exec_driver_sql(statement)
                    for example in (e for e in train if e.schema == schema):
                        query = sqlglot.transpile(example.gold, read="sqlite", write=dialect)[0]
                        got = connection.exec_driver_sql(query).fetchall()
                        want = lite.execute(example.gold).fetchall()
                        assert _same_rows(got, want, "ORDER BY" in example.gold), example.gold
                finally:
                    drop = "SCHEMA" if dialect == "postgres" else "DATABASE"
                    connection.execute(text(f"DROP {drop} {namespace}{' CASCADE' if dialect == 'postgres' else ''}"))
                    connection.commit()
    finally:
        engine.dispose()

"""Perturbed predictions: each kind does what it says on SQLite, dressed like model output."""

from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter

import pytest

from env.text2sql.data import MIX, PREDICTION_KINDS, Prediction, generate, perturb, perturbed_predictions
from env.text2sql.example import Example
from env.text2sql.extract import extract_sql

from .cases import sqlite_databases


@pytest.fixture(scope="module")
def examples():
    train, _ = generate(150, 0, seed=5)
    return train


@pytest.fixture(scope="module")
def databases(examples):
    return sqlite_databases(examples)


def _rows(connection, sql):
    return sorted(map(repr, connection.execute(sql).fetchall()))


@pytest.mark.parametrize("kind", PREDICTION_KINDS)
def test_each_kind_behaves_as_labelled_on_sqlite(examples, databases, kind):
    rng = random.Random(1)
    outcomes = Counter()
    for example in examples:
        connection = databases[example.schema]
        made, text = perturb(example, rng, kind)
        assert made == kind
        try:
            rows = _rows(connection, extract_sql(text))
        except sqlite3.Error:
            outcomes["error"] += 1
            continue
        outcomes["match" if rows == _rows(connection, example.gold) else "differs"] += 1
    if kind == "correct":
        assert outcomes == {"match": len(examples)}
    elif kind == "non_executing":
        assert outcomes == {"error": len(examples)}
    else:
        assert outcomes["error"] == 0
        assert outcomes["differs"] >= 0.8 * len(examples), outcomes


def test_predictions_are_dressed_like_model_output(examples):
    texts = [prediction.text for prediction in perturbed_predictions(examples[:60], seed=2, per_example=4)]
    assert any(text.startswith("```sql\n") for text in texts)
    assert any(text.startswith("Here is the query:") for text in texts)
    assert any("<think>" in text for text in texts)
    assert any(re.search(r";\s*(```|$)", text) for text in texts)  # a trailing semicolon, as models write
    assert any(extract_sql(text).startswith("select ") for text in texts)
    assert any("\nFROM" in extract_sql(text) or "\nfrom" in extract_sql(text) for text in texts)


def test_perturbed_predictions_mix_is_deterministic(examples):
    some = examples[:50]
    predictions = perturbed_predictions(some, seed=3, per_example=4)
    assert len(predictions) == 4 * len(some)
    assert all(isinstance(p, Prediction) for p in predictions)
    assert [p.example for p in predictions[:4]] == [some[0]] * 4
    kinds = Counter(p.kind for p in predictions)
    assert set(kinds) == set(PREDICTION_KINDS)
    assert kinds["correct"] > kinds["wrong"]
    assert predictions == perturbed_predictions(some, seed=3, per_example=4)
    assert predictions != perturbed_predictions(some, seed=4, per_example=4)


def test_near_miss_edits():
    schema = (
        "CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\n"
        "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, price REAL NOT NULL, author_id INTEGER NOT NULL,"
        " FOREIGN KEY (author_id) REFERENCES authors (id));"
    )
    seen = set()
    for gold in (
        "SELECT MAX(price) FROM books",
        "SELECT title FROM books ORDER BY price DESC, id LIMIT 3",
        "SELECT title FROM books WHERE price > 20 AND title = 'Dune'",
    ):
        example = Example(id="x", question="q", schema=schema, gold=gold)
        rng = random.Random(0)
        for _ in range(30):
            kind, text = perturb(example, rng, "near_miss")
            assert kind == "near_miss"
            seen.add(extract_sql(text))
    joined = "\n".join(seen)
    assert re.search(r"MIN\(price\)", joined, flags=re.IGNORECASE)
    assert re.search(r"LIMIT (2|4)\b", joined, flags=re.IGNORECASE)
    assert "'dune'" in joined or "'DUNE'" in joined
    assert re.search(r"where price > 20\s*$", joined, flags=re.IGNORECASE | re.MULTILINE)


def test_unparseable_gold_and_ddl_only_schema_still_work():
    schema = "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT);\nCREATE TABLE concert (concert_id INTEGER, theme TEXT)"
    example = Example(id="s", question="q", schema=schema, gold="SELECT name FROM singer WHERE (((")
    rng = random.Random(0)
    for kind in PREDICTION_KINDS:
        made, text = perturb(example, rng, kind)
        assert made in (kind, "wrong") and text
    parsed = Example(id="s", question="q", schema=schema, gold="SELECT name FROM singer")
    assert all("concert" in perturb(parsed, rng, "wrong")[1] for _ in range(5))


def test_unknown_kind_and_mix():
    example = Example(id="x", question="q", schema="CREATE TABLE t (a INTEGER)", gold="SELECT a FROM t")
    with pytest.raises(ValueError, match="unknown prediction kind"):
        perturb(example, random.Random(0), "almost")
    assert abs(sum(MIX.values()) - 1) < 1e-9

"""Every sandbox rule of the embedded backend, and every malicious input in the spec."""

import hashlib
import sqlite3
import time

import pytest

from env.text2sql import Example, Limits, QueryFailed, Scorer, Verdict
from env.text2sql.backends.sqlite import SQLiteBackend

from .cases import CORRECT, MALICIOUS_SQLITE, SCHEMA, example


@pytest.fixture
def scorer():
    with Scorer(SQLiteBackend()) as scorer:
        yield scorer


def database_digest(backend, case):
    """A digest of every table's rows and the schema, read through the sandbox itself."""
    tables = backend.run(case, "SELECT name, sql FROM sqlite_master ORDER BY name")
    contents = [(name, sql, sorted(map(repr, backend.run(case, f'SELECT * FROM "{name}"')))) for name, sql in tables]
    return hashlib.sha256(repr(contents).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(MALICIOUS_SQLITE))
@pytest.mark.parametrize("strict_gate", [False, True], ids=["sandbox", "sandbox+gate"])
def test_malicious_input_fails_fast_with_the_floor_and_changes_nothing(tmp_path, name, strict_gate):
    with Scorer(SQLiteBackend(), strict_gate=strict_gate) as scorer:
        case = example()
        assert scorer.score(case, CORRECT).verdict is Verdict.MATCH
        before = database_digest(scorer.backend, case)
        files_before = set(tmp_path.rglob("*"))

        started = time.monotonic()
        result = scorer.score(case, MALICIOUS_SQLITE[name].format(tmp=tmp_path))
        elapsed = time.monotonic() - started

        assert result.verdict.is_failure, result
        assert result.reward == scorer.reward.floor
        assert result.error
        assert elapsed < 5, f"{name} took {elapsed:.1f}s"
        assert database_digest(scorer.backend, case) == before
        assert set(tmp_path.rglob("*")) == files_before, "no file may appear"
        again = scorer.score(case, f"{CORRECT} ")
        assert again.verdict is Verdict.MATCH


@pytest.mark.parametrize(
    ("name", "verdict"),
    [
        ("infinite recursive CTE", Verdict.TIMEOUT),
        ("9-way cross join", Verdict.TIMEOUT),
        ("9-way cross join rows", Verdict.RESOURCE_LIMIT),
        ("randomblob bomb", Verdict.RESOURCE_LIMIT),
        ("doubling string CTE", Verdict.RESOURCE_LIMIT),
        ("drop", Verdict.FORBIDDEN),
        ("stacked statements", Verdict.FORBIDDEN),
        ("vacuum into", Verdict.FORBIDDEN),
        ("attach", Verdict.FORBIDDEN),
        ("pragma read", Verdict.FORBIDDEN),
        ("printf bomb", Verdict.FORBIDDEN),
        ("load_extension", Verdict.FORBIDDEN),
        ("2 MB literal", Verdict.RESOURCE_LIMIT),
        ("NUL bytes", Verdict.INVALID),
    ],
)
def test_each_limit_reports_its_own_verdict(scorer, name, verdict):
    assert scorer.score(example(), MALICIOUS_SQLITE[name].format(tmp="/nonexistent")).verdict is verdict


def test_step_budget_is_deterministic():
    """The same query stops at the same point, whatever the machine's speed."""
    counting = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 100000) SELECT max(n) FROM r"
    small = Limits(vm_steps=50_000)
    with SQLiteBackend(small) as backend:
        with pytest.raises(Exception) as stopped:
            backend.run(example(), counting)
        assert stopped.value.verdict is Verdict.TIMEOUT
    with SQLiteBackend(Limits(vm_steps=50_000_000)) as backend:
        assert backend.run(example(), counting) == [(100000,)]


def test_row_cap():
    with Scorer(SQLiteBackend(Limits(max_rows=3))) as scorer:
        assert scorer.score(example(gold="SELECT id FROM projects"), "SELECT id FROM projects").verdict is Verdict.MATCH
        result = scorer.score(example(gold="SELECT id FROM projects"), "SELECT id FROM employees")
        assert result.verdict is Verdict.RESOURCE_LIMIT


def test_text_length_limit():
    with Scorer(SQLiteBackend(Limits(max_text_bytes=1_000))) as scorer:
        assert scorer.score(example(), "SELECT length(hex(randomblob(400)))").verdict is Verdict.MISMATCH
        assert scorer.score(example(), "SELECT hex(randomblob(600))").verdict is Verdict.RESOURCE_LIMIT


def test_schema_is_built_once_and_kept_while_in_use():
    """A script drawing random values shows every rebuild: the same backend answers the same until evicted."""
    drawn = example(schema="CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (random());", gold="SELECT x FROM t")
    with SQLiteBackend() as backend:
        first = backend.run(drawn, "SELECT x FROM t")
        backend.run(example(id="other", schema="CREATE TABLE u (y INTEGER);"), "SELECT 1")
        assert backend.run(drawn, "SELECT x FROM t") == first


def test_open_databases_are_bounded_and_evicted_ones_come_back():
    cases = [example(id=str(n), schema=f"CREATE TABLE t (x INTEGER); INSERT INTO t VALUES ({n});") for n in range(5)]
    with SQLiteBackend(max_open=2) as backend:
        for _ in range(2):
            assert [backend.run(case, "SELECT x FROM t") for case in cases] == [[(n,)] for n in range(5)]
        assert len(backend._connections) == 2


def test_image_databases_past_their_bound_refill_a_connection_and_answer_from_the_new_image():
    """A refilled connection answers from its new image's schema and data, and stays as locked as a new one."""
    scripts = ["CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);", "CREATE TABLE t (y INTEGER); INSERT INTO t VALUES (2);",
               "CREATE TABLE t (x INTEGER, z INTEGER); INSERT INTO t VALUES (3, 4);"]
    cases = [example(id=str(n), schema=script) for n, script in enumerate(scripts)]
    with SQLiteBackend(max_images_open=1) as backend:
        for case, script in zip(cases, scripts):
            with sqlite3.connect(":memory:") as builder:
                builder.executescript(script)
                backend.offer_image(case, builder.serialize())
            builder.close()
        for _ in range(2):
            assert backend.run(cases[0], "SELECT x FROM t") == [(1,)]
            with pytest.raises(QueryFailed, match="no such column: x"):
                backend.run(cases[1], "SELECT x FROM t")
            assert backend.run(cases[1], "SELECT * FROM t") == [(2,)]
            assert backend.run(cases[2], "SELECT x FROM t") == [(3,)]
            for write in ("DELETE FROM t", "INSERT INTO t VALUES (5, 6)", "ATTACH ':memory:' AS other", "PRAGMA query_only = OFF"):
                with pytest.raises(QueryFailed):
                    backend.run(cases[2], write)
            assert backend.run(cases[2], "SELECT * FROM t") == [(3, 4)]
        assert len(backend._image_connections) == 1


def test_a_database_file_is_opened_read_only_and_left_as_it_was(tmp_path):
    path = tmp_path / "given.sqlite"
    with sqlite3.connect(path) as builder:
        builder.executescript(SCHEMA)
    builder.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    case = Example(id="file", question="", schema="", gold=CORRECT, database=str(path))
    with Scorer(SQLiteBackend()) as scorer:
        assert scorer.score(case, CORRECT).verdict is Verdict.MATCH
        for name in ("delete", "update", "drop", "vacuum", "pragma"):
            assert scorer.score(case, MALICIOUS_SQLITE[name]).verdict.is_failure
        assert scorer.score(case, f"{CORRECT} ").verdict is Verdict.MATCH
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_broken_schema_is_a_gold_error_not_a_penalty(scorer):
    broken = example(schema="CREATE TABLE t (;")
    result = scorer.score(broken, "SELECT 1")
    assert result.verdict is Verdict.GOLD_ERROR
    assert result.reward == 0.0


def test_a_failing_gold_query_is_a_gold_error(scorer):
    result = scorer.score(example(gold="SELECT missing FROM employees"), "SELECT 1")
    assert result.verdict is Verdict.GOLD_ERROR
    assert "no such column" in result.error


def test_runtime_and_syntax_errors_are_told_apart(scorer):
    assert scorer.score(example(), "SELECT nope FROM employees").verdict is Verdict.RUNTIME_ERROR
    assert scorer.score(example(), "SELECT FROM WHERE").verdict is Verdict.SYNTAX_ERROR
    assert scorer.score(example(), "Sorry, I cannot help with that.").verdict is Verdict.SYNTAX_ERROR
    assert scorer.score(example(), "").verdict is Verdict.INVALID

"""Every sandbox rule of the embedded backend, and every malicious input in the spec."""

import hashlib
import time

import pytest

from env.text2sql import Limits, Scorer, Verdict
from env.text2sql.backends.sqlite import SQLiteBackend

from .cases import CORRECT, MALICIOUS_SQLITE, example


@pytest.fixture
def scorer(tmp_path):
    with Scorer(SQLiteBackend(cache_dir=tmp_path / "dbs")) as scorer:
        yield scorer


def database_digest(tmp_path):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted((tmp_path / "dbs").glob("*.sqlite"))}


@pytest.mark.parametrize("name", sorted(MALICIOUS_SQLITE))
@pytest.mark.parametrize("strict_gate", [False, True], ids=["sandbox", "sandbox+gate"])
def test_malicious_input_fails_fast_with_the_floor_and_changes_nothing(tmp_path, name, strict_gate):
    with Scorer(SQLiteBackend(cache_dir=tmp_path / "dbs"), strict_gate=strict_gate) as scorer:
        case = example()
        assert scorer.score(case, CORRECT).verdict is Verdict.MATCH
        before = database_digest(tmp_path)
        files_before = set(tmp_path.rglob("*"))

        started = time.monotonic()
        result = scorer.score(case, MALICIOUS_SQLITE[name].format(tmp=tmp_path))
        elapsed = time.monotonic() - started

        assert result.verdict.is_failure, result
        assert result.reward == scorer.reward.floor
        assert result.error
        assert elapsed < 5, f"{name} took {elapsed:.1f}s"
        assert database_digest(tmp_path) == before
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


def test_step_budget_is_deterministic(tmp_path):
    """The same query stops at the same point, whatever the machine's speed."""
    counting = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 100000) SELECT max(n) FROM r"
    small = Limits(vm_steps=50_000)
    with SQLiteBackend(small, cache_dir=tmp_path) as backend:
        with pytest.raises(Exception) as stopped:
            backend.run(example(), counting)
        assert stopped.value.verdict is Verdict.TIMEOUT
    with SQLiteBackend(Limits(vm_steps=50_000_000), cache_dir=tmp_path) as backend:
        assert backend.run(example(), counting) == [(100000,)]


def test_row_cap(tmp_path):
    with Scorer(SQLiteBackend(Limits(max_rows=3), cache_dir=tmp_path)) as scorer:
        assert scorer.score(example(gold="SELECT id FROM projects"), "SELECT id FROM projects").verdict is Verdict.MATCH
        result = scorer.score(example(gold="SELECT id FROM projects"), "SELECT id FROM employees")
        assert result.verdict is Verdict.RESOURCE_LIMIT


def test_text_length_limit(tmp_path):
    with Scorer(SQLiteBackend(Limits(max_text_bytes=1_000), cache_dir=tmp_path)) as scorer:
        assert scorer.score(example(), "SELECT length(hex(randomblob(400)))").verdict is Verdict.MISMATCH
        assert scorer.score(example(), "SELECT hex(randomblob(600))").verdict is Verdict.RESOURCE_LIMIT


def test_schema_is_built_once_and_reused(tmp_path):
    with SQLiteBackend(cache_dir=tmp_path) as backend:
        backend.run(example(id="a"), "SELECT 1")
        backend.run(example(id="b", gold="SELECT 2"), "SELECT 1")
        assert len(list(tmp_path.glob("*.sqlite"))) == 1
    with SQLiteBackend(cache_dir=tmp_path) as other:
        built = next(tmp_path.glob("*.sqlite"))
        mtime = built.stat().st_mtime_ns
        assert other.run(example(), "SELECT count(*) FROM employees") == [(4,)]
        assert built.stat().st_mtime_ns == mtime


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

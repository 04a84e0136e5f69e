"""The same verdicts on SQLite, PostgreSQL and MariaDB for a shared set of cases."""

import pytest

from env.text2sql import Limits, Scorer, Verdict

from .cases import CORRECT, example

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"

CASES = [
    (CORRECT, Verdict.MATCH),
    ("SELECT e.name FROM employees AS e WHERE e.salary > 90 ORDER BY e.name", Verdict.MATCH),
    ("SELECT name FROM employees WHERE salary > 90 ORDER BY name DESC", Verdict.MISMATCH),
    # Same rows on the example's own database; the test suite tells it apart from "> 90".
    ("SELECT name FROM employees WHERE salary >= 99 ORDER BY name", Verdict.MISMATCH),
    ("SELECT name FROM employees WHERE salary > 100 ORDER BY name", Verdict.MISMATCH),
    ("SELECT name FROM employees WHERE name = 'ada' ORDER BY name", Verdict.MISMATCH),
    ("SELECT nme FROM employees", Verdict.RUNTIME_ERROR),
    ("SELECT name FROM missing_table", Verdict.RUNTIME_ERROR),
    ("SELECT name FROM employees WHERE", Verdict.SYNTAX_ERROR),
    ("DROP TABLE employees", Verdict.FORBIDDEN),
    ("DELETE FROM employees", Verdict.FORBIDDEN),
    ("UPDATE employees SET salary = 0", Verdict.FORBIDDEN),
    ("INSERT INTO employees VALUES (9, 'Eve', 'x', 1)", Verdict.FORBIDDEN),
    ("SELECT 1; DROP TABLE employees", Verdict.FORBIDDEN),
    ("CREATE TABLE copy AS SELECT * FROM employees", Verdict.FORBIDDEN),
    ("", Verdict.INVALID),
]

AGGREGATES = [
    ("SELECT dept, COUNT(*) FROM employees GROUP BY dept", "SELECT COUNT(*), dept FROM employees GROUP BY dept", Verdict.MATCH),
    ("SELECT AVG(salary) FROM employees", "SELECT SUM(salary) / COUNT(salary) FROM employees", Verdict.MATCH),
    ("SELECT name FROM employees WHERE dept IS NULL", "SELECT name FROM employees WHERE dept = NULL", Verdict.MISMATCH),
    (
        "SELECT e.name, COUNT(p.id) FROM employees e JOIN projects p ON p.owner_id = e.id GROUP BY e.name",
        "SELECT e.name, COUNT(*) FROM projects p JOIN employees e ON e.id = p.owner_id GROUP BY e.name",
        Verdict.MATCH,
    ),
    (
        "SELECT name FROM employees WHERE salary > (SELECT AVG(salary) FROM employees) ORDER BY salary DESC",
        "SELECT name FROM employees WHERE salary > 92 ORDER BY salary DESC",  # the average here, not everywhere
        Verdict.MISMATCH,
    ),
]


def _backend_or_skip(spec):
    scorer = Scorer(spec, limits=Limits(timeout_s=2))
    try:
        scorer.backend.run(example(), "SELECT 1")
    except ConnectionError as error:
        scorer.close()
        pytest.skip(f"{spec.split('://')[0]} server not reachable: {error}")
    return scorer


@pytest.fixture(scope="module", params=["sqlite", POSTGRES_URL, MARIADB_URL], ids=["sqlite", "postgres", "mariadb"])
def scorer(request):
    scorer = _backend_or_skip(request.param)
    yield scorer
    scorer.close()


@pytest.mark.parametrize(("prediction", "verdict"), CASES)
def test_shared_cases_get_the_same_verdict(scorer, prediction, verdict):
    assert scorer.score(example(), prediction).verdict is verdict


@pytest.mark.parametrize(("gold", "prediction", "verdict"), AGGREGATES)
def test_aggregates_and_joins_agree(scorer, gold, prediction, verdict):
    assert scorer.score(example(gold=gold), prediction).verdict is verdict


def test_correct_query_still_matches_after_the_attacks(scorer):
    for prediction, _ in CASES:
        scorer.score(example(), prediction)
    assert scorer.score(example(), CORRECT).verdict is Verdict.MATCH
    assert scorer.score(example(gold="SELECT COUNT(*) FROM employees"), "SELECT COUNT(*) FROM employees").verdict is Verdict.MATCH


SERVER_ATTACKS = {
    "postgres": [
        "SELECT pg_sleep(30)",
        "WITH d AS (DELETE FROM employees RETURNING *) SELECT * FROM d",
        "SELECT set_config('search_path', 'public', false)",
        "SELECT repeat('x', 1000000000)",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r",
        "COPY employees TO '/tmp/stolen.csv'",
    ],
    "mysql": [
        "SELECT SLEEP(30)",
        "SELECT BENCHMARK(10000000000, MD5('x'))",
        "SELECT LOAD_FILE('/etc/passwd')",
        "SELECT * FROM employees INTO OUTFILE '/tmp/stolen.csv'",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r",
    ],
    "sqlite": [],
}
PORTABLE_ATTACKS = [
    "SELECT " + "(" * 20_000 + "1" + ")" * 20_000,
    "SELECT '" + "x" * 2_000_000 + "'",
    "SELECT 1;" * 50_000,
    "SELECT name FROM employees\x00; DROP TABLE employees",
    "SELECT * FROM employees a, employees b, employees c, employees d, employees e, employees f, employees g, employees h, employees i",
]


def test_attacks_fail_fast_with_the_floor_and_the_database_survives(scorer):
    import time

    dialect = scorer.backend.dialect
    for attack in SERVER_ATTACKS[dialect] + PORTABLE_ATTACKS:
        started = time.monotonic()
        result = scorer.score(example(), attack, dialect=dialect)
        assert result.verdict.is_failure, (attack[:60], result)
        assert result.reward == scorer.reward.floor
        assert time.monotonic() - started < 5, attack[:60]
    assert scorer.score(example(gold="SELECT COUNT(*) FROM employees"), "SELECT COUNT(*) FROM employees").verdict is Verdict.MATCH
    assert scorer.score(example(), CORRECT).verdict is Verdict.MATCH


SUITE_GOLDS = [
    CORRECT,
    "SELECT dept, COUNT(*) FROM employees WHERE salary > 75 GROUP BY dept HAVING COUNT(*) >= 1",
    "SELECT e.name, p.title FROM employees AS e JOIN projects AS p ON p.owner_id = e.id WHERE e.salary < 100",
]


@pytest.mark.parametrize("gold", SUITE_GOLDS)
def test_the_test_suite_verdict_agrees_with_sqlite_on_neighbours(scorer, gold):
    """Every neighbour of the gold, and the gold itself, matches on this backend's build of the suite exactly when on SQLite's.

    Match or not is compared, not the failure code: a bare column under GROUP BY runs on SQLite and MariaDB
    and is an error on PostgreSQL, and either way it is not a match."""
    from env.text2sql.suite import example_neighbours

    case = example(gold=gold)
    predictions = [gold] + [n.sql for n in example_neighbours(case)]
    with Scorer() as reference:
        expected = [reference.score(case, sql).execution_match for sql in predictions]
    got = [scorer.score(case, sql).execution_match for sql in predictions]
    assert got == expected
    assert expected[0] and expected.count(False) > len(predictions) // 2
    assert scorer.score(case, gold).databases == 4

import pytest
import sqlglot

from env.text2sql.backends.base import QueryFailed
from env.text2sql.gate import is_ordered, parse_query, to_dialect, translate_script
from env.text2sql.verdict import Verdict


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a, COUNT(*) FROM t JOIN u ON t.id = u.tid WHERE a LIKE 'x%' GROUP BY a HAVING COUNT(*) > 1 ORDER BY 2 DESC LIMIT 3",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT n FROM r",
        "SELECT CASE WHEN x IS NULL THEN 0 ELSE CAST(x AS REAL) END FROM t WHERE y IN (SELECT y FROM u) AND NOT EXISTS (SELECT 1 FROM v)",
        "SELECT a FROM t UNION SELECT b FROM u EXCEPT SELECT c FROM v",
        "SELECT ROW_NUMBER() OVER (PARTITION BY a ORDER BY b) FROM t",
        "SELECT strftime('%Y', d), substr(s, 1, 2), coalesce(x, 0), abs(-1), round(avg(x), 2) FROM t",
    ],
)
def test_read_only_queries_pass(sql):
    assert parse_query(sql, "sqlite") is not None


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        ("VACUUM", "sqlite"),
        ("VACUUM INTO '/tmp/x.db'", "sqlite"),
        ("REPLACE INTO t VALUES (1)", "sqlite"),
        ("DROP TABLE t", "sqlite"),
        ("DELETE FROM t", "sqlite"),
        ("UPDATE t SET a = 1", "sqlite"),
        ("INSERT INTO t VALUES (1)", "sqlite"),
        ("CREATE TABLE x AS SELECT * FROM t", "sqlite"),
        ("CREATE TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM t; END", "sqlite"),
        ("PRAGMA writable_schema = 1", "sqlite"),
        ("ATTACH 'x.db' AS x", "sqlite"),
        ("BEGIN", "sqlite"),
        ("SELECT 1; SELECT 2", "sqlite"),
        ("SELECT load_extension('evil')", "sqlite"),
        ("SELECT printf('%.*c', 900000000, 'x')", "sqlite"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "postgres"),
        ("SELECT * INTO copy FROM t", "postgres"),
        ("SELECT * FROM t FOR UPDATE", "postgres"),
        ("SELECT pg_sleep(10)", "postgres"),
        ("SELECT pg_read_file('/etc/passwd')", "postgres"),
        ("SELECT set_config('role', 'postgres', false)", "postgres"),
        ("SET search_path TO public", "postgres"),
        ("SELECT SLEEP(10)", "mysql"),
        ("SELECT LOAD_FILE('/etc/passwd')", "mysql"),
    ],
)
def test_writes_ddl_and_dangerous_functions_are_forbidden(sql, dialect):
    with pytest.raises(QueryFailed) as failure:
        parse_query(sql, dialect)
    assert failure.value.verdict is Verdict.FORBIDDEN


def test_syntax_errors_and_deep_nesting_are_classified():
    with pytest.raises(QueryFailed) as syntax:
        parse_query("SELECT * FROM t WHERE", "sqlite")
    assert syntax.value.verdict is Verdict.SYNTAX_ERROR
    with pytest.raises(QueryFailed) as nested:
        parse_query("SELECT " + "(" * 20_000 + "1" + ")" * 20_000, "sqlite")
    assert nested.value.verdict is Verdict.RESOURCE_LIMIT


@pytest.mark.parametrize(
    ("sql", "ordered"),
    [
        ("SELECT a FROM t ORDER BY a", True),
        ("SELECT a FROM t", False),
        ("SELECT a FROM t LIMIT 3", False),
        ("SELECT * FROM (SELECT a FROM t ORDER BY a)", False),
        ("SELECT a FROM t WHERE a IN (SELECT b FROM u ORDER BY b LIMIT 1)", False),
        ("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1", True),
        ("WITH c AS (SELECT a FROM t ORDER BY a) SELECT a FROM c", False),
        ("WITH c AS (SELECT a FROM t) SELECT a FROM c ORDER BY a DESC", True),
        ("(SELECT a FROM t ORDER BY a)", True),
        ("SELECT 'ORDER BY' AS note FROM t", False),
    ],
)
def test_order_matters_only_for_the_outermost_order_by(sql, ordered):
    assert is_ordered(sqlglot.parse_one(sql, read="sqlite")) is ordered


def test_transpiles_between_dialects():
    tree = parse_query("SELECT TOP 2 name FROM t", "tsql")
    assert to_dialect(tree, "sqlite") == "SELECT name FROM t LIMIT 2"
    script = translate_script("CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT); INSERT INTO t VALUES (1, 'a');", "sqlite", "postgres")
    assert script.count(";") == 2 and "CREATE TABLE t" in script

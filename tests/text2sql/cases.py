"""Shared schema and malicious inputs for the sandbox tests on every backend."""

import sqlite3

from env.text2sql.example import Example

SCHEMA = """
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT NOT NULL, dept TEXT, salary REAL);
INSERT INTO employees VALUES (1, 'Ada', 'eng', 120.5), (2, 'Brook', 'eng', 99.0), (3, 'Cy', 'ops', 80.0), (4, 'Dee', NULL, 70.0);
CREATE TABLE projects (id INTEGER PRIMARY KEY, owner_id INTEGER, title TEXT);
INSERT INTO projects VALUES (1, 1, 'compiler'), (2, 1, 'parser'), (3, 3, 'pager');
"""

CORRECT = "SELECT name FROM employees WHERE salary > 90 ORDER BY name"


def example(gold: str = CORRECT, schema: str = SCHEMA, id: str = "case") -> Example:
    return Example(id=id, question="Who earns more than 90?", schema=schema, gold=gold)


# Inputs every backend must refuse quickly with a failure verdict (DESIGN.md section 4).
MALICIOUS_SQLITE = {
    "infinite recursive CTE": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r",
    "9-way cross join": "SELECT count(*) FROM employees a, employees b, employees c, employees d, employees e, employees f, employees g, employees h, employees i, projects j, projects k, projects l",
    "9-way cross join rows": "SELECT * FROM employees a, employees b, employees c, employees d, employees e, employees f, employees g, employees h, employees i",
    "randomblob bomb": "SELECT randomblob(1000000000)",
    "zeroblob bomb": "SELECT length(zeroblob(1000000000))",
    "printf bomb": "SELECT printf('%.*c', 900000000, 'x')",
    "format bomb": "SELECT format('%.*c', 900000000, 'x')",
    "doubling string CTE": "WITH RECURSIVE d(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM d) SELECT length(s) FROM d",
    "replace doubling": "WITH RECURSIVE d(s, n) AS (SELECT 'ab', 0 UNION ALL SELECT replace(s, 'a', s), n + 1 FROM d WHERE n < 60) SELECT max(length(s)) FROM d",
    "drop": "DROP TABLE employees",
    "delete": "DELETE FROM employees",
    "update": "UPDATE employees SET salary = 0",
    "insert": "INSERT INTO employees VALUES (9, 'Eve', 'x', 1)",
    "replace into": "REPLACE INTO employees VALUES (1, 'Eve', 'x', 1)",
    "stacked statements": "SELECT 1; DROP TABLE employees",
    "attach": "ATTACH DATABASE '{tmp}/attached.db' AS x",
    "vacuum into": "VACUUM INTO '{tmp}/stolen.db'",
    "vacuum": "VACUUM",
    "pragma": "PRAGMA writable_schema = ON",
    "pragma read": "PRAGMA table_info(employees)",
    "load_extension": "SELECT load_extension('/tmp/evil.so')",
    "create table as": "CREATE TABLE copy AS SELECT * FROM employees",
    "create temp table": "CREATE TEMP TABLE t AS SELECT 1",
    "trigger": "CREATE TRIGGER t AFTER INSERT ON employees BEGIN DELETE FROM employees; END",
    "transaction": "BEGIN IMMEDIATE",
    "20,000 nested parentheses": "SELECT " + "(" * 20_000 + "1" + ")" * 20_000,
    "2 MB literal": "SELECT '" + "x" * 2_000_000 + "'",
    "NUL bytes": "SELECT name FROM employees\x00; DROP TABLE employees",
    "50,000 stacked statements": "SELECT 1;" * 50_000,
}


def sqlite_databases(examples) -> dict[str, sqlite3.Connection]:
    """One in-memory database per distinct schema script, for checking gold queries directly."""
    databases: dict[str, sqlite3.Connection] = {}
    for item in examples:
        if item.schema not in databases:
            databases[item.schema] = sqlite3.connect(":memory:")
            databases[item.schema].executescript(item.schema)
    return databases

"""PostgreSQL and MariaDB backends against the real servers: build once, sandbox, verdicts."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from env.text2sql.backends.base import Limits, QueryFailed, schema_key
from env.text2sql.backends.server import MySQLBackend, PostgresBackend, ServerBackend, ServerUnavailable
from env.text2sql.example import Example
from env.text2sql.verdict import Verdict

ROWS = [(1, "apple 50%", 1.5), (2, "Banana", 2.25), (3, "cherry", None)]
CORRECT = "SELECT id, name, price FROM t ORDER BY id"

WRITES = [
    "DROP TABLE t",
    "DELETE FROM t",
    "UPDATE t SET name = 'x'",
    "INSERT INTO t VALUES (9, 'x', 0)",
    "CREATE TABLE t2 AS SELECT * FROM t",
]
STACKED = ["SELECT 1; DROP TABLE t", "SELECT 1; DELETE FROM t"]
OUT_OF_BOUNDS = {  # beyond the example's own tables
    "postgres": ["SELECT * FROM pg_authid", "SELECT set_config('role', 'postgres', false)"],
    "mysql": ["SELECT * FROM mysql.user", "SELECT * FROM test.t2s_builds", "SELECT 1 INTO OUTFILE '/tmp/t2s'"],
}
SLOW = {
    "postgres": ["SELECT pg_sleep(30)"],
    # An interrupted BENCHMARK() returns 0 rather than an error: the elapsed time gives it away.
    "mysql": ["SELECT SLEEP(30)", "SELECT BENCHMARK(1000000000, MD5('x'))"],
}
HUGE = {"postgres": "SELECT generate_series(1, 100000000)", "mysql": "SELECT seq FROM seq_1_to_100000000"}


def make_example(extra_rows: int = 0) -> Example:
    """A schema of its own (the uuid comment changes its key), so no test sees an earlier run."""
    values = ", ".join(f"({i}, 'row {i}', {i})" for i in range(100, 100 + extra_rows))
    schema = (
        f"-- run {uuid.uuid4()}\n"
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, price REAL);\n"
        "INSERT INTO t VALUES (1, 'apple 50%', 1.5), (2, 'Banana', 2.25), (3, 'cherry', NULL);\n"
        + (f"INSERT INTO t VALUES {values};\n" if values else "")
    )
    return Example(id="t", question="", schema=schema, gold=CORRECT)


def verdict_of(backend: ServerBackend, example: Example, sql: str) -> Verdict:
    with pytest.raises(QueryFailed) as failed:
        backend.run(example, sql)
    assert failed.value.message and "\n" not in failed.value.message and len(failed.value.message) <= 300
    return failed.value.verdict


def snapshot(admin: Engine, example: Example) -> tuple[list, list]:
    """The example's tables and rows, read by the admin login."""
    name = f"t2s_{schema_key(example)}"
    with admin.connect() as conn:
        tables = conn.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = :name ORDER BY 1"),
            {"name": name},
        ).all()
        return tables, conn.execute(text(f"SELECT * FROM {name}.t ORDER BY id")).all()


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def server(request: pytest.FixtureRequest) -> tuple[type[ServerBackend], str]:
    """The backend class and admin URL, for each server that is up."""
    if request.param == "postgres":
        return PostgresBackend, request.getfixturevalue("postgres_url")
    return MySQLBackend, request.getfixturevalue("mariadb_url")


@pytest.fixture
def backend(server: tuple[type[ServerBackend], str]) -> Iterator[ServerBackend]:
    cls, url = server
    with cls(url, Limits(timeout_s=1)) as backend:
        yield backend


@pytest.fixture
def admin(server: tuple[type[ServerBackend], str]) -> Iterator[Engine]:
    engine = create_engine(server[1])
    yield engine
    engine.dispose()


def test_correct_query_returns_driver_rows(backend: ServerBackend) -> None:
    example = make_example()
    assert backend.run(example, CORRECT) == ROWS
    assert backend.run(example, "SELECT name FROM t WHERE name = 'banana'") == []  # text compares exactly


def test_database_is_built_once_and_shared(server: tuple[type[ServerBackend], str], admin: Engine) -> None:
    cls, url = server
    example = make_example()
    count = "SELECT COUNT(*) FROM t"
    with cls(url) as first:
        assert first.run(example, count) == [(3,)]
        with admin.begin() as conn:  # a rebuild would lose this row
            conn.execute(text(f"INSERT INTO t2s_{schema_key(example)}.t VALUES (4, 'marker', 0)"))
        assert first.run(example, count) == [(4,)]
    with cls(url) as second:
        assert second.run(example, count) == [(4,)]


def test_slow_queries_time_out(backend: ServerBackend) -> None:
    example = make_example()
    for sql in SLOW[backend.dialect]:
        started = time.monotonic()
        assert verdict_of(backend, example, sql) is Verdict.TIMEOUT
        assert time.monotonic() - started < 4
    assert backend.run(example, CORRECT) == ROWS


@pytest.mark.parametrize("sql", WRITES + STACKED)
def test_writes_are_refused_and_change_nothing(backend: ServerBackend, admin: Engine, sql: str) -> None:
    example = make_example()
    backend.run(example, CORRECT)
    before = snapshot(admin, example)
    allowed = {Verdict.FORBIDDEN, Verdict.SYNTAX_ERROR} if sql in STACKED else {Verdict.FORBIDDEN}
    assert verdict_of(backend, example, sql) in allowed
    assert snapshot(admin, example) == before
    assert backend.run(example, CORRECT) == ROWS


def test_reader_sees_nothing_beyond_the_example(backend: ServerBackend) -> None:
    example = make_example()
    for sql in OUT_OF_BOUNDS[backend.dialect]:
        assert verdict_of(backend, example, sql) is Verdict.FORBIDDEN, sql
    assert backend.run(example, CORRECT) == ROWS


@pytest.mark.postgres
def test_data_modifying_cte_is_forbidden_on_postgres(postgres_url: str) -> None:
    example = make_example()
    with PostgresBackend(postgres_url) as backend:
        assert verdict_of(backend, example, "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d") is Verdict.FORBIDDEN
        assert backend.run(example, CORRECT) == ROWS


def test_row_cap(server: tuple[type[ServerBackend], str]) -> None:
    cls, url = server
    example = make_example()
    with cls(url, Limits(max_rows=2, timeout_s=2)) as backend:
        assert backend.run(example, "SELECT id FROM t ORDER BY id LIMIT 2") == [(1,), (2,)]
        assert verdict_of(backend, example, "SELECT id FROM t") is Verdict.RESOURCE_LIMIT
        started = time.monotonic()
        assert verdict_of(backend, example, HUGE[backend.dialect]) is Verdict.RESOURCE_LIMIT
        assert time.monotonic() - started < 1.5  # stopped after the cap, not at the timeout
        assert backend.run(example, "SELECT COUNT(*) FROM t") == [(3,)]


def test_syntax_and_runtime_errors(backend: ServerBackend) -> None:
    example = make_example()
    assert verdict_of(backend, example, "SELEC id FROM t") is Verdict.SYNTAX_ERROR
    assert verdict_of(backend, example, "SELECT id FROM t WHERE") is Verdict.SYNTAX_ERROR
    runtime = ["SELECT nope FROM t", "SELECT * FROM missing", "SELECT id FROM t WHERE " + "x" * 400 + " = 1"]
    if backend.dialect == "postgres":  # MySQL answers NULL and a warning instead
        runtime += ["SELECT 1 / 0", "SELECT 'a' + 1"]
    for sql in runtime:
        assert verdict_of(backend, example, sql) is Verdict.RUNTIME_ERROR, sql
    assert backend.run(example, CORRECT) == ROWS


def test_broken_schema_is_a_gold_error(backend: ServerBackend) -> None:
    broken = [
        "CREATE TABLE t (id INT); INSERT INTO missing VALUES (1)",
        "CREATE TABLE t (id INT); DROP TABLE t",
        "CREATE TABLE t (id INT",
    ]
    for schema in broken:
        example = Example(id="b", question="", schema=f"-- {uuid.uuid4()}\n{schema}", gold="SELECT 1")
        assert verdict_of(backend, example, "SELECT 1") is Verdict.GOLD_ERROR, schema
    with_file = Example(id="f", question="", schema="CREATE TABLE t (id INT)", gold="SELECT 1", database="x.sqlite")
    assert verdict_of(backend, with_file, "SELECT 1") is Verdict.GOLD_ERROR


def _count_rows(cls: type[ServerBackend], url: str, example: Example, start, results) -> None:
    start.wait()
    try:
        with cls(url) as backend:
            results.put(backend.run(example, "SELECT COUNT(*) FROM t"))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(repr(exc))


def test_concurrent_builds_from_two_processes(server: tuple[type[ServerBackend], str]) -> None:
    cls, url = server
    example = make_example(extra_rows=300)
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_count_rows, args=(cls, url, example, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    assert outcomes == [[(303,)], [(303,)]]


@pytest.mark.parametrize(("cls", "scheme"), [(PostgresBackend, "postgresql"), (MySQLBackend, "mysql")])
def test_unreachable_server_raises_connection_error(cls: type[ServerBackend], scheme: str) -> None:
    started = time.monotonic()
    with cls(f"{scheme}://admin:secret@127.0.0.1:1/test") as backend:  # the driver is the backend's own
        with pytest.raises(ConnectionError) as failed:
            backend.run(make_example(), CORRECT)
    assert isinstance(failed.value, ServerUnavailable)
    assert "127.0.0.1:1" in str(failed.value) and "secret" not in str(failed.value)
    assert time.monotonic() - started < 5

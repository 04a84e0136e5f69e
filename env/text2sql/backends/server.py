"""PostgreSQL and MySQL/MariaDB backends: untrusted queries on shared servers.

The admin login builds each example's database once (schema script transpiled
with sqlglot) under a server-side lock, so worker processes never race; the
predictions run as a separate login that can only SELECT, inside a read-only
transaction under a statement timeout, and are always rolled back.
"""

from __future__ import annotations

import re
import time
from abc import abstractmethod
from contextlib import closing, suppress
from itertools import islice
from typing import Any

import sqlglot
from sqlalchemy import Connection, create_engine, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection
from sqlglot import exp

from ..compare import normalize_rows
from ..example import Example
from ..verdict import Verdict
from .base import Backend, Limits, QueryFailed, Row, schema_key

READER = "text2sql_reader"
"""The login predictions run as: it can only read the built example databases."""

CONNECT_TIMEOUT_S = 3
MESSAGE_CHARS = 300

_SKIPPED = (exp.Transaction, exp.Commit, exp.Pragma)
"""Dump boilerplate (``BEGIN``, ``COMMIT``, ``PRAGMA``) that means nothing here."""


def _is_schema_statement(tree: exp.Expression) -> bool:
    return isinstance(tree, exp.Insert) or (
        isinstance(tree, exp.Create) and tree.kind in ("TABLE", "INDEX", "VIEW")
    )


class ServerUnavailable(ConnectionError):
    """The database server cannot be reached: an infrastructure fault, never a verdict."""


def first_line(text: str) -> str:
    """The head of a driver message: later lines echo the SQL, which the model already has."""
    lines = text.strip().splitlines()
    return lines[0][:MESSAGE_CHARS] if lines else ""


class ServerBackend(Backend):
    """What the server backends share: build once under a lock, run as the reader, map errors.

    One engine per login (pooled, pre-pinged). Any connection left in an
    unknown state (a client-side error, unread rows, a non-query statement
    that may have changed session settings) is discarded rather than reused.
    """

    _DRIVER: str
    """The DB-API driver the code relies on, whatever driver the URL names."""
    _END: tuple[str, ...]
    """Statements that end a prediction: roll back, release session-level locks."""

    def __init__(self, url: str, limits: Limits | None = None) -> None:
        super().__init__(limits)
        url = make_url(url)
        self.url = url.set(drivername=f"{url.get_backend_name()}+{self._DRIVER}")
        options: dict[str, Any] = {
            "pool_pre_ping": True,
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S},
        }
        # Schema statements are literal SQL: a '%' in them is not a placeholder.
        self._admin = create_engine(self.url, execution_options={"no_parameters": True}, **options)
        self._reader = create_engine(self._reader_url(), isolation_level="AUTOCOMMIT", **options)
        self._dbapi = self._reader.dialect.loaded_dbapi
        self._built: set[str] = set()

    def run(self, example: Example, sql: str) -> list[Row]:
        name = self._database(example)
        try:
            conn = self._reader.raw_connection()
        except self._dbapi.Error as exc:  # the pool does not wrap driver errors
            raise self._unreachable(exc) from None
        try:
            started = time.monotonic()
            rows = self._query(conn.driver_connection, name, sql, self.limits.max_rows + 1)
            if len(rows) > self.limits.max_rows:
                raise QueryFailed(Verdict.RESOURCE_LIMIT, f"more than {self.limits.max_rows} rows")
            if time.monotonic() - started >= self.limits.timeout_s:
                # Some interrupted functions (MariaDB's BENCHMARK) return a value, not an error.
                raise QueryFailed(Verdict.TIMEOUT, f"ran past {self.limits.timeout_s} s")
            return normalize_rows(rows)
        except QueryFailed:
            conn.invalidate()  # unread rows or changed session state may remain
            raise
        except self._dbapi.Error as exc:
            raise self._failure(conn, exc) from None
        finally:
            self._release(conn)

    def close(self) -> None:
        self._admin.dispose()
        self._reader.dispose()

    def _database(self, example: Example) -> str:
        """Build the example's database unless it exists; return its name."""
        name = f"t2s_{schema_key(example)}"
        if name in self._built:
            return name
        statements = self._statements(example)
        try:
            conn = self._admin.connect()
        except DBAPIError as exc:
            raise self._unreachable(exc.orig) from None
        with conn:
            try:
                self._build(conn, name, statements)
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise self._unreachable(exc.orig) from None
                reason = self._message(exc.orig)
                raise QueryFailed(Verdict.GOLD_ERROR, f"schema does not build: {reason}") from None
        self._built.add(name)
        return name

    def _statements(self, example: Example) -> list[str]:
        """The schema script in this backend's dialect, one statement each.

        Only tables, indexes, views and rows: the script runs with admin rights.
        """
        if example.database:
            reason = "SQLite database files are not supported on this backend"
            raise QueryFailed(Verdict.GOLD_ERROR, reason)
        statements = []
        try:
            for tree in sqlglot.parse(example.schema, read=example.dialect):
                if tree is None or isinstance(tree, _SKIPPED):
                    continue
                if not _is_schema_statement(tree):
                    reason = f"schema statement not allowed: {first_line(tree.sql())}"
                    raise QueryFailed(Verdict.GOLD_ERROR, reason)
                statements.append(tree.sql(dialect=self.dialect, unsupported_level=sqlglot.ErrorLevel.RAISE))
        except sqlglot.errors.SqlglotError as exc:
            raise QueryFailed(Verdict.GOLD_ERROR, f"schema does not transpile: {first_line(str(exc))}") from None
        return statements

    def _failure(self, conn: PoolProxiedConnection, exc: Exception) -> Exception:
        """The exception ``run`` raises for a driver error."""
        if self._reader.dialect.is_disconnect(exc, conn.dbapi_connection, None):
            conn.invalidate()
            return self._unreachable(exc)
        code = self._code(exc)
        if code is not None:
            return QueryFailed(self._verdict(code), self._message(exc))
        conn.invalidate()  # a client-side error can leave the protocol mid-way
        # Without a server code, a ProgrammingError is the driver refusing the statement (not a query, COPY).
        refused = isinstance(exc, self._dbapi.ProgrammingError)
        return QueryFailed(Verdict.FORBIDDEN if refused else Verdict.RUNTIME_ERROR, self._message(exc))

    def _release(self, conn: PoolProxiedConnection) -> None:
        """End the transaction and drop session locks, or discard the connection."""
        try:
            if conn.is_valid:
                with closing(conn.cursor()) as cur:
                    for statement in self._END:
                        cur.execute(statement)
        except self._dbapi.Error:
            conn.invalidate()
        finally:
            conn.close()

    def _unreachable(self, exc: BaseException) -> ServerUnavailable:
        where = self.url.render_as_string(hide_password=True)
        return ServerUnavailable(f"database server {where} is unreachable: {self._message(exc)}")

    def _reader_url(self) -> URL:
        return self.url._replace(username=READER, password=None)  # set() cannot clear a field

    def _message(self, exc: BaseException) -> str:
        return first_line(str(exc))

    @abstractmethod
    def _build(self, conn: Connection, name: str, statements: list[str]) -> None:
        """Create database ``name`` from ``statements`` unless another process already did."""

    @abstractmethod
    def _query(self, connection: Any, name: str, sql: str, limit: int) -> list[Row]:
        """Run ``sql`` read-only on ``name`` (driver connection); fetch at most ``limit`` rows."""

    @abstractmethod
    def _code(self, exc: Exception) -> str | int | None:
        """The server's error code, or None for a client-side error."""

    @abstractmethod
    def _verdict(self, code: Any) -> Verdict:
        """The verdict for a server error code."""


_PG_VERDICTS = {
    "42601": Verdict.SYNTAX_ERROR,
    "42501": Verdict.FORBIDDEN,  # insufficient privilege
    "25006": Verdict.FORBIDDEN,  # read-only transaction
    "57014": Verdict.TIMEOUT,  # statement timeout (query canceled)
    "53": Verdict.RESOURCE_LIMIT,  # class: insufficient resources (memory, disk)
    "54": Verdict.RESOURCE_LIMIT,  # class: program limit exceeded
}


class PostgresBackend(ServerBackend):
    """PostgreSQL: one schema ``t2s_<key>`` per example in the admin database."""

    dialect = "postgres"
    _DRIVER = "psycopg"  # psycopg 3: stream() and its extended protocol
    # pg_advisory_lock() is session-level: it would outlive the rollback on a pooled connection.
    _END = ("ROLLBACK; SELECT pg_advisory_unlock_all()",)

    def __init__(
        self, url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test", limits: Limits | None = None
    ) -> None:
        super().__init__(url, limits)
        # Chunked fetching needs libpq 17; row by row is about 2x slower on large results.
        self._chunk = min(self.limits.max_rows + 1, 1000) if self._dbapi.pq.version() >= 170000 else 1

    def _build(self, conn: Connection, name: str, statements: list[str]) -> None:
        with conn.begin():
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
            if conn.exec_driver_sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).first():
                return
            conn.exec_driver_sql(
                f"DO $$BEGIN CREATE ROLE {READER} LOGIN;"
                " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END$$"
            )
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            conn.exec_driver_sql(f"SET LOCAL search_path TO {name}")
            for statement in statements:
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {name} TO {READER}")
            conn.exec_driver_sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA {name} TO {READER}")

    def _query(self, connection: Any, name: str, sql: str, limit: int) -> list[Row]:
        timeout_ms = max(1, round(self.limits.timeout_s * 1000))
        with connection.cursor() as cur:
            cur.execute(
                f"BEGIN READ ONLY; SET LOCAL statement_timeout = {timeout_ms};"
                f" SET LOCAL search_path TO {name}"
            )
            # stream() uses the extended protocol, which refuses more than one statement.
            with closing(cur.stream(sql, size=self._chunk)) as rows:
                return list(islice(rows, limit))

    def _code(self, exc: Exception) -> str | None:
        return getattr(exc, "sqlstate", None)

    def _verdict(self, code: str) -> Verdict:
        return _PG_VERDICTS.get(code) or _PG_VERDICTS.get(code[:2], Verdict.RUNTIME_ERROR)


_MYSQL_VERDICTS = {
    1064: Verdict.SYNTAX_ERROR,
    1149: Verdict.SYNTAX_ERROR,
    1969: Verdict.TIMEOUT,  # MariaDB max_statement_time
    3024: Verdict.TIMEOUT,  # MySQL max_execution_time
    1317: Verdict.TIMEOUT,  # query interrupted
    1044: Verdict.FORBIDDEN,  # access denied to database
    1045: Verdict.FORBIDDEN,  # access denied (e.g. INTO OUTFILE)
    1142: Verdict.FORBIDDEN,  # command denied on table
    1143: Verdict.FORBIDDEN,  # command denied on column
    1227: Verdict.FORBIDDEN,  # needs SUPER or similar
    1370: Verdict.FORBIDDEN,  # execute denied on routine
    1290: Verdict.FORBIDDEN,  # server is --read-only
    1792: Verdict.FORBIDDEN,  # read-only transaction
    1037: Verdict.RESOURCE_LIMIT,  # out of memory
    1038: Verdict.RESOURCE_LIMIT,  # out of sort memory
    1041: Verdict.RESOURCE_LIMIT,  # out of resources
    1104: Verdict.RESOURCE_LIMIT,  # too big SELECT (max_join_size)
    1114: Verdict.RESOURCE_LIMIT,  # temporary table full
    1153: Verdict.RESOURCE_LIMIT,  # packet bigger than max_allowed_packet
}

_MANUAL_HINT = re.compile(r"; check the manual that corresponds to your \S+ server version for the right syntax to use")
_READERS = f"'{READER}'@'%', '{READER}'@'localhost'"
BUILD_LOCK_WAIT_S = 300


class MySQLBackend(ServerBackend):
    """MySQL and MariaDB: one database ``t2s_<key>`` per example.

    DDL is not transactional there, so completed builds are recorded in the
    ``t2s_builds`` table of the admin database; a half-built database is
    dropped and rebuilt by the next builder.
    """

    dialect = "mysql"
    _DRIVER = "pymysql"
    # GET_LOCK() is session-level: it would outlive the rollback on a pooled connection.
    _END = ("ROLLBACK", "DO RELEASE_ALL_LOCKS()")

    def __init__(
        self, url: str = "mysql+pymysql://root@127.0.0.1:3306/test", limits: Limits | None = None
    ) -> None:
        super().__init__(url, limits)

    def _reader_url(self) -> URL:
        # The reader may not use the admin database, so it connects to none.
        return super()._reader_url()._replace(database=None)

    def _build(self, conn: Connection, name: str, statements: list[str]) -> None:
        if conn.exec_driver_sql("SELECT GET_LOCK(%s, %s)", (name, BUILD_LOCK_WAIT_S)).scalar() != 1:
            raise QueryFailed(Verdict.GOLD_ERROR, f"timed out waiting for another process to build {name}")
        try:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t2s_builds (name VARCHAR(64) PRIMARY KEY)")
            if conn.exec_driver_sql("SELECT 1 FROM t2s_builds WHERE name = %s", (name,)).first():
                return
            conn.exec_driver_sql(f"CREATE USER IF NOT EXISTS {_READERS}")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            conn.exec_driver_sql(f"USE `{name}`")
            try:
                for statement in statements:
                    conn.exec_driver_sql(statement)
            finally:
                conn.exec_driver_sql(f"USE `{self.url.database}`")
            conn.exec_driver_sql(f"GRANT SELECT ON `{name}`.* TO {_READERS}")
            conn.exec_driver_sql("INSERT INTO t2s_builds (name) VALUES (%s)", (name,))
            conn.commit()  # before the lock goes: the next builder must see the record
        finally:
            conn.exec_driver_sql("DO RELEASE_LOCK(%s)", (name,))

    def _query(self, connection: Any, name: str, sql: str, limit: int) -> list[Row]:
        # Unbuffered, so a huge result never sits in memory.
        cur = connection.cursor(self._dbapi.cursors.SSCursor)
        connection.select_db(name)
        if self._reader.dialect.is_mariadb:
            cur.execute(f"SET SESSION max_statement_time = {self.limits.timeout_s:.3f}")
            # MariaDB silently truncates recursion at 1000 rounds by default, turning a
            # runaway CTE (or a legitimately deep one) into a wrong answer; the
            # statement timeout is the bound instead, as on the other backends.
            cur.execute("SET SESSION max_recursive_iterations = 4294967295")
        else:
            cur.execute(f"SET SESSION max_execution_time = {max(1, round(self.limits.timeout_s * 1000))}")
        cur.execute("START TRANSACTION READ ONLY")
        cur.execute(sql)  # the driver does not enable multi-statements: exactly one runs
        if cur.description is None:
            raise QueryFailed(Verdict.FORBIDDEN, "not a query: the statement returned no result set")
        rows = list(cur.fetchmany(limit))
        if len(rows) == limit:
            # More may follow, and the protocol can only read them all: stop the query first.
            with suppress(self._dbapi.Error):
                self._kill_query(connection.thread_id())
            with suppress(self._dbapi.Error):
                cur.close()  # reads what was already sent, up to the 'interrupted' error
        return rows

    def _kill_query(self, thread_id: int) -> None:
        """Stop a reader's query from another reader connection (a login may stop its own)."""
        killer = self._reader.raw_connection()
        try:
            with closing(killer.cursor()) as cur:
                cur.execute(f"KILL QUERY {int(thread_id)}")
        finally:
            killer.close()

    def _code(self, exc: Exception) -> int | None:
        code = exc.args[0] if exc.args else None
        return code if isinstance(code, int) and code > 0 else None

    def _verdict(self, code: int) -> Verdict:
        return _MYSQL_VERDICTS.get(code, Verdict.RUNTIME_ERROR)

    def _message(self, exc: BaseException) -> str:
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        return first_line(_MANUAL_HINT.sub("", text))

"""The embedded default backend: SQLite, sandboxed in-process.

Each schema is built once into a file under a cache folder and then only
ever opened read-only, so no query can change it. On top of read-only mode
every connection carries an authorizer allow-list, limits on attached
databases, string length and statement length, a deterministic budget of
virtual-machine steps, and a row cap. What still escapes (a query that burns
wall time without stepping the VM) is the job of the worker pool's hard kill.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

from ..example import Example
from ..verdict import Verdict
from .base import Backend, Limits, QueryFailed, Row, schema_key

_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE})
_DENIED_FUNCTIONS = frozenset({"printf", "format", "load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
_PROGRESS_EVERY = 1_000
"""VM instructions between progress-handler calls: the budget's granularity."""


def _authorize(action: int, arg1: str | None, arg2: str | None, database: str | None, trigger: str | None) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class StepBudget:
    """Progress handler that aborts a statement after a fixed number of VM steps."""

    def __init__(self, steps: int) -> None:
        self.calls_allowed = max(1, steps // _PROGRESS_EVERY)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return 1 if self.calls > self.calls_allowed else 0


def sandbox(connection: sqlite3.Connection, limits: Limits) -> StepBudget:
    """Put a connection under the allow-list and the limits; reset the returned budget before each query."""
    connection.set_authorizer(_authorize)
    connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limits.max_text_bytes)
    connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, limits.max_query_bytes)
    budget = StepBudget(limits.vm_steps)
    connection.set_progress_handler(budget, _PROGRESS_EVERY)
    return budget


def run_sandboxed(connection: sqlite3.Connection, budget: StepBudget, sql: str, max_rows: int) -> list[Row]:
    """Run one query on a :func:`sandbox`-ed connection with a fresh budget; raise :class:`QueryFailed` on failure."""
    budget.calls = 0
    try:
        cursor = connection.execute(sql)
        rows = cursor.fetchmany(max_rows + 1)
        cursor.close()
    except (sqlite3.Error, ValueError, OverflowError, MemoryError) as error:
        raise QueryFailed(_verdict_for(error), _message_for(error)) from None
    if len(rows) > max_rows:
        raise QueryFailed(Verdict.RESOURCE_LIMIT, f"query returned more than {max_rows} rows")
    return rows


class SQLiteBackend(Backend):
    """Runs queries on read-only SQLite databases built once per schema."""

    dialect = "sqlite"

    def __init__(self, limits: Limits | None = None, cache_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(limits)
        self._owned_dir = None if cache_dir else tempfile.TemporaryDirectory(prefix="text2sql-")
        self.cache_dir = Path(cache_dir or self._owned_dir.name)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._connections: dict[str, tuple[sqlite3.Connection, StepBudget]] = {}

    def run(self, example: Example, sql: str) -> list[Row]:
        connection, budget = self._connection(example)
        return run_sandboxed(connection, budget, sql, self.limits.max_rows)

    def _connection(self, example: Example) -> tuple[sqlite3.Connection, StepBudget]:
        key = schema_key(example)
        if key not in self._connections:
            path = Path(example.database) if example.database else self._build(key, example)
            self._connections[key] = self._open_sandboxed(path)
        return self._connections[key]

    def _build(self, key: str, example: Example) -> Path:
        """Write the schema script into a database file once; later opens reuse it.

        The file is built under a temporary name and renamed into place, so a
        concurrent worker never opens a half-built database.
        """
        path = self.cache_dir / f"{key}.sqlite"
        if path.exists():
            return path
        if example.dialect != "sqlite":
            from ..gate import translate_script

            script = translate_script(example.schema, example.dialect, "sqlite")
        else:
            script = example.schema
        fd, partial = tempfile.mkstemp(dir=self.cache_dir, suffix=".partial")
        os.close(fd)
        try:
            builder = sqlite3.connect(partial)
            try:
                # A half-built file is discarded anyway: skip the journal and fsyncs.
                builder.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
                builder.executescript(script)
                builder.commit()
            finally:
                builder.close()
            os.replace(partial, path)
        except sqlite3.Error as error:
            raise QueryFailed(Verdict.GOLD_ERROR, f"schema script failed: {error}") from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        return path

    def _open_sandboxed(self, path: Path) -> tuple[sqlite3.Connection, StepBudget]:
        if not path.exists():
            raise QueryFailed(Verdict.GOLD_ERROR, f"database file not found: {path}")
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        return connection, sandbox(connection, self.limits)

    def close(self) -> None:
        for connection, _ in self._connections.values():
            connection.close()
        self._connections.clear()
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None


_RESOURCE_MARKERS = ("too big", "too large", "too long", "stack overflow", "too many", "out of memory")
_SYNTAX_MARKERS = ("syntax error", "incomplete input", "unrecognized token")


def _verdict_for(error: BaseException) -> Verdict:
    """Classify a driver error; the order of checks matters (most specific first)."""
    text = str(error).lower()
    name = getattr(error, "sqlite_errorname", "") or ""
    if name in ("SQLITE_AUTH", "SQLITE_READONLY") or "not authorized" in text or "readonly" in text:
        return Verdict.FORBIDDEN
    if isinstance(error, sqlite3.ProgrammingError) and "one statement" in text:
        return Verdict.FORBIDDEN
    if "null character" in text:
        return Verdict.INVALID
    if name == "SQLITE_INTERRUPT" or text == "interrupted":
        return Verdict.TIMEOUT
    if isinstance(error, (MemoryError, OverflowError)) or name in ("SQLITE_TOOBIG", "SQLITE_NOMEM", "SQLITE_FULL"):
        return Verdict.RESOURCE_LIMIT
    if any(marker in text for marker in _RESOURCE_MARKERS):
        return Verdict.RESOURCE_LIMIT
    if any(marker in text for marker in _SYNTAX_MARKERS):
        return Verdict.SYNTAX_ERROR
    return Verdict.RUNTIME_ERROR


def _message_for(error: BaseException) -> str:
    if str(error) == "interrupted":
        return "query exceeded its execution-step budget"
    if isinstance(error, sqlite3.ProgrammingError) and "one statement" in str(error):
        return "expected one statement, found several"
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__

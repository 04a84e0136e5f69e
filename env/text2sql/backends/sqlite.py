"""The embedded default backend: SQLite, sandboxed in-process.

A schema script is built once into an in-memory database, a database file is
opened read-only, and neither is ever written to: on top of ``query_only``
(or read-only mode) every connection carries an authorizer allow-list,
limits on attached databases, string length and statement length, a
deterministic budget of virtual-machine steps, and a row cap. What still
escapes (a query that burns wall time without stepping the VM) is the job of
the worker pool's hard kill.

In memory, because a test suite adds three small databases per gold: a build
there costs about a third of writing a file, renaming it into place and
opening it again, and a suite's databases are opened from the images they
were distilled on (:attr:`Suite.images`), faster still. Open databases are
kept in bounded LRUs, so scoring a dataset of thousands of golds holds a
bounded number of them. Image databases have their own, smaller LRU whose
evicted connection takes in the next image: opening and closing a
connection would cost more than the image's own load.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable
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


_Entry = tuple[sqlite3.Connection, StepBudget]


class SQLiteBackend(Backend):
    """Runs queries on SQLite databases that nothing can change: schema scripts in memory, files read-only.

    ``max_open`` bounds the databases built from scripts or opened from files
    that are kept open, ``max_images_open`` those opened from offered images;
    past either bound the least recently used is closed, or for an image
    refilled with the next one (and built or opened again if it is needed again).
    """

    dialect = "sqlite"

    def __init__(self, limits: Limits | None = None, max_open: int = 2048, max_images_open: int = 256) -> None:
        super().__init__(limits)
        if max_open < 1 or max_images_open < 1:
            raise ValueError("max_open and max_images_open must be at least 1")
        self.max_open = max_open
        self.max_images_open = max_images_open
        self._connections: OrderedDict[str, _Entry] = OrderedDict()
        self._image_connections: OrderedDict[str, _Entry] = OrderedDict()
        self._images: dict[str, bytes] = {}

    def run(self, example: Example, sql: str) -> list[Row]:
        connection, budget = self._connection(example)
        return run_sandboxed(connection, budget, sql, self.limits.max_rows)

    def _connection(self, example: Example) -> _Entry:
        key = schema_key(example)
        for table in (self._connections, self._image_connections):
            entry = table.get(key)
            if entry is not None:
                table.move_to_end(key)
                return entry
        image = None if example.database else self._images.get(key)
        if image is not None:
            entry = self._image_connections[key] = self._from_image(image)
            return entry
        connection = self._open(Path(example.database)) if example.database else self._build(example)
        entry = self._connections[key] = (connection, sandbox(connection, self.limits))
        if len(self._connections) > self.max_open:
            self._connections.popitem(last=False)[1][0].close()
        return entry

    def _from_image(self, image: bytes) -> _Entry:
        """A sandboxed connection holding ``image``: a new one, or past the bound the least recently used refilled."""
        if len(self._image_connections) < self.max_images_open:
            connection = _in_memory(lambda fresh: fresh.deserialize(image), "database image cannot be opened")
            return connection, sandbox(connection, self.limits)
        entry = self._image_connections.popitem(last=False)[1]
        connection = entry[0]
        connection.set_authorizer(None)  # deserializing attaches, which the allow-list refuses; no query runs meanwhile
        try:
            connection.deserialize(image)
            connection.set_authorizer(_authorize)
        except sqlite3.Error as error:
            connection.close()  # out of the LRU already: nothing reaches it again
            raise QueryFailed(Verdict.GOLD_ERROR, f"database image cannot be opened: {error}") from None
        return entry

    def offer_image(self, example: Example, image: bytes) -> None:
        """Open this image, not the script, for the example's database (a test suite's, already distilled on)."""
        if not example.database:
            self._images[schema_key(example)] = image

    def _build(self, example: Example) -> sqlite3.Connection:
        """The schema script's database, in memory, then made query-only."""
        if example.dialect != "sqlite":
            from ..gate import translate_script

            script = translate_script(example.schema, example.dialect, "sqlite")
        else:
            script = example.schema
        return _in_memory(lambda connection: connection.executescript(script), "schema script failed")

    def _open(self, path: Path) -> sqlite3.Connection:
        if not path.exists():
            raise QueryFailed(Verdict.GOLD_ERROR, f"database file not found: {path}")
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)

    def close(self) -> None:
        for table in (self._connections, self._image_connections):
            for connection, _ in table.values():
                connection.close()
            table.clear()
        self._images.clear()


def _in_memory(fill: Callable[[sqlite3.Connection], object], failure: str) -> sqlite3.Connection:
    """A new in-memory database, filled by ``fill`` and then made query-only; a gold error if it cannot be.

    It caches no statements: SQLite need not recompile one for the image a
    refill swapped in (the schema cookies match), so it could read the old
    image's columns. Resetting the authorizer for the refill expires them
    today; nothing should hang on that, and the scorer runs each query once.
    """
    connection = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False, cached_statements=0)
    try:
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # what fills it reaches no file either
        fill(connection)
        connection.execute("PRAGMA query_only = ON")
    except sqlite3.Error as error:
        connection.close()
        raise QueryFailed(Verdict.GOLD_ERROR, f"{failure}: {error}") from None
    return connection


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

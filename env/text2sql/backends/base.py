"""What every execution backend provides: run one query in a sandbox."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

from ..example import Example
from ..verdict import Verdict

Row = tuple
"""One result row of plain cells: None, int, float, str or bytes."""


@dataclass(frozen=True)
class Limits:
    """Resource limits one prediction runs under.

    ``vm_steps`` is SQLite's deterministic budget (virtual-machine
    instructions), so the same query is stopped at the same point on every
    machine. ``max_query_bytes`` refuses over-long predictions before any
    parse or compile. ``timeout_s`` is the statement timeout on server backends and the
    wall-clock deadline after which a worker process is killed outright.
    """

    max_rows: int = 10_000
    vm_steps: int = 20_000_000
    max_text_bytes: int = 1_000_000
    max_query_bytes: int = 100_000
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_rows", "vm_steps", "max_text_bytes", "max_query_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("Limits.timeout_s must be positive")


class QueryFailed(Exception):
    """A query did not produce a result; ``verdict`` says why."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        super().__init__(message)
        self.verdict = verdict
        self.message = message


def schema_key(example: Example) -> str:
    """Content address of an example's database: equal schemas share one build."""
    return _content_key(example.database, example.dialect, example.schema)


@lru_cache(maxsize=4096)
def _content_key(database: str | None, dialect: str, schema: str) -> str:
    # Cached because every score asks; Python caches each string's own hash.
    source = database or f"{dialect}\0{schema}"
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class Backend(ABC):
    """A database engine that runs untrusted queries without being changed by them.

    Each example's database is built once (keyed by :func:`schema_key`) and
    reused; queries arrive already in :attr:`dialect`.
    """

    dialect: str
    """The sqlglot dialect this backend executes."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    @abstractmethod
    def run(self, example: Example, sql: str) -> list[Row]:
        """Run ``sql`` on the example's database; raise :class:`QueryFailed` on failure.

        Rows come back as plain cells (see :data:`Row`), so results from any
        backend compare alike.
        """

    def offer_image(self, example: Example, image: bytes) -> None:
        """A SQLite image of the example's database, which a backend may open instead of building its script.

        Servers build from the script; only the SQLite backend takes the offer.
        """

    def close(self) -> None:
        """Release connections; the built databases may stay for reuse."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

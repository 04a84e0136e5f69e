"""The unit of data every loader produces and the scorer consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    """One text-to-SQL task: a question over a database, and its gold query.

    ``schema`` is an SQL script (CREATE TABLE and INSERT statements) in
    ``dialect``; the scorer builds a database from it once and reuses it.
    Datasets that ship a ready SQLite file (Spider, BIRD) set ``database`` to
    its path instead, and keep only the DDL in ``schema`` for the prompt.
    """

    id: str
    question: str
    schema: str
    gold: str
    dialect: str = "sqlite"
    database: str | None = None
    domain: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Example":
        known = {name: row[name] for name in cls.__dataclass_fields__ if name in row}
        missing = [name for name in ("id", "schema", "gold") if name not in known]
        if missing:
            raise ValueError(f"example is missing required field(s): {', '.join(missing)}")
        known.setdefault("question", "")
        known["id"] = str(known["id"])
        return cls(**known)

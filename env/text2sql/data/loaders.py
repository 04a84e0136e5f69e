"""Loaders for the common text-to-SQL formats, all returning :class:`Example` lists.

Rows come in two shapes, told apart per row: our own keys (``id``,
``question``, ``schema``, ``gold``, ``dialect``...; see :meth:`Example.from_dict`)
or gretel ``synthetic_text_to_sql`` keys (``sql_prompt``, ``sql_context``,
``sql``). A bad row fails with its file, line (or row) number and the missing
field, since a silently skipped row would bias a held-out metric.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from ..example import Example
from .generator import generate

_GRETEL_FIELDS = ("sql_prompt", "sql_context", "sql")
_DATABASE_FOLDERS = ("database", "dev_databases", "train_databases")  # Spider, BIRD dev, BIRD train
_EXTRA = "{what} needs the `{package}` package: pip install 'autoresearch[data]'"


def from_gretel_rows(rows: Iterable[Mapping[str, Any]], dialect: str = "sqlite") -> list[Example]:
    """Examples from gretel ``synthetic_text_to_sql`` rows; ``dialect`` is the dialect of their SQL."""
    return [_gretel(row, dialect, f"row {number}", number) for number, row in enumerate(rows, 1)]


def load_jsonl(path: str | Path, dialect: str = "sqlite") -> list[Example]:
    """Examples from a JSON Lines file, one row per line (blank lines skipped).

    ``dialect`` applies to rows that do not name one (gretel rows never do).
    """
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error.msg}") from error
            examples.append(_from_row(row, dialect, f"{path}:{number}", number))
    return examples


def load_parquet(path: str | Path, dialect: str = "sqlite") -> list[Example]:
    """Examples from a Parquet file, one row each; errors name the 1-based row."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError(_EXTRA.format(what="load_parquet", package="pyarrow")) from error
    rows = parquet.read_table(path).to_pylist()
    return [_from_row(row, dialect, f"{path}: row {number}", number) for number, row in enumerate(rows, 1)]


def load_hf(name_or_path: str, split: str = "train", dialect: str = "sqlite", **kwargs: Any) -> list[Example]:
    """Examples from a Hugging Face dataset (a hub id, or a builder such as "json" with ``data_files``).

    ``kwargs`` go to ``datasets.load_dataset``.
    """
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(_EXTRA.format(what="load_hf", package="datasets")) from error
    rows = load_dataset(name_or_path, split=split, **kwargs)
    where = f"{name_or_path} [{split}] row"
    return [_from_row(row, dialect, f"{where} {number}", number) for number, row in enumerate(rows, 1)]


def load_spider(folder: str | Path, split_file: str = "dev.json") -> list[Example]:
    """Examples from a Spider or BIRD folder: ``split_file`` plus one SQLite file per database.

    Spider keeps databases at ``database/<db_id>/<db_id>.sqlite`` and gold in
    ``query``; BIRD at ``dev_databases/`` (or ``train_databases/``), gold in
    ``SQL`` and a hint in ``evidence``, which is appended to the question.
    ``schema`` holds the database's CREATE statements, read from its
    ``sqlite_master`` through a read-only connection.
    """
    folder = Path(folder)
    databases = _database_folder(folder)
    if databases is None:
        raise FileNotFoundError(f"{folder}: no {', '.join(_DATABASE_FOLDERS)} folder of SQLite databases")
    source = folder / split_file
    entries = json.loads(source.read_text(encoding="utf-8"))
    schemas: dict[Path, str] = {}
    examples = []
    for index, entry in enumerate(entries):
        where = f"{source}: entry {index}"
        _require(entry, ("db_id", "question"), where)
        gold = entry.get("query", entry.get("SQL"))
        if gold is None:
            raise ValueError(f"{where}: missing field 'query' (Spider) or 'SQL' (BIRD)")
        db_id = entry["db_id"]
        database = databases / db_id / f"{db_id}.sqlite"
        if database not in schemas:
            schemas[database] = _sqlite_ddl(database)
        question = entry["question"]
        if entry.get("evidence"):
            question = f"{question}\nHint: {entry['evidence']}"
        examples.append(
            Example(
                id=f"{db_id}-{index:04d}",
                question=question,
                schema=schemas[database],
                gold=gold,
                database=str(database),
                domain=db_id,
            )
        )
    return examples


def load(source: str | Path, split: str | None = None, **kwargs: Any) -> list[Example]:
    """One entry point for configs: pick the loader from ``source``.

    ``"synthetic"``: :func:`generate` (``kwargs`` such as ``n_train``, ``n_eval``,
    ``seed``; ``split`` is "train", the default, or "eval"). A path ending in
    ``.jsonl`` or ``.parquet``: that file. A Spider or BIRD folder: its
    ``<split>.json`` (default ``dev.json``). Anything else: a Hugging Face
    dataset, ``split`` defaulting to "train".
    """
    if source == "synthetic":
        if split not in (None, "train", "eval"):
            raise ValueError(f"synthetic data has splits 'train' and 'eval', not {split!r}")
        train, held_out = generate(**{"n_train": 1000, "n_eval": 200, **kwargs})
        return held_out if split == "eval" else train
    path = Path(source)
    if path.suffix == ".jsonl":
        return load_jsonl(path, **kwargs)
    if path.suffix == ".parquet":
        return load_parquet(path, **kwargs)
    if path.is_dir() and _database_folder(path) is not None:
        return load_spider(path, **({"split_file": f"{split}.json"} if split else {}), **kwargs)
    return load_hf(str(source), split=split or "train", **kwargs)


def _from_row(row: object, dialect: str, where: str, number: int) -> Example:
    """An example from one row in either shape; ``where`` names the row in errors."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    # Parquet and datasets give a key absent from some rows as None in those rows.
    present = {key: value for key, value in row.items() if value is not None}
    if any(key in present for key in _GRETEL_FIELDS[:2]):
        return _gretel(present, dialect, where, number)
    _require(present, ("id", "schema", "gold"), where)
    return Example.from_dict({"dialect": dialect, **present})


def _gretel(row: Mapping[str, Any], dialect: str, where: str, number: int) -> Example:
    _require(row, _GRETEL_FIELDS, where)
    identifier = row.get("id")
    return Example(
        id=f"gretel-{number}" if identifier is None else str(identifier),
        question=row["sql_prompt"],
        schema=row["sql_context"],
        gold=row["sql"],
        dialect=dialect,
        domain=str(row.get("domain") or ""),
    )


def _require(row: Mapping[str, Any], fields: Iterable[str], where: str) -> None:
    missing = [name for name in fields if row.get(name) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")


def _database_folder(folder: Path) -> Path | None:
    return next((folder / name for name in _DATABASE_FOLDERS if (folder / name).is_dir()), None)


def _sqlite_ddl(database: Path) -> str:
    """The CREATE statements of a SQLite file, read without any chance of changing it."""
    if not database.is_file():
        raise FileNotFoundError(f"database file not found: {database}")
    uri = f"{database.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        rows = connection.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('table', 'view') AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid"
        ).fetchall()
    return "\n\n".join(f"{sql};" for (sql,) in rows)

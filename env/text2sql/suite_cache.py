"""Suites kept on disk, so each (schema, gold) is distilled once per machine, not once per process.

Distilling a suite costs milliseconds per gold, scoring a prediction
microseconds: re-scoring an evaluation set (every checkpoint of a run, every
trial of a study, every worker of a pool) would otherwise spend its time
rebuilding the same suites. A suite is a deterministic function of its inputs,
so a file named by their hash can stand in for it; a file that cannot be read
is rebuilt, and files are written whole under a temporary name and renamed,
so concurrent writers never leave half a suite.

A file is one line of JSON (the databases' scripts, the neighbour counts and
each image's size), then the SQLite images as they are: a warm run loads a
suite per gold, and decompressing and decoding images cost more than reading
them whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path

from .backends import Limits
from .example import Example
from .suite import Suite, SuiteOptions, build_suite

FORMAT = 3
"""Bumped whenever distillation changes what it keeps, or the file layout changes: older files are then ignored."""
_SQLITE_HEADER = b"SQLite format 3\x00"


def default_cache_dir() -> Path:
    """``$TEXT2SQL_CACHE``, else ``text2sql/suites`` under the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    if os.environ.get("TEXT2SQL_CACHE"):
        return Path(os.environ["TEXT2SQL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "text2sql" / "suites"


class SuiteCache:
    """Builds suites through a folder of files, one per (schema, gold, options)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def suite(self, example: Example, options: SuiteOptions, limits: Limits) -> Suite:
        path = self.directory / f"{_key(example, options, limits)}.suite"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # missing or damaged: build it again
            return _load(path, example)
        suite = build_suite(example, options, limits)
        with contextlib.suppress(OSError):  # a read-only or full disk costs speed, never a verdict
            _store(path, suite)
        return suite


def _key(example: Example, options: SuiteOptions, limits: Limits) -> str:
    source: dict = {"format": FORMAT, "options": _fields(options), "max_rows": limits.max_rows, "vm_steps": limits.vm_steps,
                    "dialect": example.dialect, "gold": example.gold, "schema": _digest(example.schema)}
    if example.database:
        stat = os.stat(example.database)
        source["database"] = [os.path.abspath(example.database), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()[:32]


@functools.lru_cache(maxsize=16)
def _fields(options: SuiteOptions) -> dict:
    """The options as a dict for the key; cached, as every suite asks and ``asdict`` costs more than the hash."""
    return dataclasses.asdict(options)


@functools.lru_cache(maxsize=1024)
def _digest(schema: str) -> str:
    """The schema's SHA-256 for the key; cached, as a dataset's golds share a few schemas and JSON-escaping one costs more."""
    return hashlib.sha256(schema.encode("utf-8", "surrogatepass")).hexdigest()


def _load(path: Path, example: Example) -> Suite:
    head, _, body = path.read_bytes().partition(b"\n")
    stored = json.loads(head)
    images = _split(body, [int(db["size"]) for db in stored["databases"]])
    databases = [example] + [dataclasses.replace(example, schema=db["schema"], dialect=db["dialect"], database=None)
                             for db in stored["databases"]]
    return Suite(tuple(databases), int(stored["neighbours"]), tuple(str(sql) for sql in stored["undistinguished"]), images)


def _split(body: bytes, sizes: list[int]) -> tuple[bytes, ...]:
    """The images laid end to end in ``body``; a ValueError unless they fill it exactly and each is a SQLite image."""
    if min(sizes, default=0) < 0 or sum(sizes) != len(body):
        raise ValueError("the images do not fill the file")
    images = tuple(body[end - size : end] for size, end in zip(sizes, itertools.accumulate(sizes)))
    if not all(image.startswith(_SQLITE_HEADER) for image in images):
        raise ValueError("not a SQLite image")
    return images


def _store(path: Path, suite: Suite) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "databases": [{"schema": db.schema, "dialect": db.dialect, "size": len(image)}
                      for db, image in zip(suite.databases[1:], suite.images, strict=True)],
        "neighbours": suite.neighbours,
        "undistinguished": list(suite.undistinguished),
    }
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as sink:
            sink.write(json.dumps(record).encode("ascii") + b"\n")  # escaped JSON has no newline of its own
            sink.writelines(suite.images)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)

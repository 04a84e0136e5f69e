"""Suites kept on disk, so each (schema, gold) is distilled once per machine, not once per process.

Distilling a suite costs milliseconds per gold, scoring a prediction
microseconds: re-scoring an evaluation set (every checkpoint of a run, every
trial of a study, every worker of a pool) would otherwise spend its time
rebuilding the same suites. A suite is a deterministic function of its inputs,
so a file named by their hash can stand in for it; a file that cannot be read
is rebuilt, and files are written whole under a temporary name and renamed,
so concurrent writers never leave half a suite.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

from .backends import Limits
from .example import Example
from .suite import Suite, SuiteOptions, build_suite

FORMAT = 2
"""Bumped whenever distillation changes what it keeps: older files are then ignored."""
_SQLITE_HEADER = b"SQLite format 3\x00"


def default_cache_dir() -> Path:
    """``$TEXT2SQL_CACHE``, else ``text2sql/suites`` under the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    if os.environ.get("TEXT2SQL_CACHE"):
        return Path(os.environ["TEXT2SQL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "text2sql" / "suites"


class SuiteCache:
    """Builds suites through a folder of JSON files, one per (schema, gold, options)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def suite(self, example: Example, options: SuiteOptions, limits: Limits) -> Suite:
        path = self.directory / f"{_key(example, options, limits)}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, zlib.error):  # missing or damaged: build it again
            return _load(path, example)
        suite = build_suite(example, options, limits)
        with contextlib.suppress(OSError):  # a read-only or full disk costs speed, never a verdict
            _store(path, suite)
        return suite


def _key(example: Example, options: SuiteOptions, limits: Limits) -> str:
    source: dict = {"format": FORMAT, "options": dataclasses.asdict(options), "max_rows": limits.max_rows,
                    "vm_steps": limits.vm_steps, "dialect": example.dialect, "gold": example.gold, "schema": example.schema}
    if example.database:
        stat = os.stat(example.database)
        source["database"] = [os.path.abspath(example.database), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _load(path: Path, example: Example) -> Suite:
    stored = json.loads(path.read_text(encoding="utf-8"))
    databases = [example] + [dataclasses.replace(example, schema=db["schema"], dialect=db["dialect"], database=None)
                             for db in stored["databases"]]
    images = tuple(_image(db["image"]) for db in stored["databases"])
    return Suite(tuple(databases), int(stored["neighbours"]), tuple(str(sql) for sql in stored["undistinguished"]), images)


def _image(text: str) -> bytes:
    image = zlib.decompress(base64.b64decode(text, validate=True))
    if not image.startswith(_SQLITE_HEADER):
        raise ValueError("not a SQLite image")
    return image


def _store(path: Path, suite: Suite) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "databases": [{"schema": db.schema, "dialect": db.dialect, "image": base64.b64encode(zlib.compress(image)).decode("ascii")}
                      for db, image in zip(suite.databases[1:], suite.images, strict=True)],
        "neighbours": suite.neighbours,
        "undistinguished": list(suite.undistinguished),
    }
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as sink:
            json.dump(record, sink)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)

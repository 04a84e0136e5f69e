"""Execution backends: where predictions run, each in its own sandbox."""

from __future__ import annotations

from .base import Backend, Limits, QueryFailed, Row, schema_key
from .sqlite import SQLiteBackend

__all__ = ["Backend", "Limits", "QueryFailed", "Row", "SQLiteBackend", "make_backend", "schema_key"]


def make_backend(spec: str, limits: Limits | None = None) -> Backend:
    """Build a backend from a short spec: ``sqlite`` or a database URL.

    URLs use SQLAlchemy's form, e.g. ``postgresql+psycopg://user@host/db`` or
    ``mysql+pymysql://root@host/db`` (MariaDB included).
    """
    if spec == "sqlite":
        return SQLiteBackend(limits)
    scheme = spec.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        from .server import PostgresBackend

        return PostgresBackend(spec, limits)
    if scheme in ("mysql", "mariadb"):
        from .server import MySQLBackend

        return MySQLBackend(spec, limits)
    raise ValueError(f"unknown backend {spec!r}: use 'sqlite', a postgresql://... URL or a mysql://... URL")

"""Shared fixtures: the database servers, skipped with the reason when one is absent."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


def _reachable_or_skip(url: str, server: str) -> str:
    """Connect once, so a missing server skips its tests instead of failing each one."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0]
        pytest.skip(f"{server} not reachable at {engine.url.render_as_string(hide_password=True)}: {reason}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The admin URL of the PostgreSQL test server."""
    return _reachable_or_skip(POSTGRES_URL, "PostgreSQL")


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """The admin URL of the MariaDB (or MySQL) test server."""
    return _reachable_or_skip(MARIADB_URL, "MariaDB")

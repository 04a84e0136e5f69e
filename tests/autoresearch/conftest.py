"""Fixtures: study files in a temporary folder, and PostgreSQL when it runs (skipped with the reason otherwise)."""

from __future__ import annotations

import os
import textwrap
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.autoresearch.llm_server import LLMServer

REPO = Path(__file__).resolve().parents[2]
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

BASE = """
name = "{name}"
objective = "tests.autoresearch.objectives:{objective}"
{storage}
[space.x]
type = "float"
low = 0.0
high = 1.0
[fixed]
sleep = {sleep}
[training]
api = "none"
sampler = "torch"
[budget]
n_trials = {n_trials}
parallel = {parallel}
timeout_s = {timeout_s}
[heartbeat]
interval_s = 1
grace_s = 4
"""


@pytest.fixture(scope="session")
def postgres_url() -> str:
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {str(exc.orig).strip().splitlines()[0]}")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture(autouse=True)
def _importable_objectives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers import ``tests.autoresearch.objectives`` from the repository root."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


StudyFactory = Callable[..., Path]
LLM_KEY_ENV = "AUTORESEARCH_TEST_LLM_KEY"
LLM_KEY = "test-key-123"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LLMServer]:
    """The local Gemini/OpenAI-compatible server, with the key the proposer studies name in the environment."""
    monkeypatch.setenv(LLM_KEY_ENV, LLM_KEY)
    llm = LLMServer().start()
    yield llm
    llm.stop()


@pytest.fixture
def study_file(tmp_path: Path) -> StudyFactory:
    """Write a study file with a trivial objective; a PostgreSQL storage gets a unique study name."""

    def write(*, objective: str = "sleepy", n_trials: int = 3, parallel: int = 2, sleep: float = 0.0,
              timeout_s: float = 60, storage: str | None = None, extra: str = "") -> Path:
        name = f"t-{uuid.uuid4().hex[:12]}"
        body = BASE.format(name=name, objective=objective, n_trials=n_trials, parallel=parallel, sleep=sleep,
                           timeout_s=timeout_s, storage=f'storage = "{storage}"' if storage else "")
        path = tmp_path / "study.toml"
        path.write_text(textwrap.dedent(body) + extra)
        return path

    return write


def pytest_configure(config: pytest.Config) -> None:
    # The controller silences these for users too (see autoresearch/study.py): heartbeats are experimental
    # in Optuna, which also warns that they are meant for Study.optimize; our controller reaps for itself.
    config.addinivalue_line("filterwarnings", "ignore::optuna.exceptions.ExperimentalWarning")
    config.addinivalue_line("filterwarnings", "ignore:Heartbeat of storage is supposed to be used with Study.optimize")

"""Study files with a ``[proposer]`` section pointed at the local LLM server, for the proposer tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna

from autoresearch.controller import run_study
from autoresearch.spec import load_spec
from autoresearch.study import Tally, open_study
from tests.autoresearch.conftest import BASE, LLM_KEY_ENV
from tests.autoresearch.llm_server import LLMServer


def proposer_section(backend: str, server: LLMServer | None, **options: object) -> str:
    """``backend``: ``gemini-v1``, ``gemini-v1beta`` or ``openai``; ``options`` override the fast test defaults."""
    url = server.url if server else "http://127.0.0.1:9"
    if backend.startswith("gemini"):
        fields: dict[str, object] = {"type": "gemini", "model": "gemini-test", "base_url": url,
                                     "api_version": backend.partition("-")[2]}
    else:
        fields = {"type": "openai", "model": "gemma-test", "base_url": f"{url}/v1"}
    fields.update({"api_key": f"env:{LLM_KEY_ENV}", "share": 0.5, "timeout_s": 5, "max_retries": 2, "retry_delay_s": 0.01, "failure_cooldown_s": 0,
                   "proposals_per_call": 1})
    fields.update(options)
    return "[proposer]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def write_study(folder: Path, section: str, *, name: str = "llm-study", objective: str = "sleepy",
                n_trials: int = 2, extra: str = "") -> Path:
    """A fast study (trivial objective, no training) whose run folder sits next to the file."""
    folder.mkdir(parents=True, exist_ok=True)
    body = BASE.format(name=name, objective=objective, n_trials=n_trials, parallel=1, sleep=0.0, timeout_s=60, storage="")
    path = folder / "study.toml"
    path.write_text(textwrap.dedent(body) + extra + section)
    return path


def run(path: Path, n_trials: int | None = None) -> tuple[Tally, list[optuna.trial.FrozenTrial], optuna.Study]:
    state = run_study(load_spec(path), n_trials=n_trials, poll_s=0.05)
    study = open_study(load_spec(path))
    return state, study.get_trials(), study

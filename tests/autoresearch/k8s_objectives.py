"""Objectives for the Kubernetes launcher tests (run by trial workers, in threads and in subprocesses)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna


def report_then_wait(params: dict[str, Any], *, run_dir: Path, optuna_trial: optuna.Trial, **_: Any) -> float:
    """Report step 0, wait for a ``go`` file in the trial folder, report step 1: a test preempts it in between."""
    optuna_trial.report(params["x"] / 2, 0)
    while not (run_dir / "go").exists():
        time.sleep(0.02)
    optuna_trial.report(params["x"], 1)
    return params["x"]

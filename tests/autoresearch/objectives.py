"""Trivial objectives that tests plug in through a study file's ``objective`` (run in worker processes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import optuna


def _log(run_dir: Path, **fields: Any) -> None:
    with open(run_dir / "events.jsonl", "a") as out:
        out.write(json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\n")


def sleepy(params: dict[str, Any], *, run_dir: Path, optuna_trial: optuna.Trial, **_: Any) -> float:
    """Sleep ``params['sleep']`` seconds, logging start and end, and report a few intermediate values."""
    _log(run_dir, event="start")
    for step in range(3):
        time.sleep(params.get("sleep", 0.0) / 3)
        optuna_trial.report(params["x"] * (step + 1) / 3, step)
    _log(run_dir, event="end")
    return params["x"]


def raise_on_trial_one(params: dict[str, Any], *, optuna_trial: optuna.Trial, **_: Any) -> float:
    if optuna_trial.number == 1:
        raise ValueError("trial one is broken on purpose")
    return params["x"]


def hang_on_trial_zero(params: dict[str, Any], *, optuna_trial: optuna.Trial, **_: Any) -> float:
    if optuna_trial.number == 0:
        time.sleep(3600)
    return params["x"]


def prunable(params: dict[str, Any], *, optuna_trial: optuna.Trial, **_: Any) -> float:
    """Report a rising curve scaled by ``x`` and stop when the pruner says so."""
    for step in range(3):
        optuna_trial.report(params["x"] * (step + 1), step)
        if optuna_trial.should_prune():
            raise optuna.TrialPruned()
    return params["x"]

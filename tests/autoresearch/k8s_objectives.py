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


def hacked_trial_zero(params: dict[str, Any], *, run_dir: Path, optuna_trial: optuna.Trial, **_: Any) -> float:
    """Write the trial folder with ``run_trial``'s own writers: trial 0's training reward rises while its held-out
    accuracy falls (reward hacking), the others' accuracy rises with ``x``; each gets one held-out example wrong."""
    from autoresearch.trial.outputs import LEARNING_CURVE, MetricsLog, learning_curve, write_predictions

    number = optuna_trial.number
    final = 0.1 if number == 0 else 0.5 + params["x"] / 10
    with MetricsLog(run_dir, time.monotonic()) as log:
        log.record({"phase": "untrained", "step": 0, "untrained_execution_accuracy": 0.5, "n_eval": 100})
        for step, reward in enumerate((0.1, 0.5, 0.9)):
            log.record({"phase": "rl", "step": step, "reward_mean": reward})
        log.record({"phase": "eval", "step": 3, "eval_execution_accuracy": final, "n_eval": 100})
        optuna_trial.report(final, 3)
    write_predictions(run_dir, [{"question": "How many customers?", "prediction": "SELECT COUNT(*) FROM customers",
                                 "verdict": "match"},
                                {"question": f"Orders of trial {number}?", "prediction": f"SELECT {number} FROM nowhere",
                                 "verdict": "mismatch"}])
    learning_curve(log.points, run_dir / LEARNING_CURVE)
    return final

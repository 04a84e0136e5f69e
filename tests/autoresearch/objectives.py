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


def reward_rises_held_out_falls(params: dict[str, Any], *, run_dir: Path, **_: Any) -> float:
    """Write the learning curves of a reward-hacked trial (as run_trial would) when ``x`` > 0.5, honest ones otherwise."""
    hacked = params["x"] > 0.5
    points = [{"phase": "rl", "step": 0, "reward_mean": 0.2}, {"phase": "eval", "step": 0, "eval_execution_accuracy": 0.5},
              {"phase": "rl", "step": 1, "reward_mean": 0.9},
              {"phase": "eval", "step": 1, "eval_execution_accuracy": 0.3 if hacked else 0.6}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    return params["x"]


def always_fails(params: dict[str, Any], **_: Any) -> float:
    """Fail every trial, as a trial on a broken setup would."""
    raise RuntimeError(f"broken on purpose (x={params['x']:.3f})")


def stepping(params: dict[str, Any], *, run_dir: Path, **_: Any) -> float:
    """Write ``metrics.jsonl`` as run_trial does, an untrained evaluation, ``sft_steps`` SFT steps, one after them
    and ``rl_steps`` RL steps, each taking ``step_s`` seconds: a trial whose progress the controller can follow."""
    with open(run_dir / "metrics.jsonl", "w") as out:
        def point(phase: str, step: int, **values: float) -> None:
            time.sleep(params["step_s"])
            out.write(json.dumps({"phase": phase, "step": step, **values}) + "\n")
            out.flush()

        point("untrained", 0, untrained_execution_accuracy=0.0)
        for step in range(params["sft_steps"]):
            point("sft", step, loss_sum=1.0)
        point("sft_eval", 0, eval_execution_accuracy=params["x"])
        for step in range(params["rl_steps"]):
            point("rl", step, reward_mean=0.5)
        point("eval", params["rl_steps"], eval_execution_accuracy=params["x"])
    return params["x"]

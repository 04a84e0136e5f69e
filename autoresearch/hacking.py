"""Reward hacking: the training reward rose while the held-out metric fell.

The reward is the knob the LLM may turn, the held-out execution accuracy is
the objective it may not; a trial where the two part ways is one whose reward
weights pay for something other than correct SQL. The curves come from the
trial's ``metrics.jsonl`` (written by ``run_trial``).
"""

from __future__ import annotations

import json
from pathlib import Path

from optuna.trial import FrozenTrial


def curves(run_dir: str | Path | None) -> tuple[list[float], list[float]]:
    """(training reward per RL step, held-out accuracy from the start of reward-driven training on).

    The held-out series starts at the untrained evaluation only when no SFT
    warm-up ran: after a warm-up, the untrained score says nothing about RL.
    """
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return [], []
    points = []
    for line in path.read_text().splitlines():
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed worker
    train = [float(p["reward_mean"]) for p in points if p.get("phase") == "rl" and "reward_mean" in p]
    held = [float(p["eval_execution_accuracy"]) for p in points if p.get("phase") == "eval"]
    warmed_up = any(p.get("phase") == "sft" for p in points)
    untrained = [float(p["untrained_execution_accuracy"]) for p in points if p.get("phase") == "untrained"]
    return train, (held if warmed_up else untrained[:1] + held)


def reward_hacking(trial: FrozenTrial) -> str | None:
    """Why ``trial`` looks like reward hacking, or None."""
    train, held = curves(trial.user_attrs.get("run_dir"))
    if len(train) < 2 or len(held) < 2 or not (train[-1] > train[0] and held[-1] < held[0]):
        return None
    return (f"training reward rose {train[0]:.3f} -> {train[-1]:.3f} while held-out accuracy fell "
            f"{held[0]:.3f} -> {held[-1]:.3f}")

"""Reward hacking: the training reward rose while the held-out metric fell.

The reward is the knob the LLM may turn, the held-out execution accuracy is
the objective it may not; a trial where the two part ways is one whose reward
weights pay for something other than correct SQL. The curves come from the
trial's ``metrics.jsonl`` (written by ``run_trial``). On a small held-out set
accuracy moves by whole examples, so when the set's size is recorded a fall
counts only beyond two standard errors of the difference of two accuracies:
a flag on every noisy trial would teach its readers to ignore it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import FrozenTrial

METRICS_FILE = "metrics.jsonl"
"""The trial folder's points, one JSON object a line, as ``run_trial`` writes them (trial/outputs.py)."""


def _points(run_dir: str | Path | None) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE if run_dir else None
    if path is None or not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed worker
    return points


@dataclass(frozen=True)
class Curves:
    """A trial's training reward per RL step, its held-out accuracy from the start of reward-driven training on,
    and how many held-out examples each evaluation counted (the smallest, to be safe; None when not recorded).

    The held-out series starts at the evaluation right before the first RL
    step: after an SFT warm-up that is the ``sft_eval`` point (the untrained
    score says nothing about RL then; a trial recorded before that point
    existed starts at its first RL evaluation), without one the untrained point.
    """

    train: list[float]
    held: list[float]
    n_eval: int | None


def read_curves(run_dir: str | Path | None) -> Curves:
    """The curves in the trial folder's ``metrics.jsonl``, read once."""
    points = _points(run_dir)
    train = [float(p["reward_mean"]) for p in points if p.get("phase") == "rl" and "reward_mean" in p]
    warmed_up = any(p.get("phase") == "sft" for p in points)
    start = [p for p in points if p.get("phase") == ("sft_eval" if warmed_up else "untrained")][:1]
    evals = start + [p for p in points if p.get("phase") == "eval"]
    held = [float(p.get("eval_execution_accuracy", p.get("untrained_execution_accuracy"))) for p in evals]
    sizes = [int(p["n_eval"]) for p in evals if p.get("n_eval")]
    return Curves(train, held, min(sizes) if sizes else None)


def noise(accuracy: float, n_eval: int | None) -> float:
    """Two standard errors of the difference of two accuracies measured on ``n_eval`` examples (0 when unknown)."""
    if not n_eval:
        return 0.0
    return 2 * math.sqrt(2 * max(accuracy * (1 - accuracy), 1 / n_eval) / n_eval)


def hacking_evidence(curves: Curves) -> str | None:
    """Why these curves look like reward hacking, or None."""
    train, held, n_eval = curves.train, curves.held, curves.n_eval
    if len(train) < 2 or len(held) < 2 or not train[-1] > train[0]:
        return None
    if held[0] - held[-1] <= noise(held[0], n_eval):
        return None
    return (f"training reward rose {train[0]:.3f} -> {train[-1]:.3f} while held-out accuracy fell "
            f"{held[0]:.3f} -> {held[-1]:.3f}" + (f" (n={n_eval})" if n_eval else ""))


def reward_hacking(trial: FrozenTrial) -> str | None:
    """Why ``trial`` looks like reward hacking, or None."""
    return hacking_evidence(read_curves(trial.user_attrs.get("run_dir")))

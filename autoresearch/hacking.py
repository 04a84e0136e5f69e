"""Reward hacking: the training reward rose while the held-out metric fell.

The reward is the knob the LLM may turn, the held-out execution accuracy is
the objective it may not; a trial where the two part ways is one whose reward
weights pay for something other than correct SQL. The curves are the trial's
``curves`` user attr, which its worker derives from the points ``run_trial``
writes (``metrics.jsonl``, see recording.py), so they are in the study's
storage wherever the trial ran. On a small held-out set accuracy moves by
whole examples, so when the set's size is recorded a fall counts only beyond
two standard errors of the difference of two accuracies: a flag on every
noisy trial would teach its readers to ignore it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from optuna.trial import FrozenTrial

CURVES_ATTR = "curves"
"""The trial's :class:`Curves` as a user attr (``{"train": [...], "held": [...], "n_eval": n}``)."""
LEGACY_RUN_DIR_ATTR = "run_dir"
"""What trials of an earlier autoresearch recorded instead: the absolute path of a folder holding the curves."""


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


def curves_of(points: Iterable[dict[str, Any]]) -> Curves:
    """The curves in a trial's points, as ``run_trial`` records them (one ``metrics.jsonl`` line each)."""
    points = list(points)
    train = [float(p["reward_mean"]) for p in points if p.get("phase") == "rl" and "reward_mean" in p]
    warmed_up = any(p.get("phase") == "sft" for p in points)
    start = [p for p in points if p.get("phase") == ("sft_eval" if warmed_up else "untrained")][:1]
    evals = start + [p for p in points if p.get("phase") == "eval"]
    held = [float(p.get("eval_execution_accuracy", p.get("untrained_execution_accuracy"))) for p in evals]
    sizes = [int(p["n_eval"]) for p in evals if p.get("n_eval")]
    return Curves(train, held, min(sizes) if sizes else None)


def curves_attr(curves: Curves) -> dict[str, Any]:
    """The curves as the trial's ``curves`` user attr."""
    return asdict(curves)


def trial_curves(trial: FrozenTrial) -> Curves | None:
    """The curves the trial's worker recorded in the storage, or None (none recorded)."""
    recorded = trial.user_attrs.get(CURVES_ATTR)
    return None if recorded is None else Curves(list(recorded["train"]), list(recorded["held"]), recorded["n_eval"])


def curves_in_files_only(trial: FrozenTrial) -> bool:
    """Whether the trial is an earlier autoresearch's, whose curves stayed in a run folder's files."""
    return CURVES_ATTR not in trial.user_attrs and LEGACY_RUN_DIR_ATTR in trial.user_attrs


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
    """Why ``trial`` looks like reward hacking, or None (also when it recorded no curves)."""
    curves = trial_curves(trial)
    return None if curves is None else hacking_evidence(curves)

"""Read-only views of a study: per-trial rows, the status document, and the best trial's export.

``status``, ``best`` and ``report`` share these so that they never disagree
about what a trial's reason, retry count or parameters are.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .proposers.scheduler import USAGE_ATTR, Usage
from .spec import StudySpec
from .study import Tally, tally


EVALUATIONS = {"untrained": "untrained_eval_", "after SFT": "sft_eval_", "final": "eval_"}
"""Each held-out evaluation a trial records, by name, and the prefix of its user attrs (see ``run_trial``)."""


def accuracies(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's held-out accuracies and their 95% intervals, under their user attrs' names (None: not recorded)."""
    found: dict[str, Any] = {"n_eval": trial.user_attrs.get("n_eval")}
    for prefix in EVALUATIONS.values():
        for key in (f"{prefix}execution_accuracy", f"{prefix}execution_accuracy_ci"):
            found[key] = trial.user_attrs.get(key)
    return found


def interval(ci: list[float] | None) -> str:
    """``[0.2041, 0.5169]``, empty when not recorded."""
    return "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def estimate(value: float | None, ci: list[float] | None) -> str:
    """``0.3438 [0.2041, 0.5169]``: an accuracy with its interval, ``-`` when not recorded."""
    return "-" if value is None else f"{value:.4f} {interval(ci)}".rstrip()


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "retry_count": attrs.get("retry_count", 0),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "wall_seconds": attrs.get("wall_seconds"),
        "proposer": attrs.get("proposer", "sampler"),
        "proposer_fallback": attrs.get("proposer_fallback"),
        "failure_reason": attrs.get("failure_reason") if trial.state == TrialState.FAIL else None,
        "params": trial.params,
        **accuracies(trial),
    }


def status_document(spec: StudySpec, study: optuna.Study) -> dict[str, Any]:
    """Everything ``status --json`` prints: the tally against the budget, the best trial, every trial."""
    state: Tally = tally(study)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    return {
        "study": spec.name,
        "storage": spec.storage_url,
        "budget": spec.budget.n_trials,
        "settled": state.settled,
        "counts": {"waiting": state.waiting, "running": state.running, "complete": state.complete,
                   "pruned": state.pruned, "failed": state.failed, "failed_final": state.failed_final},
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                           **accuracies(best)},
        "proposer": proposer_usage(spec, study),
        "trials": [trial_row(t) for t in trials],
    }


def proposer_usage(spec: StudySpec, study: optuna.Study) -> dict[str, Any] | None:
    """The LLM proposer's spending against its caps, or None when the study has no proposer."""
    config = spec.proposer
    if config.type == "none":
        return None
    usage = Usage(**study.user_attrs.get(USAGE_ATTR, {}))
    return {"type": config.type, "model": config.model, "mode": config.mode, "share": config.share, **usage.__dict__,
            "cost_usd": round(usage.cost_usd(spec), 6), "max_calls": config.max_calls, "max_tokens": config.max_tokens}


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The COMPLETE trial with the highest held-out accuracy, or None before any completes."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: t.value, default=None)


def export_best(spec: StudySpec, study: optuna.Study) -> dict[str, Any]:
    """The best trial as a re-runnable call: ``run_trial(doc["params"], trainer_url=...)``."""
    best = best_trial(study)
    if best is None:
        raise LookupError(f"study {spec.name!r} has no completed trial yet")
    return {
        "study": spec.name,
        "trial": best.number,
        "value": best.value,
        "objective": spec.objective,
        "params": {**best.user_attrs.get("fixed_params", spec.fixed), **best.params},
        "reward_config": best.user_attrs.get("reward_config"),
    }


def status_table(document: dict[str, Any]) -> str:
    """A plain-text table for terminals."""
    counts = document["counts"]
    lines = [
        f"study {document['study']}  ({document['storage']})",
        f"settled {document['settled']}/{document['budget']}  running {counts['running']}  waiting {counts['waiting']}  "
        f"complete {counts['complete']}  pruned {counts['pruned']}  failed {counts['failed']} ({counts['failed_final']} final)",
    ]
    best = document["best"]
    if best:
        line = f"best #{best['number']}: {best['value']:.4f}"
        if best["n_eval"] is not None:  # an objective other than run_trial's may record no evaluations
            line += f"  held-out accuracy, 95% CI, n={best['n_eval']}: " + "; ".join(
                f"{name} {estimate(best[f'{p}execution_accuracy'], best[f'{p}execution_accuracy_ci'])}"
                for name, p in EVALUATIONS.items())
        lines.append(line)
    llm = document.get("proposer")
    if llm:
        lines.append(f"proposer {llm['type']} {llm['model']} ({llm['mode']}, share {llm['share']:g}): "
                     f"{llm['calls']}/{llm['max_calls']} calls, {llm['failures']} failed; tokens {llm['input_tokens']} in + "
                     f"{llm['output_tokens']} out of {llm['max_tokens']}; cost ${llm['cost_usd']:.4f}")
    lines.append(f"{'#':>5}  {'state':<8}  {'value':>8}  {'95% CI':<16}  {'retry':>5}  {'wall s':>8}  reason / params")
    for row in document["trials"]:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        wall = "" if row["wall_seconds"] is None else f"{row['wall_seconds']:.1f}"
        detail = row["failure_reason"] or ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
        if row["proposer"] != "sampler":
            detail = f"[{row['proposer']}] {detail}"
        ci = interval(row["eval_execution_accuracy_ci"])
        lines.append(f"{row['number']:>5}  {row['state']:<8}  {value:>8}  {ci:<16}  {row['retry_count']:>5}  {wall:>8}  {detail}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

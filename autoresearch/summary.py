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
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params},
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
    if document["best"]:
        lines.append(f"best #{document['best']['number']}: {document['best']['value']:.4f}")
    llm = document.get("proposer")
    if llm:
        lines.append(f"proposer {llm['type']} {llm['model']} ({llm['mode']}, share {llm['share']:g}): "
                     f"{llm['calls']}/{llm['max_calls']} calls, {llm['failures']} failed; tokens {llm['input_tokens']} in + "
                     f"{llm['output_tokens']} out of {llm['max_tokens']}; cost ${llm['cost_usd']:.4f}")
    lines.append(f"{'#':>5}  {'state':<8}  {'value':>8}  {'retry':>5}  {'wall s':>8}  reason / params")
    for row in document["trials"]:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        wall = "" if row["wall_seconds"] is None else f"{row['wall_seconds']:.1f}"
        detail = row["failure_reason"] or ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
        if row["proposer"] != "sampler":
            detail = f"[{row['proposer']}] {detail}"
        lines.append(f"{row['number']:>5}  {row['state']:<8}  {value:>8}  {row['retry_count']:>5}  {wall:>8}  {detail}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

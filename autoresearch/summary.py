"""Read-only views of a study: per-trial rows, the status document, and the best trial's export.

``status``, ``best`` and ``report`` share these so that they never disagree
about what a trial's reason, retry count or parameters are.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .proposers.scheduler import USAGE_ATTR, Usage
from .preflight import study_file_sha256
from .review import short
from .spec import DEFAULT_OBJECTIVE, REWARD_PREFIX, StudySpec
from .study import STUDY_FILE_ATTR, Tally, tally


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
        "study_file_sha256": study.user_attrs.get(STUDY_FILE_ATTR),
        # Trials whose worker loaded another version of the study file than the one the controller last ran.
        "other_study_file_trials": [t.number for t in trials if t.user_attrs.get(STUDY_FILE_ATTR) not in
                                    (None, study.user_attrs.get(STUDY_FILE_ATTR))],
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
    """The best trial as a re-runnable call (see :func:`export_trial`)."""
    best = best_trial(study)
    if best is None:
        raise LookupError(f"study {spec.name!r} has no completed trial yet")
    return export_trial(spec, study, best.number)


def export_trial(spec: StudySpec, study: optuna.Study, number: int) -> dict[str, Any]:
    """Trial ``number`` as a re-runnable call: ``run_trial(**doc["run_trial"], trainer_url=...)``.

    ``run_trial`` holds its keywords as ``run_trial`` takes them: ``params`` (the fixed and searched
    parameters; for ``run_trial`` itself every TrialParams field, the seed included, and every reward weight,
    so that a change of defaults cannot change the re-run), ``dataset`` (the study's ``[dataset]``) and
    ``base_model`` (None for a local service: the one model it serves, which ``training`` describes). The
    trainer URL and the API key are the caller's: they differ between where the study ran and where it re-runs.
    """
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        raise LookupError(f"study {spec.name!r} has no trial {number} (it has {len(trials)})")
    # A trial still WAITING (an enqueued retry or proposal) keeps its parameters in ``fixed_params`` until asked.
    params = {**trial.user_attrs.get("fixed_params", spec.fixed), **(trial.params or trial.system_attrs.get("fixed_params", {}))}
    reward_config = trial.user_attrs.get("reward_config")
    if spec.objective == DEFAULT_OBJECTIVE:
        from .params import TrialParams, split_params

        hyper, reward = split_params(params)
        reward_config = reward.to_dict()
        params = {**TrialParams(**hyper).model_dump(), **{REWARD_PREFIX + k: v for k, v in reward_config.items()}}
    local = spec.training.api == "local"
    ran_under = trial.user_attrs.get(STUDY_FILE_ATTR)
    return {
        "study": spec.name,
        "trial": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "objective": spec.objective,
        "study_file": str(spec.path),
        "study_file_sha256": ran_under,
        # The dataset and training below are the study file's now: they are the trial's only if the file is the same.
        "study_file_changed": ran_under is not None and ran_under != study_file_sha256(spec),
        "training": {"api": spec.training.api, "base_model": spec.training.base_model, "device": spec.training.device,
                     "sampler": spec.training.sampler},
        "reward_config": reward_config,
        "run_trial": {
            "params": params,
            "dataset": spec.dataset.model_dump(),
            "base_model": None if local else spec.training.base_model,
        },
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
    other = document.get("other_study_file_trials")
    if other:
        lines.append(f"warning: trial(s) {', '.join(map(str, other))} ran under another version of the study file "
                     f"than the last `autoresearch run` (sha256 {document['study_file_sha256'][:12]})")
    llm = document.get("proposer")
    if llm:
        lines.append(f"proposer {llm['type']} {llm['model']} ({llm['mode']}, share {llm['share']:g}): "
                     f"{llm['calls']}/{llm['max_calls']} calls, {llm['failures']} failed; tokens {llm['input_tokens']} in + "
                     f"{llm['output_tokens']} out of {llm['max_tokens']}; cost ${llm['cost_usd']:.4f}")
    lines.append(f"{'#':>5}  {'state':<8}  {'value':>8}  {'95% CI':<16}  {'retry':>5}  {'wall s':>8}  reason / params")
    for row in document["trials"]:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        wall = "" if row["wall_seconds"] is None else f"{row['wall_seconds']:.1f}"
        detail = row["failure_reason"] or ", ".join(f"{k}={short(v)}" for k, v in row["params"].items())
        if row["proposer"] != "sampler":
            detail = f"[{row['proposer']}] {detail}"
        ci = interval(row["eval_execution_accuracy_ci"])
        lines.append(f"{row['number']:>5}  {row['state']:<8}  {value:>8}  {ci:<16}  {row['retry_count']:>5}  {wall:>8}  {detail}")
    return "\n".join(lines)

"""``autoresearch report``: a Markdown summary of a study with PNG plots, for a pull request or a notebook."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from .plots import pyplot
from .hacking import reward_hacking
from .proposers.scheduler import HYPOTHESES_ATTR
from .spec import StudySpec
from .summary import best_trial, status_document


def _history(study: optuna.Study, path: Path) -> None:
    plt = pyplot()
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    best, running = [], float("-inf")
    for t in complete:
        running = max(running, t.value)
        best.append(running)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter([t.number for t in complete], [t.value for t in complete], s=14, label="trial")
    ax.step([t.number for t in complete], best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="held-out execution accuracy", title="Optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _importances(importances: dict[str, float], path: Path) -> None:
    plt = pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance", title="Parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(study: optuna.Study, path: Path, top: int) -> None:
    plt = pyplot()
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in sorted(complete, key=lambda t: t.value, reverse=True)[:top]:
        steps = sorted(t.intermediate_values)
        ax.plot(steps, [t.intermediate_values[s] for s in steps], marker="o", label=f"#{t.number}")
    ax.set(xlabel="RL step", ylabel="held-out execution accuracy", title=f"Learning curves of the best {top} trials")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(spec: StudySpec, study: optuna.Study, out_dir: Path, top: int = 5) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the Markdown file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = status_document(spec, study)
    counts = doc["counts"]
    lines = [
        f"# Study `{spec.name}`",
        "",
        f"Objective: held-out execution accuracy (maximise). Settled {doc['settled']} of {doc['budget']} trials: "
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed "
        f"({counts['failed_final']} after their last retry).",
        "",
    ]
    best = best_trial(study)
    if best is None:
        lines.append("No trial has completed yet.")
    else:
        _history(study, out_dir / "history.png")
        _curves(study, out_dir / "learning_curves.png", top)
        lines += [f"## Best trial: #{best.number}, accuracy {best.value:.4f}", ""]
        untrained = best.user_attrs.get("untrained_eval_execution_accuracy")
        if untrained is not None:  # run_trial evaluates the adapter before training too: the baseline to beat
            lines += [f"Held-out execution accuracy untrained: {untrained:.4f}, best: {best.value:.4f}.", ""]
        lines += ["| parameter | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {v} |" for k, v in {**spec.fixed, **best.params}.items()]
        lines += ["", "## Optimisation history", "", "![history](history.png)", ""]
        lines += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
        try:
            with warnings.catch_warnings():  # few trials: Optuna warns, and the importances say so themselves
                warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")
                importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as error:
            lines += ["## Parameter importances", "", f"Not available yet: {error}", ""]
        else:
            _importances(importances, out_dir / "importances.png")
            lines += ["## Parameter importances", "", "![importances](importances.png)", ""]
    trials = study.get_trials(deepcopy=False)
    lines += _proposers(study, trials) + _hacking(trials)
    failed = [row for row in doc["trials"] if row["failure_reason"]]
    if failed:
        lines += ["## Failed trials", "", "| trial | reason |", "| --- | --- |"]
        lines += [f"| #{row['number']} | {row['failure_reason']} |" for row in failed]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(text: object, limit: int = 300) -> str:
    """Text that stays inside one Markdown table cell."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit] + " ..."


def _proposers(study: optuna.Study, trials: list[FrozenTrial]) -> list[str]:
    """Which proposer (sampler or LLM) found what, the LLM's rationales, its current hypotheses and its fallbacks."""
    groups: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(t.user_attrs.get("proposer", "sampler"), []).append(t)
    # A retry inherits its trial's user attrs: count each fallback once.
    fallbacks = [t for t in trials if t.user_attrs.get("proposer_fallback") and "failed_trial" not in t.system_attrs]
    if set(groups) <= {"sampler"} and not fallbacks:
        return []
    lines = ["## Who found what", "", "| proposer | trials | complete | best accuracy | best trial |",
             "| --- | --- | --- | --- | --- |"]
    for name, group in sorted(groups.items()):
        complete = [t for t in group if t.state == TrialState.COMPLETE and t.value is not None]
        best = max(complete, key=lambda t: t.value, default=None)
        best_cells = ("-", "-") if best is None else (f"{best.value:.4f}", f"#{best.number}")
        lines.append(f"| {name} | {len(group)} | {len(complete)} | {best_cells[0]} | {best_cells[1]} |")
    llm = groups.get("llm", [])
    if llm:
        lines += ["", "### LLM proposals", "", "| trial | state | accuracy | rationale |", "| --- | --- | --- | --- |"]
        lines += [f"| #{t.number} | {t.state.name} | {'' if t.value is None else f'{t.value:.4f}'} | "
                  f"{_cell(t.user_attrs.get('rationale', ''))} |" for t in llm]
    hypotheses = study.user_attrs.get(HYPOTHESES_ATTR)
    if hypotheses:
        lines += ["", "### The LLM's current hypotheses", "", _cell(hypotheses, 2000)]
    if fallbacks:
        lines += ["", "### LLM slots the sampler took over", "", "| trial | reason |", "| --- | --- |"]
        lines += [f"| #{t.number} | {_cell(t.user_attrs['proposer_fallback'])} |" for t in fallbacks]
    return lines + [""]


def _hacking(trials: list[FrozenTrial]) -> list[str]:
    """Trials whose training reward rose while held-out accuracy fell."""
    flagged = [(t, reason) for t in trials if (reason := reward_hacking(t))]
    if not flagged:
        return []
    lines = ["## Possible reward hacking", "", "| trial | proposer | evidence | reward config |", "| --- | --- | --- | --- |"]
    lines += [f"| #{t.number} | {t.user_attrs.get('proposer', 'sampler')} | {reason} | "
              f"{_cell(t.user_attrs.get('reward_config', ''))} |" for t, reason in flagged]
    return lines + [""]

"""``autoresearch report``: a Markdown summary of a study with PNG plots, for a pull request or a notebook."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from .plots import integer_ticks, pyplot
from .hacking import curves_in_files_only, reward_hacking
from .proposers.scheduler import HYPOTHESES_ATTR
from .params import distributions
from .review import METRIC_NAME, short
from .spec import StudySpec
from .stats import decode_matches, mcnemar
from .summary import EVALUATIONS, best_trial, estimate, status_document

if TYPE_CHECKING:
    from matplotlib.axes import Axes


MIN_TRIALS_FOR_IMPORTANCES = 10
"""Below this many complete trials, importances rank noise: Optuna computes them from two, so the report says so."""


def _save(ax: "Axes", path: Path, *, integer_x: bool) -> None:
    """Write one of Optuna's matplotlib plots to ``path``; trial numbers and RL steps get whole-number ticks."""
    if integer_x:
        integer_ticks(ax.xaxis)
    fig = ax.figure
    fig.set_size_inches(8, 3.5)  # room for Optuna's legend, which it draws right of the axes
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def _curves(study: optuna.Study, top: int) -> "Axes":
    """Optuna's plot of intermediate values for the ``top`` best complete trials, labelled with their numbers.

    Optuna plots a whole study, so the best trials are copied into an in-memory one, where they are numbered
    afresh from 0 in order of accuracy; the legend gets their numbers in the study back.
    """
    from optuna.visualization.matplotlib import plot_intermediate_values

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    best = sorted(complete, key=lambda t: t.value, reverse=True)[:top]
    copy = optuna.create_study(direction=study.direction)
    copy.add_trials(best)
    ax = plot_intermediate_values(copy)
    numbers = {f"Trial{i}": f"#{t.number}" for i, t in enumerate(best)}
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, [numbers.get(label, label) for label in labels], bbox_to_anchor=(1.05, 1.0), loc="upper left")
    ax.set(xlabel="RL step", ylabel=METRIC_NAME, title=f"Learning curves of the best {len(best)} trials")
    return ax


def _plots(study: optuna.Study, out_dir: Path, top: int) -> list[str]:
    """The optimisation history, the best trials' learning curves and the parameter importances (Optuna's plots),
    and their Markdown; importances carry a caveat below ``MIN_TRIALS_FOR_IMPORTANCES`` complete trials."""
    pyplot()  # the Agg backend, before Optuna imports matplotlib
    from optuna.visualization import matplotlib as plots

    history = plots.plot_optimization_history(study, target_name=METRIC_NAME)
    _save(history, out_dir / "history.png", integer_x=True)
    _save(_curves(study, top), out_dir / "learning_curves.png", integer_x=True)
    lines = ["## Optimisation history", "", "![history](history.png)", "",
             "## Learning curves", "", "![learning curves](learning_curves.png)", "", "## Parameter importances", ""]
    try:
        with warnings.catch_warnings():  # few trials: Optuna warns, and the caveat below says so
            warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")
            importances = plots.plot_param_importances(study, target_name=METRIC_NAME)
    except (RuntimeError, ValueError) as error:
        return lines + [f"Not available yet: {error}", ""]
    _save(importances, out_dir / "importances.png", integer_x=False)
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete < MIN_TRIALS_FOR_IMPORTANCES:
        lines += [f"Caveat: drawn from {complete} complete trial(s); below {MIN_TRIALS_FOR_IMPORTANCES} these "
                  "importances are mostly noise, not a ranking of the parameters.", ""]
    return lines + ["![importances](importances.png)", ""]


def _all_trials(spec: StudySpec, study: optuna.Study) -> list[str]:
    """Every trial in one table: state, proposer, final held-out accuracy with its 95% Wilson interval, and
    its searched parameters rounded to 4 significant digits."""
    names = list(distributions(spec))
    lines = ["## All trials", "", "| trial | state | proposer | accuracy [95% CI] | " + " | ".join(f"`{n}`" for n in names)
             + " |", "| --- | --- | --- | --- |" + " --- |" * len(names)]
    for t in study.get_trials(deepcopy=False):
        value = estimate(t.value, t.user_attrs.get("eval_execution_accuracy_ci"))
        cells = [short(t.params[n]) if n in t.params else "-" for n in names]
        lines.append(f"| #{t.number} | {t.state.name} | {t.user_attrs.get('proposer', 'sampler')} | {value} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


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
        lines += ["No trial has completed yet.", ""]
    else:
        lines += [f"## Best trial: #{best.number}, accuracy {best.value:.4f}", ""]
        lines += ["| parameter | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {short(v)} |" for k, v in {**spec.fixed, **best.params}.items()]
        lines += _held_out(study, best) + [""]
    lines += _all_trials(spec, study)
    if best is not None:
        lines += _plots(study, out_dir, top)
    trials = study.get_trials(deepcopy=False)
    lines += _proposers(study, trials) + _hacking(trials)
    failed = [row for row in doc["trials"] if row["failure_reason"]]
    if failed:
        lines += ["## Failed trials", "", "| trial | reason |", "| --- | --- |"]
        lines += [f"| #{row['number']} | {row['failure_reason']} |" for row in failed]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _held_out(study: optuna.Study, best: FrozenTrial) -> list[str]:
    """Every trial's held-out accuracies with their 95% Wilson intervals, and whether the best trial is
    distinguishable from the runner-up and from its own start (after the warm-up, or untrained without one)."""
    measured = [t for t in study.get_trials(deepcopy=False) if "n_eval" in t.user_attrs]
    if not measured:
        return []
    lines = ["", "## Held-out execution accuracy", "",
             "Each with its 95% Wilson interval; n: the held-out examples that count (a broken gold does not).", "",
             "| trial | state | " + " | ".join(EVALUATIONS) + " | n |", "| --- | --- |" + " --- |" * len(EVALUATIONS) + " --- |"]
    for t in measured:
        cells = [estimate(t.user_attrs.get(f"{p}execution_accuracy"), t.user_attrs.get(f"{p}execution_accuracy_ci"))
                 for p in EVALUATIONS.values()]
        lines.append(f"| #{t.number} | {t.state.name} | " + " | ".join(cells) + f" | {t.user_attrs['n_eval']} |")
    complete = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None),
                      key=lambda t: t.value, reverse=True)
    runner_up = next((t for t in complete if t.number != best.number), None)
    own = "sft_eval_" if best.user_attrs.get("sft_eval_matches") is not None else "untrained_eval_"
    own_name = "after-SFT" if own == "sft_eval_" else "untrained"
    lines += ["", "### Is the best trial distinguishable?", "",
              "Exact McNemar tests on the paired per-example matches; b: examples only the first matched, "
              "c: only the second.", ""]
    lines.append("- " + ("There is no runner-up to compare with." if runner_up is None else _paired(
        f"the best trial #{best.number}", best, "eval_", f"the runner-up #{runner_up.number}", runner_up, "eval_")))
    lines.append("- " + _paired(f"the best trial #{best.number}", best, "eval_", f"its own {own_name} evaluation", best, own))
    return lines


def _paired(first_name: str, first: FrozenTrial, first_prefix: str,
            second_name: str, second: FrozenTrial, second_prefix: str) -> str:
    """One sentence: whether two recorded evaluations differ beyond chance, or why they cannot be compared."""
    names = f"{first_name[0].upper()}{first_name[1:]} and {second_name}"
    vectors = [t.user_attrs.get(f"{prefix}matches") for t, prefix in ((first, first_prefix), (second, second_prefix))]
    if None in vectors:
        return f"{names} cannot be compared: {first_name if vectors[0] is None else second_name} recorded no per-example matches."
    digests = {first.user_attrs.get("eval_examples_sha256"), second.user_attrs.get("eval_examples_sha256")}
    if first.number != second.number and (len(digests) > 1 or None in digests):
        return f"{names} cannot be compared: they were not evaluated on the same held-out examples."
    try:
        test = mcnemar(decode_matches(vectors[0]), decode_matches(vectors[1]))
    except ValueError as error:
        return f"{names} cannot be compared: {error}."
    counts = f"b = {test.b}, c = {test.c} of {test.paired} paired examples"
    if test.b + test.c == 0:
        return f"{names} are not distinguishable at the 5% level: they match on exactly the same examples ({counts})."
    if test.distinguishable():
        return f"{names} are distinguishable (p = {test.p_value:.4g}; {counts})."
    return f"{names} are not distinguishable at the 5% level (p = {test.p_value:.4g}; {counts})."


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
    """Trials whose training reward rose while held-out accuracy fell, and a note on those it cannot check."""
    flagged = [(t, reason) for t in trials if (reason := reward_hacking(t))]
    unchecked = [f"#{t.number}" for t in trials if curves_in_files_only(t)]
    if not flagged and not unchecked:
        return []
    lines = ["## Possible reward hacking", ""]
    if flagged:
        lines += ["| trial | proposer | evidence | reward config |", "| --- | --- | --- | --- |"]
        lines += [f"| #{t.number} | {t.user_attrs.get('proposer', 'sampler')} | {reason} | "
                  f"{_cell(t.user_attrs.get('reward_config', ''))} |" for t, reason in flagged]
    else:
        lines += ["None found among the trials checked."]
    if unchecked:
        lines += ["", f"Not checked: {', '.join(unchecked)}, recorded by an earlier autoresearch, which kept their "
                  "curves only in files of their run folder, not in the study's storage."]
    return lines + [""]

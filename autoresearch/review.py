"""What a reviewer reads in optuna-dashboard: the metric's name, what the study ran, and who proposed each trial.

The controller writes all of it, so that the dashboard of a study tells
without the study file at hand what was searched on which data (the study's
user attrs and the study file as an artifact), and every trial's note says
whether the sampler or the LLM proposed it, why, and with which parameters.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from .artifacts import open_artifact_store
from .proposers.scheduler import LLM
from .spec import StudySpec

METRIC_NAME = "held-out execution accuracy"
"""The study's one objective, by name: without it the dashboard labels the axis "Objective 0"."""
STUDY_FILE_TEXT_ATTR = "study_file"
DATASET_ATTR = "dataset"
SPACE_ATTR = "search_space"
FIXED_ATTR = "fixed_params"


def describe(distribution: BaseDistribution) -> str:
    """A distribution as a reader writes it (``float in [1e-05, 0.001], log``), not Optuna's JSON."""
    if isinstance(distribution, CategoricalDistribution):
        return "one of " + ", ".join(map(str, distribution.choices))
    assert isinstance(distribution, (FloatDistribution, IntDistribution))
    integer = isinstance(distribution, IntDistribution)
    text = f"{'int' if integer else 'float'} in [{distribution.low:g}, {distribution.high:g}]"
    if distribution.log:
        text += ", log"
    if distribution.step is not None and not (integer and distribution.step == 1):
        text += f", step {distribution.step:g}"
    return text


def record_study_context(study: optuna.Study, spec: StudySpec, space: dict[str, BaseDistribution]) -> None:
    """Name the metric and record the study file's text, the dataset, the space and the fixed parameters.

    Each new version of the study file is also uploaded as a study artifact, so that the dashboard keeps
    every version a trial may have run under (the attrs hold the latest; ``study_file_history`` the hashes).
    """
    study.set_metric_names([METRIC_NAME])
    text = spec.path.read_text()
    if study.user_attrs.get(STUDY_FILE_TEXT_ATTR) != text:
        upload_artifact(artifact_store=open_artifact_store(spec), file_path=str(spec.path),
                        study_or_trial=study, mimetype="text/plain")
        study.set_user_attr(STUDY_FILE_TEXT_ATTR, text)
    study.set_user_attr(DATASET_ATTR, spec.dataset.model_dump())
    study.set_user_attr(SPACE_ATTR, {name: describe(d) for name, d in space.items()})
    study.set_user_attr(FIXED_ATTR, spec.fixed)


def short(value: Any) -> str:
    """A parameter value rounded for reading: 4 significant digits for floats, others as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def proposed_by(trial: FrozenTrial) -> str:
    """``sampler``, or ``llm (openai:gemma)``: who proposed the trial, as the start line and the note say it."""
    proposer = trial.user_attrs.get("proposer", "sampler")
    model = trial.user_attrs.get("proposer_model")
    return f"{proposer} ({model})" if proposer == LLM and model else proposer


def trial_note(trial: FrozenTrial, sampler: str) -> str:
    """The trial's note (Markdown): its proposer and the LLM's rationale, or the sampler and why it took an LLM
    slot, whether it retries another trial, and its parameters."""
    attrs = trial.user_attrs
    if attrs.get("proposer") == LLM:
        lines = [f"## Proposed by the LLM ({attrs.get('proposer_model', '?')})", "", attrs.get("rationale", "")]
        if attrs.get("proposal_adjustments"):
            lines += ["", "Adjusted to fit the search space: " + "; ".join(attrs["proposal_adjustments"])]
    else:
        lines = [f"## Proposed by the sampler ({sampler})"]
        if attrs.get("proposer_fallback"):
            lines += ["", f"This was the LLM's slot; the sampler took it over: {attrs['proposer_fallback']}"]
    retried = trial.system_attrs.get("failed_trial")
    if retried is not None:
        lines += ["", f"A retry of trial #{retried}, with its parameters."]
    lines += ["", "| parameter | value |", "| --- | --- |"]
    lines += [f"| `{name}` | {short(value)} |" for name, value in trial.params.items()]
    return "\n".join(lines) + "\n"


def write_trial_note(study: optuna.Study, storage: BaseStorage, trial_id: int) -> FrozenTrial:
    """Save the trial's note for optuna-dashboard; return the trial as stored (the controller prints it)."""
    from optuna_dashboard import save_note

    frozen = storage.get_trial(trial_id)
    save_note(optuna.Trial(study, trial_id), trial_note(frozen, type(study.sampler).__name__))
    return frozen

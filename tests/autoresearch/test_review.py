"""The review a researcher reads: the dashboard's metric name, the study's recorded context, every trial's note,
``run``'s lines and live progress, and the report's table, plots and caveats."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import get_note
from rich.console import Console

from autoresearch.cli import main
from autoresearch.console import RunConsole
from autoresearch.controller import RunObserver, run_study
from autoresearch.params import distributions
from autoresearch.plots import pyplot
from autoresearch.report import MIN_TRIALS_FOR_IMPORTANCES, _save, write_report
from autoresearch.review import METRIC_NAME, trial_note
from autoresearch.spec import load_spec
from autoresearch.study import Tally, open_study
from autoresearch.trial.outputs import draw_learning_curve
from autoresearch.recording import PROGRESS_ATTR, MetricsMirror, step_progress
from tests.autoresearch.conftest import StudyFactory


class Recorder(RunObserver):
    """Keeps what the controller tells."""

    def __init__(self) -> None:
        self.starts: list[FrozenTrial] = []
        self.ends: list[FrozenTrial] = []
        self.steps: list[tuple[int, dict[str, Any]]] = []

    def started(self, trial: FrozenTrial) -> None:
        self.starts.append(trial)

    def progress(self, number: int, progress: dict[str, Any]) -> None:
        self.steps.append((number, progress))

    def ended(self, trial: FrozenTrial) -> None:
        self.ends.append(trial)


def test_a_run_names_the_metric_records_what_ran_and_notes_every_trial(study_file: StudyFactory) -> None:
    path = study_file(objective="raise_on_trial_one", n_trials=3, parallel=1)
    spec = load_spec(path)
    recorder = Recorder()
    run_study(spec, observer=recorder, poll_s=0.1)
    study = open_study(spec)
    assert study.metric_names == [METRIC_NAME]
    assert study.user_attrs["study_file"] == path.read_text()
    assert study.user_attrs["dataset"] == spec.dataset.model_dump()
    assert study.user_attrs["search_space"] == {"x": "float in [0, 1]"}
    assert study.user_attrs["fixed_params"] == {"sleep": 0.0}
    [artifact] = get_all_artifact_meta(study)
    assert artifact.filename == path.name
    for trial in study.trials:
        note = get_note(optuna.Trial(study, trial._trial_id))
        assert note.startswith("## Proposed by the sampler (TPESampler)")
        assert f"| `x` | {trial.params['x']:.4g} |" in note
        # Readable in the dashboard: a str and a dict, which it shows as they are, not JSON in a string.
        assert trial.user_attrs["proposer"] == "sampler" and isinstance(trial.user_attrs["reward_config"], dict)
    assert [t.number for t in recorder.starts] == [0, 1, 2] and all(t.params for t in recorder.starts)
    assert [(t.number, t.state) for t in recorder.ends] == [
        (0, TrialState.COMPLETE), (1, TrialState.FAIL), (2, TrialState.COMPLETE)]
    assert recorder.ends[1].user_attrs["failure_reason"] == "ValueError: trial one is broken on purpose"
    # A second run under the same file uploads it once only; an edited file is uploaded as a new version.
    run_study(spec, n_trials=3)
    path.write_text(path.read_text() + "\n# edited\n")
    run_study(load_spec(path), n_trials=3)
    assert len(get_all_artifact_meta(open_study(spec))) == 2


def test_the_controller_follows_each_trials_sft_and_rl_steps(study_file: StudyFactory) -> None:
    path = study_file(objective="stepping", n_trials=1, parallel=1)
    path.write_text(path.read_text().replace("[fixed]\n", "[fixed]\nstep_s = 1.2\nsft_steps = 3\nrl_steps = 2\n"))
    recorder = Recorder()
    run_study(load_spec(path), observer=recorder, poll_s=0.1)
    assert recorder.ends[0].state == TrialState.COMPLETE
    seen = [progress for number, progress in recorder.steps if number == 0]
    phases = [p["phase"] for p in seen]
    assert "sft" in phases and "rl" in phases and phases.index("rl") > max(i for i, p in enumerate(phases) if p == "sft")
    assert all(p["total"] == 5 and p["of"] == (3 if p["phase"] == "sft" else 2) for p in seen)
    assert [p["done"] for p in seen] == sorted(p["done"] for p in seen)


@pytest.mark.parametrize(("point", "expected"), [
    ({"phase": "untrained", "step": 0}, {"phase": "sft", "step": 0, "of": 40, "done": 0, "total": 44}),
    ({"phase": "sft", "step": 11}, {"phase": "sft", "step": 12, "of": 40, "done": 12, "total": 44}),
    ({"phase": "sft_eval", "step": 0}, {"phase": "rl", "step": 0, "of": 4, "done": 40, "total": 44}),
    ({"phase": "rl", "step": 1}, {"phase": "rl", "step": 2, "of": 4, "done": 42, "total": 44}),
    ({"phase": "eval", "step": 4}, {"phase": "rl", "step": 4, "of": 4, "done": 44, "total": 44}),
])
def test_each_metrics_point_says_where_the_trial_is(point: dict[str, Any], expected: dict[str, Any]) -> None:
    assert step_progress(point, 40, 4) == expected


def test_without_warm_up_the_untrained_evaluation_starts_rl() -> None:
    assert step_progress({"phase": "untrained", "step": 0}, 0, 4) == {"phase": "rl", "step": 0, "of": 4, "done": 0,
                                                                      "total": 4}


def test_an_unreadable_metrics_line_is_skipped_and_the_mirror_goes_on(tmp_path: Path) -> None:
    """The objective writes the file: a line of garbage must not end the thread that copies the curves."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    trial = optuna.create_study(storage=storage).ask()
    metrics = tmp_path / "metrics.jsonl"
    mirror = MetricsMirror(storage, trial._trial_id, metrics, {"sft_steps": 40, "rl_steps": 4})
    metrics.write_text('{"phase": "sft", "step": 0}\nnot json\n[1, 2]\n{"step": 3}\n')
    mirror.copy()
    with metrics.open("a") as out:
        out.write('{"phase": "sft", "step": 5}\n')
    mirror.copy()
    assert [p["step"] for p in mirror.points] == [0, 5]
    assert storage.get_trial(trial._trial_id).user_attrs[PROGRESS_ATTR]["step"] == 6


def _trial(number: int, state: TrialState, **attrs: Any) -> FrozenTrial:
    dist = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
            "lora_rank": optuna.distributions.IntDistribution(4, 16)}
    trial = optuna.trial.create_trial(state=state, value=0.21 if state == TrialState.COMPLETE else None,
                                      params={"learning_rate": 0.000312345, "lora_rank": 8}, distributions=dist,
                                      user_attrs=attrs)
    trial.number = number
    return trial


def test_off_a_terminal_run_prints_plain_lines_that_stay_one_line() -> None:
    out = io.StringIO()
    console = RunConsole("tiny", Console(file=out, width=40, soft_wrap=True, markup=False, highlight=False))
    assert not console.console.is_terminal
    with console:
        console.tally(Tally(0, 1, 0, 0, 0, 0, None), 2)
        console.tally(Tally(0, 1, 0, 0, 0, 0, None), 2)  # unchanged: no second line
        console.started(_trial(3, TrialState.RUNNING))
        console.started(_trial(4, TrialState.RUNNING, proposer="llm", proposer_model="openai:gemma"))
        for progress in ({"phase": "sft", "step": 1, "of": 40, "done": 1, "total": 44},
                         {"phase": "sft", "step": 2, "of": 40, "done": 2, "total": 44},  # same phase: no line
                         {"phase": "rl", "step": 1, "of": 4, "done": 41, "total": 44}):
            console.progress(3, progress)
        console.ended(_trial(3, TrialState.COMPLETE, eval_execution_accuracy_ci=[0.14, 0.3], n_eval=100,
                             wall_seconds=430.2))
        console.ended(_trial(4, TrialState.FAIL, failure_reason="worker exited with code 137 before finishing its trial"))
        console.notify("nothing left to run")
    assert out.getvalue().splitlines() == [
        "[tiny] running 1  done 0/2  complete 0  pruned 0  failed 0  best -",
        "trial 3 started (sampler): learning_rate=0.0003123, lora_rank=8",
        "trial 4 started (llm (openai:gemma)): learning_rate=0.0003123, lora_rank=8",
        "trial 3 SFT 1/40",
        "trial 3 RL 1/4",
        "trial 3 complete: 0.2100 [0.1400, 0.3000], n=100, 430 s",
        "trial 4 failed: worker exited with code 137 before finishing its trial",
        "warning: nothing left to run",
    ]


def test_on_a_terminal_run_draws_bars_for_the_study_and_each_running_trial() -> None:
    out = io.StringIO()
    console = RunConsole("tiny", Console(file=out, force_terminal=True, width=120, markup=False, highlight=False))
    with console:
        console.tally(Tally(0, 1, 0, 0, 0, 0, None), 2)
        console.started(_trial(3, TrialState.RUNNING))
        console.progress(3, {"phase": "sft", "step": 12, "of": 40, "done": 12, "total": 44})
        tasks = {task.description: (task.completed, task.total) for task in console._bars.tasks}
        console.ended(_trial(3, TrialState.COMPLETE))
        assert [task.description for task in console._bars.tasks] == [
            "[tiny] running 1  done 0/2  complete 0  pruned 0  failed 0  best -"]
    assert tasks == {"[tiny] running 1  done 0/2  complete 0  pruned 0  failed 0  best -": (0, 2),
                     "trial 3 SFT 12/40": (12, 44)}
    assert "trial 3 started (sampler): learning_rate=0.0003123, lora_rank=8" in out.getvalue()
    assert "[tiny] running 1" in out.getvalue()  # the study's name in brackets is text, not rich markup


def test_run_prints_a_line_as_each_trial_starts_and_ends(study_file: StudyFactory,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file(objective="raise_on_trial_one", n_trials=2, parallel=1)
    assert main(["run", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    for number in (0, 1):
        assert sum(line.startswith(f"trial {number} started (sampler): x=") for line in err) == 1
    assert sum(line.startswith("trial 0 complete: ") for line in err) == 1
    assert "trial 1 failed: ValueError: trial one is broken on purpose" in " ".join(err)


def _finished(spec_path: Path, n: int) -> tuple[Any, optuna.Study]:
    spec = load_spec(spec_path)
    study = open_study(spec, create=True)
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(
            params={"x": (i + 1) / (n + 1) + 1e-7}, distributions=distributions(spec), value=(i % 3) / 3,
            intermediate_values={0: 0.1, 1: 0.2}, user_attrs={"eval_execution_accuracy_ci": [0.125, 0.5]}))
    return spec, study


def test_the_report_tables_every_trial_rounded_with_its_interval(study_file: StudyFactory, tmp_path: Path) -> None:
    spec, study = _finished(study_file(), 3)
    text = write_report(spec, study, tmp_path / "report").read_text()
    assert "| trial | state | proposer | accuracy [95% CI] | `x` |" in text
    assert "| #0 | COMPLETE | sampler | 0.0000 [0.1250, 0.5000] | 0.25 |" in text
    assert "| #2 | COMPLETE | sampler | 0.6667 [0.1250, 0.5000] | 0.75 |" in text
    assert f"Caveat: drawn from 3 complete trial(s); below {MIN_TRIALS_FOR_IMPORTANCES}" in text
    for png in ("history.png", "learning_curves.png", "importances.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_a_study_without_a_completed_trial_still_tables_its_trials(study_file: StudyFactory, tmp_path: Path) -> None:
    spec = load_spec(study_file())
    study = open_study(spec, create=True)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.123456},
                                              distributions=distributions(spec), user_attrs={"failure_reason": "boom"}))
    text = write_report(spec, study, tmp_path / "report").read_text()
    assert "No trial has completed yet.\n\n## All trials" in text and "| #0 | FAIL | sampler | - | 0.1235 |" in text


def test_enough_trials_draw_importances_without_the_caveat(study_file: StudyFactory, tmp_path: Path) -> None:
    spec, study = _finished(study_file(), MIN_TRIALS_FOR_IMPORTANCES)
    text = write_report(spec, study, tmp_path / "report").read_text()
    assert "![importances](importances.png)" in text and "Caveat" not in text


def test_step_axes_get_whole_number_ticks(tmp_path: Path) -> None:
    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [0.1, 0.2])
    _save(ax, tmp_path / "curve.png", integer_x=True)
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 1]
    assert ticks == [0, 1]


def test_a_trials_learning_curve_ticks_whole_steps() -> None:
    points = [{"phase": "rl", "step": 0, "reward_mean": 0.1}, {"phase": "rl", "step": 1, "reward_mean": 0.3},
              {"phase": "eval", "step": 2, "eval_execution_accuracy": 0.25}]
    ax = draw_learning_curve(points)
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [0, 1, 2]
    pyplot().close(ax.figure)


def test_a_trial_of_an_earlier_autoresearch_with_curves_in_files_only_is_noted_not_read(
        study_file: StudyFactory, tmp_path: Path) -> None:
    spec = load_spec(study_file())
    study = open_study(spec, create=True)
    folder = tmp_path / "old-trial"
    folder.mkdir()
    hacked = [{"phase": "untrained", "step": 0, "untrained_execution_accuracy": 0.5},
              {"phase": "rl", "step": 0, "reward_mean": 0.1}, {"phase": "rl", "step": 1, "reward_mean": 0.9},
              {"phase": "eval", "step": 2, "eval_execution_accuracy": 0.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in hacked))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=distributions(spec),
                                              user_attrs={"run_dir": str(folder)}))
    text = write_report(spec, study, tmp_path / "report").read_text()
    assert "## Possible reward hacking\n\nNone found among the trials checked." in text
    assert "Not checked: #0, recorded by an earlier autoresearch" in text and "training reward rose" not in text


def test_a_note_says_why_the_sampler_took_an_llm_slot_and_what_a_retry_retries() -> None:
    fallback = _trial(5, TrialState.WAITING, proposer_fallback="TimeoutError: no reply within 30 s")
    fallback.system_attrs = {"failed_trial": 2, "retry_history": [2]}
    note = trial_note(fallback, "TPESampler")
    assert note.splitlines()[0] == "## Proposed by the sampler (TPESampler)"
    assert "This was the LLM's slot; the sampler took it over: TimeoutError: no reply within 30 s" in note
    assert "A retry of trial #2, with its parameters." in note
    assert "| `learning_rate` | 0.0003123 |" in note and "| `lora_rank` | 8 |" in note
    proposed = _trial(6, TrialState.WAITING, proposer="llm", proposer_model="gemini:gemini-2.5-flash",
                      rationale="rank 8 was never tried", proposal_adjustments=["learning_rate clamped to 0.001"])
    note = trial_note(proposed, "TPESampler")
    assert note.startswith("## Proposed by the LLM (gemini:gemini-2.5-flash)\n\nrank 8 was never tried\n")
    assert "Adjusted to fit the search space: learning_rate clamped to 0.001" in note

"""``run`` tells how a study ended: non-zero with the last failure when nothing completed, how to go on once
the budget is spent, an edited study file, and no training service when there is nothing left to run."""

from __future__ import annotations

import json

import pytest
from optuna.trial import TrialState

from autoresearch.cli import main
from autoresearch.preflight import study_file_sha256
from autoresearch.spec import load_spec
from autoresearch.study import STUDY_FILE_ATTR, STUDY_FILE_HISTORY_ATTR, open_study
from tests.autoresearch.conftest import StudyFactory
from tests.autoresearch.helpers import trials


def test_a_study_whose_every_trial_fails_exits_non_zero_with_the_reason(
        study_file: StudyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file(objective="always_fails", n_trials=2, parallel=2)
    assert main(["run", str(path)]) == 1
    captured = capsys.readouterr()
    assert "2 trials settled (0 complete, 0 pruned, 2 failed), best none" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"error: study '{load_spec(path).name}' has no completed trial; last failure, trial ")
    assert "RuntimeError: broken on purpose (x=" in last
    assert f"`autoresearch run {path} --retry-failed` runs the 2 failed trial(s) again" in captured.err
    assert [t.state for t in trials(path)] == [TrialState.FAIL] * 2


def test_a_spent_budget_says_how_to_go_on_and_retry_failed_reruns_the_failures(
        study_file: StudyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file(objective="always_fails", n_trials=2, parallel=2)
    assert main(["run", str(path)]) == 1
    first = trials(path)
    capsys.readouterr()

    # Run again unchanged: nothing is left, nothing is started, and the way on is named.
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "warning: nothing left to run: 2 of 2 trials settled" in err
    assert f"budget of 2 trials spent: `autoresearch run {path} --n-trials 4` adds 2 trial(s) to the budget" in err
    assert len(trials(path)) == 2

    # The fix: an edited study file is reported, and --retry-failed runs the failed trials again.
    path.write_text(path.read_text().replace("objectives:always_fails", "objectives:sleepy"))
    assert main(["run", str(path), "--retry-failed"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path.resolve()} changed since trials 0-1 of study" in err
    assert "warning: queued 2 failed trial(s) again: #0, #1" in err
    after = trials(path)
    assert [t.state for t in after] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert sorted(t.system_attrs["failed_trial"] for t in after[2:]) == [0, 1]
    assert {t.system_attrs["failed_trial"]: t.params for t in after[2:]} == {t.number: t.params for t in first}
    # Each trial records the study file it ran under; the study, every version it ran under.
    assert {t.user_attrs[STUDY_FILE_ATTR] for t in after[2:]} == {study_file_sha256(load_spec(path))}
    assert {t.user_attrs[STUDY_FILE_ATTR] for t in after[:2]} != {study_file_sha256(load_spec(path))}
    study = open_study(load_spec(path))
    assert [v["first_trial"] for v in study.user_attrs[STUDY_FILE_HISTORY_ATTR]] == [0, 2]
    assert main(["status", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["other_study_file_trials"] == [0, 1] and document["settled"] == 2
    assert main(["status", str(path)]) == 0
    assert "warning: trial(s) 0, 1 ran under another version of the study file" in capsys.readouterr().out

    # More trials through --n-trials, as the hint says.
    assert main(["run", str(path), "--n-trials", "3"]) == 0
    assert [t.state for t in trials(path)].count(TrialState.COMPLETE) == 3


def test_nothing_left_to_run_starts_no_training_service(study_file: StudyFactory,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file(n_trials=1, parallel=1)
    assert main(["run", str(path)]) == 0
    spec = load_spec(path)
    # Now ask for a local service: were it started, it would make the tiny model and write its log.
    path.write_text(path.read_text().replace('api = "none"', 'api = "local"'))
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    err = capsys.readouterr().err
    assert "nothing left to run: 1 of 1 trials settled" in err and "--n-trials 2" in err
    assert not (spec.run_folder / "trainer.log").exists() and not any(spec.run_folder.glob("tiny-model*"))
    assert "--retry-failed" not in err  # no trial failed


def test_an_unchanged_study_file_is_not_reported(study_file: StudyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file(n_trials=1, parallel=1)
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path), "--n-trials", "2"]) == 0
    assert "changed since" not in capsys.readouterr().err
    study = open_study(load_spec(path))
    assert study.user_attrs[STUDY_FILE_ATTR] == study_file_sha256(load_spec(path))
    assert len(study.user_attrs[STUDY_FILE_HISTORY_ATTR]) == 1

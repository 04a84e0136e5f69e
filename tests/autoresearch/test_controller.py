"""The controller on real storages with trivial objectives: parallelism, failures, timeouts, kills and resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

from autoresearch.cli import main
from autoresearch.controller import run_study
from autoresearch.params import distributions
from autoresearch.spec import load_spec
from autoresearch.study import open_study
from tests.autoresearch.conftest import StudyFactory
from tests.autoresearch.helpers import start_controller, trials, wait_for


def _events(path: Path) -> list[dict]:
    spec = load_spec(path)
    return [json.loads(line) for f in sorted((spec.run_folder / "trials").glob("*/events.jsonl")) for line in f.read_text().splitlines()]


def test_parallel_trials_overlap(study_file: StudyFactory) -> None:
    path = study_file(n_trials=3, parallel=3, sleep=1.5)
    state = run_study(load_spec(path), poll_s=0.05)
    assert (state.complete, state.settled, state.running) == (3, 3, 0)
    changes = sorted((e["t"], 1 if e["event"] == "start" else -1) for e in _events(path))
    running, most = 0, 0
    for _, change in changes:
        running += change
        most = max(most, running)
    assert most >= 2
    assert all(t.user_attrs["proposer"] == "sampler" and t.user_attrs["wall_seconds"] >= 1.4 for t in trials(path))
    assert all(t.intermediate_values for t in trials(path))


def test_no_worker_process_outlives_the_study(study_file: StudyFactory) -> None:
    path = study_file(n_trials=3, parallel=2)
    assert run_study(load_spec(path), poll_s=0.05).complete == 3
    # The launcher keeps spare workers forked while it waits; once the study ends they must be gone too.
    assert multiprocessing.active_children() == []


def test_a_raising_trial_fails_with_its_reason_and_the_study_goes_on(study_file: StudyFactory) -> None:
    path = study_file(objective="raise_on_trial_one", n_trials=3, parallel=1)
    state = run_study(load_spec(path), poll_s=0.05)
    assert (state.complete, state.failed_final, state.settled) == (2, 1, 3)
    failed = [t for t in trials(path) if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1]
    assert failed[0].user_attrs["failure_reason"] == "ValueError: trial one is broken on purpose"


def test_pruned_trials_count_towards_the_budget(study_file: StudyFactory) -> None:
    path = study_file(objective="prunable", n_trials=8, parallel=1,
                      extra="[pruner]\ntype = \"median\"\nn_startup_trials = 2\n[sampler]\ntype = \"random\"\n")
    state = run_study(load_spec(path), poll_s=0.05)
    assert state.pruned >= 1 and state.complete + state.pruned == state.settled == 8
    pruned = [t for t in trials(path) if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["wall_seconds"] is not None and t.intermediate_values for t in pruned)


def test_a_hanging_trial_is_killed_at_its_timeout(study_file: StudyFactory) -> None:
    path = study_file(objective="hang_on_trial_zero", n_trials=2, parallel=2, timeout_s=3)
    state = run_study(load_spec(path), poll_s=0.05)
    assert (state.complete, state.failed_final) == (1, 1)
    hung = trials(path)[0]
    assert hung.state == TrialState.FAIL
    assert hung.user_attrs["failure_reason"] == "timeout: killed after 3 s"


@pytest.mark.postgres
def test_a_killed_worker_is_retried_and_the_study_completes(study_file: StudyFactory, postgres_url: str) -> None:
    path = study_file(n_trials=6, parallel=4, sleep=4.0, storage=postgres_url)
    controller = start_controller(path)
    try:
        wait_for(lambda: len({e["pid"] for e in _events(path)}) >= 4, 60, "four workers to start")
        victim = _events(path)[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert controller.wait(timeout=120) == 0, controller.stdout.read()
    finally:
        controller.kill()
    done = trials(path)
    failed = [t for t in done if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["failure_reason"] == "worker killed by signal 9 before finishing its trial"
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == failed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_count"] == 1
    assert retry.params == failed[0].params
    assert sum(t.state == TrialState.COMPLETE for t in done) == 6 and len(done) == 7


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_killed_controller_resumes_without_losing_or_repeating_trials(
    study_file: StudyFactory, storage: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else None
    path = study_file(n_trials=8, parallel=4, sleep=1.5, storage=url)
    controller = start_controller(path)
    try:
        # A fifth trial is asked once the first four finished: the kill lands with the second wave in flight.
        wait_for(lambda: len(trials(path)) > 4, 60, "a second wave of trials")
        controller.send_signal(signal.SIGKILL)
        controller.wait()
    finally:
        controller.kill()
    before = {t.number: t.state for t in trials(path)}
    state = run_study(load_spec(path), poll_s=0.05)
    after = trials(path)
    assert state.settled == 8 and state.running == 0
    assert [t.number for t in after] == list(range(len(after)))
    # Orphaned workers finish their own trials; only one asked but never launched (the kill can land between
    # the two) fails, as lost, and is retried with the parameters it had (the kill can even land mid-ask, before
    # all were sampled: the retry samples the rest).
    lost = [t for t in after if t.state == TrialState.FAIL]
    assert all(t.user_attrs["failure_reason"].startswith("worker lost") for t in lost) and len(lost) <= 1
    retries = {t.system_attrs["failed_trial"]: t for t in after if "failed_trial" in t.system_attrs}
    assert sorted(retries) == [t.number for t in lost]
    for t in lost:
        assert retries[t.number].state == TrialState.COMPLETE and retries[t.number].params.items() >= t.params.items()
    # Every number is one attempt: the budget's 8 trials complete once each, a lost one counts only through its retry.
    assert sum(t.state == TrialState.COMPLETE for t in after) == 8 and len(after) == 8 + len(lost)
    ended = [e for e in _events(path) if e["event"] == "end"]
    assert len(ended) == 8  # no objective ran twice
    assert {n for n, s in before.items() if s == TrialState.COMPLETE} <= {t.number for t in after if t.state == TrialState.COMPLETE}


def test_interrupt_fails_running_trials_as_interrupted_and_resume_retries_them(
    study_file: StudyFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    path = study_file(n_trials=3, parallel=2, sleep=30.0)
    controller = start_controller(path)
    try:
        wait_for(lambda: len(_events(path)) >= 2, 60, "two workers to start")
        assert main(["run", str(path)]) == 2  # one controller per study
        assert capsys.readouterr().err.startswith(f"error: another controller (pid {controller.pid}) is running study")
        controller.send_signal(signal.SIGINT)
        assert controller.wait(timeout=30) == 130
    finally:
        controller.kill()
    interrupted = trials(path)
    assert [t.user_attrs["failure_reason"] for t in interrupted if t.state == TrialState.FAIL] == ["interrupted"] * 2
    assert sum(t.state == TrialState.WAITING for t in interrupted) == 2
    path.write_text(path.read_text().replace("sleep = 30.0", "sleep = 0.0"))  # the retries need not wait
    state = run_study(load_spec(path), poll_s=0.05)
    assert (state.complete, state.settled) == (3, 3)
    retried = [t for t in trials(path) if t.system_attrs.get("failed_trial") is not None]
    assert len(retried) == 2 and all(t.state == TrialState.COMPLETE for t in retried)


def test_trials_of_a_controller_killed_with_its_workers_are_reaped_by_heartbeat(study_file: StudyFactory) -> None:
    path = study_file(n_trials=3, parallel=2, sleep=30.0)
    controller = start_controller(path)
    try:
        wait_for(lambda: len(_events(path)) >= 2, 60, "two workers to start")
        controller.send_signal(signal.SIGKILL)
        for pid in {e["pid"] for e in _events(path)}:
            os.kill(pid, signal.SIGKILL)
    finally:
        controller.kill()
        controller.wait()
    path.write_text(path.read_text().replace("sleep = 30.0", "sleep = 0.0"))
    state = run_study(load_spec(path), poll_s=0.05)
    assert (state.complete, state.settled) == (3, 3)
    lost = [t for t in trials(path) if t.state == TrialState.FAIL]
    assert [t.user_attrs["failure_reason"] for t in lost] == ["worker lost: no heartbeat for 4 s"] * 2


def test_a_trial_asked_by_a_controller_that_died_before_launching_it_is_reaped(study_file: StudyFactory) -> None:
    path = study_file(n_trials=2, parallel=2)
    spec = load_spec(path)
    open_study(spec, create=True).ask(distributions(spec))  # RUNNING, no worker, no heartbeat
    state = run_study(spec, poll_s=0.05)
    assert (state.complete, state.settled) == (2, 2)
    orphan = trials(path)[0]
    assert orphan.state == TrialState.FAIL and orphan.user_attrs["failure_reason"] == "worker lost: no heartbeat for 4 s"


def test_each_trial_records_whether_it_looks_like_reward_hacking(study_file: StudyFactory) -> None:
    path = study_file(objective="reward_rises_held_out_falls", n_trials=6, parallel=2)
    run_study(load_spec(path), poll_s=0.05)
    done = trials(path)
    assert {t.state for t in done} == {TrialState.COMPLETE} and len(done) == 6
    for trial in done:
        if trial.params["x"] > 0.5:
            assert trial.user_attrs["reward_hacking"] == ("training reward rose 0.200 -> 0.900 while held-out "
                                                          "accuracy fell 0.500 -> 0.300")
        else:
            assert trial.user_attrs["reward_hacking"] is None
    assert any(t.params["x"] > 0.5 for t in done) and any(t.params["x"] <= 0.5 for t in done)


def test_a_study_file_broken_mid_run_is_one_error_line_and_exit_2(study_file: StudyFactory) -> None:
    from autoresearch.launchers import EXIT_CONFIG_ERROR
    from autoresearch.launchers.local import LocalLauncher

    path = study_file()
    spec = load_spec(path)
    launcher = LocalLauncher(spec)
    path.write_text(path.read_text() + "\n[budget\n")  # edited into invalid TOML after the controller read it
    try:
        worker = launcher.launch(0, 1, None)
        worker.proc.join(60)
        assert worker.exit_code() == EXIT_CONFIG_ERROR
    finally:
        launcher.close()
    log = (spec.trial_dir(0) / "worker.log").read_text().strip()
    assert log.startswith("error: ") and "not valid TOML" in log and "Traceback" not in log and "\n" not in log

"""End to end: the controller starts ``python -m trainer_api serve`` on a freshly made tiny model, and two
workers run ``run_trial`` (SFT warm-up, RL steps, held-out evaluations) through the tinker SDK; and
``run_trial`` called directly on such a service, to see that its scoring processes end however it ends."""

from __future__ import annotations

import json
import multiprocessing.resource_tracker
import os
import re
import signal
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from optuna.trial import TrialState

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("tinker")

from optuna.artifacts import get_all_artifact_meta  # noqa: E402

from autoresearch import run_trial  # noqa: E402
from autoresearch.cli import main  # noqa: E402
from autoresearch.spec import DatasetSpec, StudySpec, load_spec  # noqa: E402
from autoresearch.stats import accuracy, decode_matches  # noqa: E402
from autoresearch.study import make_storage  # noqa: E402
from autoresearch.trainer_service import TrainerService, start_trainer  # noqa: E402
from tests.autoresearch.conftest import StudyFactory  # noqa: E402
from tests.autoresearch.helpers import start_controller, trials, wait_for  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "studies" / "text2sql-tiny.toml"
# the study's own schedule is sized to learn in minutes; here one step of each phase checks the loop
ONE_STEP_EACH = {"n_trials": 2, "sft_steps": 1, "sft_batch_size": 2, "rl_steps": 1, "prompts_per_step": 2,
                 "samples_per_prompt": 2, "max_tokens": 24, "n_train": 32, "n_eval": 8}
EVALUATIONS = ("untrained_eval_", "sft_eval_", "eval_")


def _one_step_study(folder: Path) -> Path:
    text = TINY.read_text()
    for key, value in ONE_STEP_EACH.items():
        text, found = re.subn(rf"(?m)^{key} = \d+$", f"{key} = {value}", text)
        assert found == 1, key
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def _assert_consistent_evaluations(found: dict[str, Any], n_examples: int) -> None:
    """Each recorded evaluation: its accuracy is its match vector's, inside its interval, over ``n_eval`` examples."""
    for prefix in EVALUATIONS:
        vector = decode_matches(found[f"{prefix}matches"])
        assert len(vector) == n_examples
        assert sum(m is not None for m in vector) == found["n_eval"]
        assert found[f"{prefix}execution_accuracy"] == accuracy(vector).value
        low, high = found[f"{prefix}execution_accuracy_ci"]
        assert 0.0 <= low <= found[f"{prefix}execution_accuracy"] <= high <= 1.0 and low < high
    assert len(found["eval_examples_sha256"]) == 64


def test_tiny_study_trains_through_the_training_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _one_step_study(tmp_path)
    assert main(["run", str(path)]) == 0
    spec = load_spec(path)
    done = trials(path)
    err = capsys.readouterr().err
    for trial in done:  # run's line as each trial starts and ends; the worker's last copy of its progress
        assert f"trial {trial.number} started (sampler): " in err
        assert re.search(rf"trial {trial.number} complete: \d\.\d{{4}} \[\d\.\d{{4}}, \d\.\d{{4}}\], n=8, ", err)
        assert trial.user_attrs["progress"] == {"phase": "rl", "step": 1, "of": 1, "done": 2, "total": 2}
    storage = make_storage(spec)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2, [t.user_attrs.get("failure_reason") for t in done]
    for trial in done:
        assert 0.0 <= trial.value <= 1.0
        assert trial.user_attrs["adapter_id"] and trial.user_attrs["checkpoint"].startswith("tinker://")
        assert trial.user_attrs["device"] == spec.training.device and trial.user_attrs["device_seconds"] > 0
        assert set(trial.user_attrs["reward_config"]) >= {"executes", "result_overlap"}
        assert trial.intermediate_values  # the held-out curve the pruner sees
        _assert_consistent_evaluations(trial.user_attrs, spec.dataset.n_eval)
        assert trial.value == trial.user_attrs["eval_execution_accuracy"]
        rl_rewards = [json.loads(line).get("reward_mean") for line in (spec.trial_dir(trial.number) / "metrics.jsonl").open()]
        assert trial.user_attrs["train_reward_mean"] == [r for r in rl_rewards if r is not None][-1]
        artifacts = get_all_artifact_meta(trial, storage=storage)
        assert {a.filename for a in artifacts} == {"metrics.jsonl", "learning_curve.png", "predictions.jsonl"}
        run_dir = spec.trial_dir(trial.number)
        points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [p["phase"] for p in points] == ["untrained", "sft", "sft_eval", "rl", "eval"]
        for point, prefix in zip([points[0], points[2], points[4]], ("untrained_eval_", "sft_eval_", "eval_")):
            assert point["ci"] == trial.user_attrs[f"{prefix}execution_accuracy_ci"]
            assert point["n_eval"] == trial.user_attrs["n_eval"]
        assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == spec.dataset.n_eval
        # What the report and the LLM read is in the storage, copied there by the worker from this folder.
        assert trial.user_attrs["trial_dir"] == f"trials/{trial.number:05d}"
        assert trial.user_attrs["curves"]["train"] == [r for r in rl_rewards if r is not None]
        assert trial.user_attrs["curves"]["held"] == [points[2]["eval_execution_accuracy"], trial.value]
        rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
        wrong = [r["question"] for r in rows if r["verdict"] not in ("match", "gold_error")][:3]
        assert [w["question"] for w in trial.user_attrs.get("wrong_predictions", [])] == wrong
    assert len({t.user_attrs["eval_examples_sha256"] for t in done}) == 1  # the same held-out examples, so paired
    size = spec.training.tiny_model  # the model was made at the study file's size
    config = json.loads((spec.run_folder / f"tiny-model-h{size.hidden_size}-l{size.num_layers}" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (size.hidden_size, size.num_layers)
    capsys.readouterr()
    assert main(["status", str(path)]) == 0
    assert "held-out accuracy, 95% CI, n=" in capsys.readouterr().out
    assert main(["report", str(path)]) == 0
    report = (spec.run_folder / "report" / "report.md").read_text()
    assert "## Held-out execution accuracy" in report
    assert re.search(r"- The best trial #\d and the runner-up #\d (are|are not) distinguishable", report), report
    assert re.search(r"- The best trial #\d and its own after-SFT evaluation (are|are not) distinguishable", report)
    assert (spec.run_folder / "trainer.log").read_text().count('"model unloaded"') == 2  # adapters are released


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet (an orphan's new parent may be slow to)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
def test_a_killed_controller_takes_its_local_trainer_and_workers_down(study_file: StudyFactory) -> None:
    path = study_file(n_trials=1, parallel=1, sleep=120.0)
    path.write_text(path.read_text().replace('api = "none"', 'api = "local"'))
    controller = start_controller(path)
    try:
        events = load_spec(path).trial_dir(0) / "events.jsonl"
        wait_for(events.exists, 300, "the trial to start (after the training service answered)")
        trainer = next(pid for pid in _children(controller.pid)
                       if "trainer_api" in Path(f"/proc/{pid}/cmdline").read_text())
        worker = json.loads(events.read_text().splitlines()[0])["pid"]
        controller.send_signal(signal.SIGKILL)
        controller.wait()
        wait_for(lambda: not _alive(trainer), 60, "the training service to exit")
        # The service is gone, so its worker would fail on its next call: it dies too, to be retried as lost.
        wait_for(lambda: not _alive(worker), 60, "the worker to exit")
    finally:
        controller.kill()
        controller.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StudySpec, TrainerService]]:
    """The tiny study's training service, started as the controller would, for run_trial called in this process."""
    spec = load_spec(_one_step_study(tmp_path_factory.mktemp("service")))
    trainer = start_trainer(spec)
    # the first process multiprocessing spawns starts this process's resource tracker, which stays: start it
    # now, so that the tests below see only what run_trial started
    multiprocessing.resource_tracker.ensure_running()
    yield spec, trainer
    trainer.stop()


def _live_children() -> set[int]:
    """This process's live children, started from any of its threads."""
    tasks = Path(f"/proc/{os.getpid()}/task").iterdir()
    return {int(c) for task in tasks for c in (task / "children").read_text().split() if _alive(int(c))}


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


PARAMS = {"learning_rate": 1e-2, "lora_rank": 8, "sft_steps": 1, "sft_batch_size": 2, "rl_steps": 1,
          "prompts_per_step": 2, "samples_per_prompt": 2, "max_tokens": 24}
DATASET = DatasetSpec(source="synthetic:retail", n_train=32, n_eval=8)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
def test_a_pruned_trial_keeps_its_baselines_and_closes_its_scoring_pool(
        service: tuple[StudySpec, TrainerService], tmp_path: Path) -> None:
    spec, trainer = service
    before = _live_children()  # the training service, and what earlier tests left (a forkserver, say)
    trial = optuna.create_study(direction="maximize", pruner=_AlwaysPrune()).ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at RL step 1"):
        run_trial(PARAMS, trainer_url=trainer.url, api_key=spec.training.api_key, dataset=DATASET,
                  run_dir=tmp_path / "pruned", optuna_trial=trial)
    assert _live_children() <= before
    attrs = trial.study.trials[0].user_attrs  # what it measured before it was stopped
    _assert_consistent_evaluations(attrs, DATASET.n_eval)
    assert attrs["device_seconds"] > 0


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
def test_a_failed_trial_closes_its_scoring_pool(service: tuple[StudySpec, TrainerService], tmp_path: Path) -> None:
    spec, trainer = service
    before = _live_children()
    with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises for an unknown model
        run_trial(PARAMS, trainer_url=trainer.url, api_key=spec.training.api_key, dataset=DATASET,
                  run_dir=tmp_path / "failed", base_model="no-such-model")
    assert _live_children() <= before


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
def test_without_a_warm_up_there_is_no_after_sft_evaluation(service: tuple[StudySpec, TrainerService],
                                                            tmp_path: Path) -> None:
    spec, trainer = service
    before = _live_children()
    result = run_trial({**PARAMS, "sft_steps": 0}, trainer_url=trainer.url, api_key=spec.training.api_key,
                       dataset=DATASET, run_dir=tmp_path / "rl-only")
    assert _live_children() <= before
    assert not any(key.startswith("sft_eval_") for key in result)
    assert result["objective"] == result["eval_execution_accuracy"]
    assert len(decode_matches(result["untrained_eval_matches"])) == len(decode_matches(result["eval_matches"])) == 8
    phases = [json.loads(line)["phase"] for line in (tmp_path / "rl-only" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["untrained", "rl", "eval"]

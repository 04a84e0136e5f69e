"""End to end: the controller starts ``python -m trainer_api serve`` on a freshly made tiny model, and two
workers run ``run_trial`` (SFT warm-up, RL steps, held-out evaluation) through the tinker SDK."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("tinker")

from optuna.artifacts import get_all_artifact_meta  # noqa: E402

from autoresearch.cli import main  # noqa: E402
from autoresearch.spec import load_spec  # noqa: E402
from autoresearch.study import make_storage  # noqa: E402
from autoresearch.trial import group_advantages  # noqa: E402
from tests.autoresearch.conftest import StudyFactory  # noqa: E402
from tests.autoresearch.helpers import start_controller, trials, wait_for  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "studies" / "text2sql-tiny.toml"


def test_group_advantages_are_normalised_within_the_group() -> None:
    assert group_advantages([1.0, 0.0, 1.0, 0.0]) == [1.0, -1.0, 1.0, -1.0]
    assert group_advantages([0.3, 0.3]) == [0.0, 0.0]


def test_tiny_study_trains_through_the_training_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = TINY.read_text()
    # the study's own schedule is sized to learn in minutes; here one step of each phase checks the loop
    for key, value in {"n_trials": 2, "sft_steps": 1, "sft_batch_size": 2, "rl_steps": 1, "prompts_per_step": 2,
                       "samples_per_prompt": 2, "max_tokens": 24, "n_train": 32, "n_eval": 8}.items():
        text, found = re.subn(rf"(?m)^{key} = \d+$", f"{key} = {value}", text)
        assert found == 1, key
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    assert main(["run", str(path)]) == 0
    spec = load_spec(path)
    done = trials(path)
    storage = make_storage(spec)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2, [t.user_attrs.get("failure_reason") for t in done]
    for trial in done:
        assert 0.0 <= trial.value <= 1.0
        assert trial.user_attrs["adapter_id"] and trial.user_attrs["checkpoint"].startswith("tinker://")
        assert trial.user_attrs["device"] == spec.training.device and trial.user_attrs["device_seconds"] > 0
        assert set(trial.user_attrs["reward_config"]) >= {"executes", "result_overlap"}
        assert trial.intermediate_values  # the held-out curve the pruner sees
        assert 0.0 <= trial.user_attrs["untrained_eval_execution_accuracy"] <= 1.0  # the baseline, before training
        rl_rewards = [json.loads(line).get("reward_mean") for line in (spec.trial_dir(trial.number) / "metrics.jsonl").open()]
        assert trial.user_attrs["train_reward_mean"] == [r for r in rl_rewards if r is not None][-1]
        artifacts = get_all_artifact_meta(trial, storage=storage)
        assert {a.filename for a in artifacts} == {"metrics.jsonl", "learning_curve.png", "predictions.jsonl"}
        run_dir = spec.trial_dir(trial.number)
        phases = [json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert phases == ["untrained", "sft", "rl", "eval"]
        assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == spec.dataset.n_eval
    assert (spec.run_folder / "tiny-model" / "config.json").exists()
    assert main(["report", str(path)]) == 0
    assert "Held-out execution accuracy untrained: " in (spec.run_folder / "report" / "report.md").read_text()
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

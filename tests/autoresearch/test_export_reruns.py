"""An exported trial, run through ``run_trial`` on a real (tiny) training service, uses the study's dataset and
params; a refused key is one line. Starts ``python -m trainer_api serve`` as the controller would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("tinker")

import autoresearch  # noqa: E402
from autoresearch.cli import main  # noqa: E402
from autoresearch.spec import DatasetSpec, StudySpec  # noqa: E402
from autoresearch.trainer_service import TrainerService, start_trainer  # noqa: E402
from autoresearch.trial.data import load_examples  # noqa: E402
from autoresearch.trial.evaluation import examples_digest  # noqa: E402
from tests.autoresearch.test_export import add_trials, write_study  # noqa: E402


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, StudySpec, TrainerService]]:
    path = write_study(tmp_path_factory.mktemp("rerun"))
    spec = autoresearch.load_spec(path)
    add_trials(spec)
    trainer = start_trainer(spec)
    yield path, spec, trainer
    trainer.stop()


def test_an_exported_trial_reruns_on_the_studys_dataset_and_params(
        service: tuple[Path, StudySpec, TrainerService], tmp_path: Path) -> None:
    path, spec, trainer = service
    out = tmp_path / "best.json"
    assert main(["best", str(path), "--export", str(out)]) == 0
    doc = json.loads(out.read_text())
    # The documented one-liner, with the caller's URL and key.
    result = autoresearch.run_trial(**doc["run_trial"], trainer_url=trainer.url, api_key=spec.training.api_key,
                                    run_dir=tmp_path / "rerun")
    held_out = load_examples(spec.dataset)[1]
    assert result["eval_examples_sha256"] == examples_digest(held_out)  # the study's 8 retail examples ...
    assert result["eval_examples_sha256"] != examples_digest(load_examples(DatasetSpec())[1])  # ... not the default 50
    assert result["n_eval"] <= spec.dataset.n_eval == 8 and len(result["eval_matches"]) == 8
    assert result["reward_config"] == doc["reward_config"]
    points = [json.loads(line) for line in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()]
    assert [p["phase"] for p in points] == ["untrained", "sft", "sft_eval", "rl", "eval"]  # sft_steps 1, rl_steps 1


def test_a_refused_key_is_one_line(service: tuple[Path, StudySpec, TrainerService], tmp_path: Path) -> None:
    path, spec, trainer = service
    assert main(["best", str(path), "--export", str(tmp_path / "best.json")]) == 0
    doc = json.loads((tmp_path / "best.json").read_text())
    with pytest.raises(autoresearch.TrainingServiceError, match=f"the training service at {trainer.url} refused the API key") as error:
        autoresearch.run_trial(**doc["run_trial"], trainer_url=trainer.url, api_key="tml-not-this-one",
                               run_dir=tmp_path / "refused")
    assert "\n" not in str(error.value) and "tml-not-this-one" not in str(error.value)

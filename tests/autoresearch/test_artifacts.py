"""The study's artifact store: which one a study file names, and what a worker keeps when the store fails."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from autoresearch.artifacts import open_artifact_store, upload_files
from autoresearch.params import distributions
from autoresearch.recording import ARTIFACTS_ERROR_ATTR, WRONG_PREDICTIONS_ATTR, keep_outputs
from autoresearch.spec import SpecError, load_spec
from autoresearch.study import open_study
from autoresearch.worker import run_worker
from tests.autoresearch.conftest import StudyFactory


def test_by_default_artifacts_sit_next_to_the_sqlite_file(study_file: StudyFactory) -> None:
    spec = load_spec(study_file())
    assert spec.artifact_dir == spec.run_folder / "artifacts"
    assert isinstance(open_artifact_store(spec), FileSystemArtifactStore) and spec.artifact_dir.is_dir()


def test_a_folder_is_relative_to_the_study_file_and_holds_what_is_uploaded(study_file: StudyFactory,
                                                                           tmp_path: Path) -> None:
    path = study_file()
    path.write_text('artifact_store = "shared/artifacts"\n' + path.read_text())
    spec = load_spec(path)
    assert spec.artifact_dir == (tmp_path / "shared" / "artifacts").resolve()
    study = open_study(spec, create=True)
    trial = study.ask(distributions(spec))
    (tmp_path / "metrics.jsonl").write_text('{"phase": "rl", "step": 0}\n')
    store = open_artifact_store(spec)
    assert upload_files(store, [tmp_path / "metrics.jsonl", tmp_path / "missing.png"], trial) == ["metrics.jsonl"]
    [meta] = get_all_artifact_meta(trial)
    assert meta.filename == "metrics.jsonl"  # its name, not the folder it came from
    download_artifact(artifact_store=store, artifact_id=meta.artifact_id, file_path=str(tmp_path / "back.jsonl"))
    assert (tmp_path / "back.jsonl").read_text() == '{"phase": "rl", "step": 0}\n'
    assert list((tmp_path / "shared" / "artifacts").iterdir())


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@pytest.mark.parametrize(("url", "extra", "module"), [("gs://my-bucket/", "gcs", "google.cloud.storage"),
                                                      ("s3://my-bucket", "s3", "boto3")])
def test_a_bucket_opens_optunas_store_for_it_or_names_the_missing_extra(
        study_file: StudyFactory, url: str, extra: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = study_file()
    path.write_text(f'artifact_store = "{url}"\n' + path.read_text())
    spec = load_spec(path)
    assert spec.artifact_store == url.rstrip("/") and spec.artifact_dir is None
    if not _importable(module):
        with pytest.raises(SpecError, match=rf"artifact_store {url.rstrip('/')}: its SDK is not installed "
                                            rf"\(pip install 'autoresearch\[{extra}\]'\)"):
            open_artifact_store(spec)
        return
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        store = open_artifact_store(spec)
    except SpecError as error:  # a GCS client needs credentials; without them the error says so in one line
        assert "cannot open it" in str(error) and "\n" not in str(error)
        return
    assert getattr(store, "bucket_name", getattr(store, "bucket", None)) == "my-bucket"


def test_a_store_that_fails_leaves_the_trial_its_result_and_the_reason(study_file: StudyFactory,
                                                                       tmp_path: Path) -> None:
    path = study_file()
    (tmp_path / "not-a-folder").write_text("")
    spec = load_spec(path)
    study = open_study(spec, create=True)
    trial = study.ask(distributions(spec))
    run_dir = tmp_path / "trial"
    run_dir.mkdir()
    rows = [{"question": "q1", "prediction": "SELECT 1", "verdict": "match"},
            {"question": "q2", "prediction": "SELECT 2", "verdict": "mismatch"},
            {"question": "q3", "prediction": "x" * 5000, "verdict": "invalid_sql"}]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    path.write_text(f'artifact_store = "{tmp_path / "not-a-folder"}"\n' + path.read_text())
    keep_outputs(trial, load_spec(path), run_dir)
    study.tell(trial, 0.5)
    [frozen] = open_study(spec).trials
    assert frozen.state == optuna.trial.TrialState.COMPLETE
    assert frozen.user_attrs[ARTIFACTS_ERROR_ATTR].startswith("FileExistsError")
    wrong = frozen.user_attrs[WRONG_PREDICTIONS_ATTR]
    assert [w["question"] for w in wrong] == ["q2", "q3"] and len(wrong[1]["prediction"]) == 2000


def test_a_retry_shows_its_own_outputs_not_those_it_inherited(study_file: StudyFactory) -> None:
    """A retry inherits its trial's user attrs; its worker clears what the earlier attempt's outputs left."""
    spec = load_spec(study_file(objective="sleepy"))
    study = open_study(spec, create=True)
    earlier = {"curves": {"train": [0.1, 0.9], "held": [0.5, 0.1], "n_eval": 100},
               "wrong_predictions": [{"question": "q", "prediction": "p", "verdict": "mismatch"}],
               "artifacts_error": "OSError: earlier"}
    study.enqueue_trial({"x": 0.5}, user_attrs=earlier)
    trial = study.ask(distributions(spec))
    assert run_worker(spec, trial.number) == 0
    [frozen] = open_study(spec).trials
    assert {key: frozen.user_attrs[key] for key in earlier} == dict.fromkeys(earlier)
    assert frozen.user_attrs["reward_hacking"] is None

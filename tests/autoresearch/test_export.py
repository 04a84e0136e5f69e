"""``best --export`` and ``best --trial N`` write a trial as ``run_trial``'s own keywords, so that
``run_trial(**doc["run_trial"], trainer_url=...)`` re-runs it on the study's dataset; ``run_trial`` fails in
one line, within seconds, when the service does not answer or refuses the key."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest

import autoresearch
from autoresearch.cli import main
from autoresearch.params import TrialParams, distributions, split_params
from autoresearch.preflight import study_file_sha256
from autoresearch.spec import DatasetSpec, StudySpec
from autoresearch.study import STUDY_FILE_ATTR, open_study
from autoresearch.trial.data import load_examples

STUDY = """
name = "export"
[space.learning_rate]
type = "float"
low = 1e-3
high = 1e-2
log = true
[reward_space.executes]
low = 0.0
high = 0.3
[fixed]
sft_steps = 1
sft_batch_size = 2
rl_steps = 1
prompts_per_step = 2
samples_per_prompt = 2
max_tokens = 24
lora_rank = 8
seed = 7
[dataset]
source = "synthetic:retail"
n_train = 32
n_eval = 8
seed = 3
[training]
api = "{api}"
base_model = "{base_model}"
sampler = "torch"
"""


def write_study(folder: Path, api: str = "local", base_model: str = "tiny") -> Path:
    path = folder / "export.toml"
    path.write_text(STUDY.format(api=api, base_model=base_model))
    return path


def add_trials(spec: StudySpec) -> optuna.Study:
    """Trial 0 completes at 0.25 and trial 1 fails, as a worker would have recorded them."""
    study = open_study(spec, create=True)
    space = distributions(spec)
    for value, state, learning_rate in ((0.25, optuna.trial.TrialState.COMPLETE, 5e-3),
                                        (None, optuna.trial.TrialState.FAIL, 2e-3)):
        params = {"learning_rate": learning_rate, "reward.executes": 0.2}
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params=params, distributions=space,
            user_attrs={"fixed_params": spec.fixed, STUDY_FILE_ATTR: study_file_sha256(spec),
                        "reward_config": split_params({**spec.fixed, **params})[1].to_dict()}))
    return study


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, dict]:
    path = write_study(tmp_path)
    add_trials(autoresearch.load_spec(path))
    out = tmp_path / "best.json"
    assert main(["best", str(path), "--export", str(out)]) == 0
    return path, json.loads(out.read_text())


def test_the_export_holds_run_trials_keywords_with_the_studys_dataset(exported: tuple[Path, dict]) -> None:
    path, doc = exported
    spec = autoresearch.load_spec(path)  # public
    assert (doc["trial"], doc["state"], doc["value"]) == (0, "COMPLETE", 0.25)
    kwargs = doc["run_trial"]
    assert set(kwargs) == {"params", "dataset", "base_model"}
    # The dataset is the study's, not run_trial's default, and loads the same examples.
    assert DatasetSpec.model_validate(kwargs["dataset"]) == spec.dataset != DatasetSpec()
    assert load_examples(DatasetSpec.model_validate(kwargs["dataset"])) == load_examples(spec.dataset)
    # Every hyperparameter, the seed included, and every reward weight: a change of defaults cannot move a re-run.
    params = kwargs["params"]
    hyper, reward = split_params(params)
    assert set(hyper) == set(TrialParams.model_fields)
    assert hyper["learning_rate"] == 5e-3 and hyper["seed"] == 7 and hyper["sft_steps"] == 1
    assert reward.executes == 0.2 and reward.to_dict() == doc["reward_config"]
    assert {k for k in params if k.startswith("reward.")} == {f"reward.{k}" for k in doc["reward_config"]}
    # A local service serves one model: run_trial asks it (None); what it was is recorded beside.
    assert kwargs["base_model"] is None and doc["training"] == {"api": "local", "base_model": "tiny", "device": None,
                                                                 "sampler": "torch"}
    assert doc["study_file_sha256"] == study_file_sha256(spec) and doc["study_file_changed"] is False


def test_any_trial_exports_by_number_and_a_given_service_names_its_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, api="http://trainer:8000", base_model="google/gemma-3-1b-it")
    add_trials(autoresearch.load_spec(path))
    capsys.readouterr()
    assert main(["best", str(path), "--trial", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["trial"], doc["state"], doc["value"]) == (1, "FAIL", None)
    assert doc["run_trial"]["params"]["learning_rate"] == 2e-3
    assert doc["run_trial"]["base_model"] == "google/gemma-3-1b-it"
    assert main(["best", str(path), "--trial", "5"]) == 2
    assert capsys.readouterr().err == "error: study 'export' has no trial 5 (it has 2)\n"


def test_an_export_after_the_study_file_changed_says_so(exported: tuple[Path, dict],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = exported
    path.write_text(path.read_text().replace("n_eval = 8", "n_eval = 9"))
    capsys.readouterr()
    assert main(["best", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["study_file_changed"] is True
    assert captured.err.startswith(f"warning: {path.resolve()} changed since trial 0 ran")


def _closed_port() -> str:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}"


def test_run_trial_on_a_dead_url_fails_at_once_in_one_line(exported: tuple[Path, dict]) -> None:
    _, doc = exported
    started = time.monotonic()
    url = _closed_port()
    with pytest.raises(autoresearch.TrainingServiceError, match=f"the training service at {url} is not reachable") as error:
        autoresearch.run_trial(**doc["run_trial"], trainer_url=url)
    assert "\n" not in str(error.value) and time.monotonic() - started < 5
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no SDK traceback chained to it


def test_run_trial_on_a_url_that_never_answers_gives_up_within_seconds(exported: tuple[Path, dict]) -> None:
    _, doc = exported
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(autoresearch.TrainingServiceError, match="not reachable within 5 s"):
            autoresearch.run_trial(**doc["run_trial"], trainer_url=url)
        assert time.monotonic() - started < 15


class _RefusesEveryKey(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body = (200, b'{"status": "ok"}') if self.path == "/api/v1/healthz" else (
            401, b'{"error": "wrong X-API-Key header", "detail": "wrong X-API-Key header"}')
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusesEveryKey)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refused_key_is_one_line_from_run_trial_and_from_run(
        exported: tuple[Path, dict], refusing_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, doc = exported
    with pytest.raises(autoresearch.TrainingServiceError,
                       match=f"the training service at {refusing_url} refused the API key \\(HTTP 401: wrong X-API-Key"):
        autoresearch.run_trial(**doc["run_trial"], trainer_url=refusing_url, api_key="tml-wrong")
    (tmp_path / "given").mkdir()
    path = write_study(tmp_path / "given", api=refusing_url, base_model="m")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the training service at {refusing_url} refused the API key") and err.count("\n") == 1
    assert len(open_study(autoresearch.load_spec(path)).trials) == 0  # refused before any trial was asked


def test_run_trials_docstring_states_the_defaults_it_has() -> None:
    import inspect
    import re

    from autoresearch.trial.run import run_trial

    doc = inspect.getdoc(run_trial)
    stated = dict(re.findall(r"``(\w+)`` (?:``)?([\w.+-]+?)(?:``)?[,)]", doc.split("- ``trainer_url``")[0]))
    assert set(stated) == set(TrialParams.model_fields)
    for name, field in TrialParams.model_fields.items():
        value = stated[name]
        assert (value == field.default) if isinstance(field.default, str) else float(value) == field.default, name
    signature = inspect.signature(run_trial)
    assert f"``{signature.parameters['api_key'].default}``" in doc and "(``runs/trial``" in doc
    assert signature.parameters["scoring_workers"].default == 1 and "``scoring_workers``: 1 " in doc
    defaults = DatasetSpec()
    assert f"{defaults.n_train} training and {defaults.n_eval} held-out examples, seed {defaults.seed}" in doc

"""Study files: defaults, resolved paths, and one precise line per mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoresearch.cli import main
from autoresearch.trial.data import load_examples
from env.text2sql.data import generate
from autoresearch.params import distributions, split_params
from autoresearch.spec import SpecError, load_spec
from autoresearch.trainer_service import base_model_path

STUDIES = Path(__file__).resolve().parents[2] / "studies"

MINIMAL = 'name = "demo"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_defaults_resolve_next_to_the_study_file(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.run_folder == (tmp_path / "runs" / "demo").resolve()
    assert spec.storage_url == f"sqlite:///{tmp_path.resolve()}/runs/demo/study.db"
    assert spec.objective == "autoresearch.trial:run_trial"
    assert (spec.sampler.type, spec.pruner.type, spec.launcher, spec.proposer.type) == ("tpe", "median", "local", "none")


def test_postgresql_urls_use_the_installed_driver(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + 'storage = "postgresql://postgres@127.0.0.1:5432/test"\n'))
    assert spec.storage_url == "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def test_search_space_and_reward_weights_become_distributions(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + """
[space.learning_rate]
type = "float"
low = 1e-5
high = 1e-3
log = true
[space.loss]
type = "categorical"
choices = ["ppo", "dro"]
[space.lora_rank]
type = "int"
low = 4
high = 32
step = 4
[reward_space.result_overlap]
low = 0.0
high = 0.5
[reward_space.length_budget]
low = 100
high = 1000
"""))
    space = distributions(spec)
    assert set(space) == {"learning_rate", "loss", "lora_rank", "reward.result_overlap", "reward.length_budget"}
    assert space["learning_rate"].log and space["lora_rank"].step == 4
    hyper, reward = split_params({"learning_rate": 1e-4, "reward.result_overlap": 0.25, "reward.length_budget": 300})
    assert hyper == {"learning_rate": 1e-4}
    assert (reward.result_overlap, reward.length_budget, reward.execution_match) == (0.25, 300, 1.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "a b"\n', "name: String should match pattern"),
        (MINIMAL + 'direction = "minimize"\n', "direction: the objective is fixed"),
        (MINIMAL + 'metric = "train_reward"\n', "metric: the objective is fixed"),
        (MINIMAL + '[space.learning_rate]\ntype = "float"\nlow = 1e-3\nhigh = 1e-5\n',
         "space.learning_rate: low (0.001) must be below high (1e-05)"),
        (MINIMAL + '[space.learning_rate]\ntype = "float"\nlow = 0.0\nhigh = 1e-3\nlog = true\n',
         "space.learning_rate: a log-scaled range needs low > 0"),
        (MINIMAL + '[space.lr]\ntype = "float"\nlow = 0.1\nhigh = 0.2\n', "space.lr: run_trial has no such parameter"),
        (MINIMAL + '[space.loss]\ntype = "categorical"\nchoices = ["ppo", "grpo"]\n', "space.loss: Input should be"),
        (MINIMAL + '[space.x]\ntype = "gaussian"\n', "space.x: Input tag 'gaussian' found"),
        (MINIMAL + '[reward_space.executes]\nlow = 0.0\nhigh = 2.0\n',
         "reward_space: executes: [0.0, 2.0] leaves RewardConfig's bounds [0.0, 1.0]"),
        (MINIMAL + '[reward_space.bonus]\nlow = 0.0\nhigh = 1.0\n', "reward_space: 'bonus' is not a RewardConfig weight"),
        (MINIMAL + '[budget]\nn_trials = 0\n', "budget.n_trials: Input should be greater than or equal to 1"),
        (MINIMAL + '[budget]\nparalel = 2\n', "budget.paralel: Extra inputs are not permitted"),
        (MINIMAL + '[pruner]\ntype = "asha"\n', "pruner.type: Input should be"),
        (MINIMAL + 'launcher = "k8s"\n', "launcher: Input should be 'local'"),
        (MINIMAL + '[training]\napi = "localhost:8000"\n', "training.api: must be 'local', 'none' or an http(s):// URL"),
        (MINIMAL + 'objective = "no_colon"\n', "objective: must look like 'package.module:function'"),
        (MINIMAL + '[fixed]\nrl_steps = -1\n', "fixed.rl_steps: Input should be greater than or equal to 0"),
        (MINIMAL + '[fixed]\nsteps = 3\n', "fixed.steps: run_trial has no such parameter"),
        (MINIMAL + '[fixed]\n"reward.executes" = 3.0\n', "fixed: invalid reward config: executes: Input should be less than"),
        (MINIMAL + '[proposer]\ntype = "gemini"\nmodel = "m"\napi_key = "AIza-secret"\n',
         "proposer.api_key: must be 'env:NAME'"),
        (MINIMAL + 'artifact_store = "ftp://host/artifacts"\n',
         "artifact_store: 'ftp://host/artifacts': a bucket is gs://BUCKET or s3://BUCKET"),
        (MINIMAL + 'artifact_store = "gs://bucket/studies/a"\n', "artifact_store: 'gs://bucket/studies/a': name the bucket alone"),
        (MINIMAL + 'artifact_store = " "\n', "artifact_store: must name a folder, gs://BUCKET or s3://BUCKET"),
        (MINIMAL + 'artifact_store = "env:BUCKET"\n', "artifact_store: takes no env: value"),
        (MINIMAL + '[training.tiny_model]\nhidden_size = 100\n', "training.tiny_model.hidden_size: Input should be a multiple of 32"),
        (MINIMAL + '[training.tiny_model]\nlayers = 4\n', "training.tiny_model.layers: Extra inputs are not permitted"),
        ('name = "x"\n[budget\n', "not valid TOML"),
    ],
)
def test_invalid_study_files_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL + 'direction = "minimize"\n')
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: direction: the objective is fixed") and err.count("\n") == 1
    assert main(["status", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.toml'}: no such study file\n"


def test_status_of_a_study_that_never_ran_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(write(tmp_path, MINIMAL))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'demo' has no database at ") and "start it with `autoresearch run`" in err
    assert not (tmp_path / "runs").exists()  # a read-only command creates nothing


def test_an_objective_that_does_not_import_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL + 'objective = "no_such_module:f"\n[training]\napi = "none"\n')
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path.resolve()}: objective: cannot import 'no_such_module:f': No module named 'no_such_module'\n")


def test_an_unreachable_training_api_is_one_error_line_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    path = write(tmp_path, MINIMAL + f'[training]\napi = "{url}"\n[dataset]\nsource = "synthetic:retail"\n')
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the training service at {url} is not reachable") and err.count("\n") == 1
    assert err.rstrip().endswith("start it or fix [training] api in the study file")
    assert main(["status", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trials"] == []


def test_a_file_dataset_splits_without_overlap_relative_to_the_study(tmp_path: Path) -> None:
    train, held_out = generate(30, 0, seed=1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in train))
    spec = load_spec(write(tmp_path, MINIMAL + '[dataset]\nsource = "data/rows.jsonl"\nn_train = 20\nn_eval = 8\n'))
    assert spec.dataset.source == str(tmp_path.resolve() / "data" / "rows.jsonl")
    fit, held = load_examples(spec.dataset)
    assert (len(fit), len(held)) == (20, 8) and not {e.id for e in fit} & {e.id for e in held}
    assert load_examples(spec.dataset) == (fit, held)  # the split is seeded


@pytest.mark.parametrize("name", ["text2sql-tiny.toml", "text2sql-gemma.toml"])
def test_shipped_studies_are_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(STUDIES / name), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "learning_rate" in captured.err and captured.out == ""  # a local study has no manifests for stdout


def test_the_tiny_model_is_made_at_the_study_files_size_and_reused(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + "[training.tiny_model]\nhidden_size = 96\nnum_layers = 1\n"))
    folder = Path(base_model_path(spec))
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (96, 1)
    made = (folder / "config.json").stat().st_mtime_ns
    assert base_model_path(spec) == str(folder) and (folder / "config.json").stat().st_mtime_ns == made
    # Another size is another model, never the one already in the run folder.
    other = load_spec(write(tmp_path, MINIMAL + "[training.tiny_model]\nhidden_size = 64\nnum_layers = 1\n"))
    assert json.loads((Path(base_model_path(other)) / "config.json").read_text())["hidden_size"] == 64

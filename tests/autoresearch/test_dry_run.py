"""``run --dry-run`` checks what it can without training, refuses a broken study in one line, and prints the
Kubernetes manifests alone on stdout, so that ``autoresearch run S --dry-run | kubectl apply -f -`` works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from autoresearch.cli import main
from tests.autoresearch.helpers import REPO
from tests.autoresearch.test_kubernetes_jobs import FULL, write_study

DATASET = '[dataset]\nsource = "synthetic:retail"\nn_train = 20\nn_eval = 8\n'
LOCAL = """
name = "dry"
[space.learning_rate]
type = "float"
low = 1e-5
high = 1e-3
[training]
api = "none"
"""


def _validator() -> str:
    found = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or shutil.which("kubernetes-validate")
    assert found, "kubernetes-validate (the dev extra) is not installed"
    return found


def _dry_run(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_STORAGE_URL"}  # as on a laptop: not set
    return subprocess.run([sys.executable, "-m", "autoresearch", "run", str(path), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_stdout_of_a_kubernetes_dry_run_validates_strictly_as_it_is(tmp_path: Path) -> None:
    path = write_study(tmp_path, kube=FULL, extra=DATASET)
    done = _dry_run(path)
    assert done.returncode == 0, done.stderr
    documents = list(yaml.safe_load_all(done.stdout))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Job", "Job", "Job"]  # parallel 3
    # The summary goes to stderr, with what was checked.
    assert "dataset synthetic:retail: 20 training and 8 held-out examples" in done.stderr
    assert "storage env:AUTORESEARCH_STORAGE_URL: not checked" in done.stderr
    assert "4 Kubernetes manifests on stdout" in done.stderr
    # Piped as it is, the way `| kubectl apply --dry-run=server -f -` takes it.
    validated = subprocess.run([_validator(), "--strict", "-"], input=done.stdout, capture_output=True, text=True)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert validated.stdout.count("passed for resource") == 4


def test_the_validator_refuses_what_is_not_a_manifest(tmp_path: Path) -> None:
    """The check above can fail: a stray summary line on stdout is refused."""
    path = write_study(tmp_path, kube=FULL, extra=DATASET)
    broken = "study dry: storage ...\n" + _dry_run(path).stdout
    validated = subprocess.run([_validator(), "--strict", "-"], input=broken, capture_output=True, text=True)
    assert validated.returncode != 0


def test_the_shipped_gke_study_dry_runs_to_valid_manifests() -> None:
    done = _dry_run(REPO / "studies" / "text2sql-gke.toml")
    assert done.returncode == 0, done.stderr
    validated = subprocess.run([_validator(), "--strict", "-"], input=done.stdout, capture_output=True, text=True)
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_a_local_study_prints_nothing_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(LOCAL + DATASET)
    assert main(["run", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "learning_rate: FloatDistribution" in captured.err and "dry run: the study file checks out" in captured.err
    assert not (tmp_path / "runs").exists()  # a dry run creates no study


@pytest.mark.parametrize(("text", "message"), [
    (LOCAL + DATASET.replace("synthetic:retail", "synthetic:retial"),
     "dataset.source: unknown domain(s) 'retial' in 'synthetic:retial'; choose from "),
    (LOCAL + DATASET.replace("synthetic:retail", "synthetic:retail,"), "dataset.source: unknown domain(s) ''"),
    (LOCAL + DATASET.replace('"synthetic:retail"', '"data/missing.jsonl"'),
     "dataset.source: data/missing.jsonl does not exist (paths are relative to the study file)"),
    (LOCAL + DATASET + 'eval_source = "./held-out.parquet"\n', "dataset.eval_source: ./held-out.parquet does not exist"),
    (LOCAL, "no [dataset] table: say what the trials train and are evaluated on"),
    (LOCAL + DATASET.replace('"synthetic:retail"', '"bad.jsonl"'),
     "dataset: cannot load the examples: ValueError: "),
    (LOCAL + DATASET + '[proposer]\ntype = "openai"\nmodel = "m"\nbase_url = "http://127.0.0.1:9/v1"\nnotes = "gone.md"\n',
     "proposer.notes: "),
    (LOCAL + DATASET + 'storage = "nosuchdialect://u@h/db"\n', "storage: not a usable SQLAlchemy URL"),
    (LOCAL.replace('name = "dry"', 'name = "dry"\nobjective = "no_such_module:f"') + DATASET,
     "objective: cannot import 'no_such_module:f'"),
], ids=["domain", "empty-domain", "file", "eval-file", "no-dataset", "bad-rows", "notes", "storage", "objective"])
def test_a_broken_study_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                               message: str) -> None:
    path = tmp_path / "s.toml"
    (tmp_path / "bad.jsonl").write_text("not json\n")
    # TOML keys after a table header belong to it: put a top-level storage key before the tables.
    if "storage =" in text:
        text = 'storage = "nosuchdialect://u@h/db"\n' + text.replace('storage = "nosuchdialect://u@h/db"\n', "")
    path.write_text(textwrap.dedent(text))
    assert main(["run", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path.resolve()}: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err


def test_run_refuses_a_dataset_typo_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(LOCAL + DATASET.replace("synthetic:retail", "synthetic:retial"))
    assert main(["run", str(path)]) == 2
    assert "unknown domain(s) 'retial'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no study, no trial spent on it


@pytest.mark.postgres
def test_a_storage_that_answers_numbers_the_jobs_from_the_next_trial(
        tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import uuid

    import optuna

    from autoresearch.params import distributions
    from autoresearch.spec import load_spec
    from autoresearch.study import open_study

    path = write_study(tmp_path, name=f"dry-{uuid.uuid4().hex[:10]}", storage=postgres_url, kube=FULL, extra=DATASET)
    spec = load_spec(path)
    study = open_study(spec, create=True)
    for x in (1e-4, 2e-4):
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": x}, distributions=distributions(spec), value=0.1))
    assert main(["run", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert f"storage {postgres_url}: answers" in captured.err
    jobs = list(yaml.safe_load_all(captured.out))[1:]
    assert [j["metadata"]["labels"]["autoresearch.dev/trial-number"] for j in jobs] == ["2", "3", "4"]

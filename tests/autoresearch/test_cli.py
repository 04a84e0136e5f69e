"""``status --json``, ``best --export`` and ``report`` on a finished study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from autoresearch.cli import main
from autoresearch.spec import load_spec
from trainer_api.process import free_port
from tests.autoresearch.conftest import StudyFactory
from tests.autoresearch.helpers import REPO, wait_for


@pytest.fixture
def finished(study_file: StudyFactory) -> Path:
    path = study_file(objective="raise_on_trial_one", n_trials=4, parallel=2)
    assert main(["run", str(path)]) == 0
    return path


def test_status_json_lists_every_trial_and_the_tally(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["status", str(finished), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["study"] == load_spec(finished).name and doc["budget"] == 4 and doc["settled"] == 4
    assert doc["counts"] == {"waiting": 0, "running": 0, "complete": 3, "pruned": 0, "failed": 1, "failed_final": 1}
    assert [row["number"] for row in doc["trials"]] == [0, 1, 2, 3]
    assert doc["trials"][1]["failure_reason"] == "ValueError: trial one is broken on purpose"
    best = max((row for row in doc["trials"] if row["state"] == "COMPLETE"), key=lambda row: row["value"])
    assert {key: doc["best"][key] for key in ("number", "value", "params")} == {
        key: best[key] for key in ("number", "value", "params")}
    assert doc["best"]["eval_execution_accuracy_ci"] is None and best["n_eval"] is None  # these objectives record none
    assert main(["status", str(finished)]) == 0
    assert "ValueError: trial one is broken on purpose" in capsys.readouterr().out


def test_best_export_writes_rerunnable_params(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "best.json"
    assert main(["best", str(finished), "--export", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"study", "trial", "state", "value", "objective", "study_file", "study_file_sha256",
                        "study_file_changed", "training", "reward_config", "run_trial"}
    assert set(doc["run_trial"]) == {"params", "dataset", "base_model"}  # run_trial's own keyword names
    assert doc["run_trial"]["params"] == {"sleep": 0.0, "x": doc["value"]}  # fixed and searched parameters together
    assert doc["objective"] == "tests.autoresearch.objectives:raise_on_trial_one"
    assert doc["state"] == "COMPLETE" and doc["study_file_changed"] is False


def test_report_writes_markdown_and_plots(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["report", str(finished)]) == 0
    report = Path(capsys.readouterr().out.strip())
    text = report.read_text()
    assert "## Best trial" in text and "ValueError: trial one is broken on purpose" in text
    for png in ("history.png", "learning_curves.png"):
        assert (report.parent / png).read_bytes()[:4] == b"\x89PNG"


def test_best_before_any_completed_trial_is_an_error(study_file: StudyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file()
    from autoresearch.study import open_study

    open_study(load_spec(path), create=True)
    assert main(["best", str(path)]) == 2
    assert "has no completed trial yet" in capsys.readouterr().err


def test_dashboard_serves_the_study(finished: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "autoresearch", "dashboard", str(finished), "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def studies() -> list[dict]:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=1).json()["study_summaries"]
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read()
                return []

        wait_for(lambda: bool(studies()), 30, "the dashboard to answer")
        assert [s["study_name"] for s in studies()] == [load_spec(finished).name]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_trial_command_runs_one_asked_trial(study_file: StudyFactory) -> None:
    from autoresearch.params import distributions
    from autoresearch.study import open_study

    path = study_file()
    spec = load_spec(path)
    asked = open_study(spec, create=True).ask(distributions(spec))
    assert main(["trial", "--study", str(path), "--trial-number", str(asked.number)]) == 0
    done = open_study(spec).get_trials()[0]
    assert done.value == done.params["x"] and done.user_attrs["retry_count"] == 0

"""optuna-dashboard on a finished study: it serves each trial's artifacts from the study's configured store,
and in a real browser renders the metric name, trial notes and artifacts.

The study is written by the controller's own functions (``record_study_context``, ``write_trial_note``) and
the trial's outputs are uploaded by the worker's (``recording.keep_outputs``) to an artifact store outside
the run folder (the study file's ``artifact_store``); the dashboard is started as a user starts it, and
headless Chromium (Debian's ``chromium`` package) renders its pages, React and all, before the test reads
their DOM.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from optuna.artifacts import get_all_artifact_meta

from autoresearch.params import distributions
from autoresearch.review import METRIC_NAME, record_study_context, short, write_trial_note
from autoresearch.spec import StudySpec, load_spec
from autoresearch.study import make_storage, open_study
from autoresearch.recording import METRICS, keep_outputs
from tests.autoresearch.conftest import StudyFactory
from tests.autoresearch.helpers import REPO, wait_for
from trainer_api.process import free_port

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                                            "(Debian: apt-get install -y chromium)")
RATIONALE = "lower x was never tried"
STORE = "artifact-store"
"""The study file's artifact store: a folder beside it, outside the run folder."""


def finished_study(path: Path) -> tuple[StudySpec, int]:
    """A study of two complete trials, the sampler's and the LLM's, as the controller and its workers record
    them; its storage id."""
    path.write_text(f'artifact_store = "{STORE}"\n' + path.read_text())
    spec = load_spec(path)
    storage = make_storage(spec)
    study = open_study(spec, storage, create=True)
    space = distributions(spec)
    record_study_context(study, spec, space)
    study.enqueue_trial({"x": 0.25}, user_attrs={"proposer": "llm", "proposer_model": "openai:gemma",
                                                  "rationale": RATIONALE})
    for value in (0.25, 0.75):
        trial = study.ask(space)
        write_trial_note(study, storage, trial._trial_id)
        run_dir = spec.trial_dir(trial.number)
        run_dir.mkdir(parents=True)
        (run_dir / METRICS).write_text(json.dumps({"phase": "rl", "step": 0, "reward_mean": value}) + "\n")
        keep_outputs(trial, spec, run_dir)
        study.tell(trial, value)
    return spec, storage.get_study_id_from_name(spec.name)


def render(url: str) -> str:
    """The page's DOM once Chromium has run its scripts and their requests (``--virtual-time-budget``)."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(params=["autoresearch", "optuna-dashboard"])
def dashboard(request: pytest.FixtureRequest, study_file: StudyFactory) -> Iterator[tuple[str, StudySpec, int]]:
    """The dashboard on a finished study: ``autoresearch dashboard`` (a laptop), or optuna-dashboard's own command
    with ``--artifact-dir`` (how a cluster's dashboard Deployment runs it); its URL, the spec and the study id."""
    spec, study_id = finished_study(study_file())
    port = free_port()
    command = ([sys.executable, "-m", "autoresearch", "dashboard", str(spec.path)] if request.param == "autoresearch"
               else [str(Path(sys.executable).with_name("optuna-dashboard")), spec.storage_url,
                     "--artifact-dir", str(spec.artifact_dir), "--host", "127.0.0.1"])
    server = subprocess.Popen(command + ["--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/api/studies", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert server.poll() is None, server.stderr.read()
            return False

    try:
        wait_for(answers, 60, "the dashboard to answer")
        yield url, spec, study_id
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_dashboard_serves_each_trials_artifacts_from_the_studys_store(dashboard: tuple[str, StudySpec, int]) -> None:
    url, spec, study_id = dashboard
    assert spec.artifact_dir == spec.path.parent / STORE and not (spec.run_folder / "artifacts").exists()
    storage = make_storage(spec)
    for trial in open_study(spec).trials:
        [meta] = get_all_artifact_meta(trial, storage=storage)
        served = httpx.get(f"{url}/artifacts/{study_id}/{trial._trial_id}/{meta.artifact_id}", timeout=10)
        assert served.status_code == 200 and json.loads(served.text)["reward_mean"] == trial.value


@needs_chromium
def test_the_dashboard_renders_the_metric_name_notes_and_artifacts(dashboard: tuple[str, StudySpec, int]) -> None:
    url, spec, study_id = dashboard
    study_page = render(f"{url}/dashboard/studies/{study_id}")
    assert METRIC_NAME in study_page and "Objective 0" not in study_page
    # The study's context: the study file as an artifact, the search space as a user attr.
    assert spec.path.name in study_page and "float in [0, 1]" in study_page
    llm_trial = render(f"{url}/dashboard/studies/{study_id}/trials?numbers=0")
    assert "Proposed by the LLM (openai:gemma)" in llm_trial and RATIONALE in llm_trial
    assert METRICS in llm_trial  # the trial's artifact
    sampler_trial = render(f"{url}/dashboard/studies/{study_id}/trials?numbers=1")
    x = open_study(spec).trials[1].params["x"]
    # The note's table of the sampled parameters, rendered from its Markdown, with the value rounded.
    assert "Proposed by the sampler (TPESampler)" in sampler_trial and f"<td>{short(x)}</td>" in sampler_trial
    assert METRICS in sampler_trial

"""The Kubernetes launcher against kmock (a Kubernetes API emulator on localhost), driven by the official client.

The tests play the cluster's part: they set Job status (ready pods, Complete,
Failed, DeadlineExceeded), add pods with exit codes and logs, script watch
streams (410 Gone), and, for the end-to-end runs, run each Job's trial worker
the way a pod would (in one run, each in a process and folder of its own, as
pods have their own filesystems). Studies live in PostgreSQL, as on a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import kmock
import optuna
import pytest
import yaml
from kubernetes import client
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from autoresearch.artifacts import open_artifact_store
from autoresearch.controller import run_study
from autoresearch.launchers import EXIT_TIMEOUT, make_launcher
from autoresearch.launchers.k8s_jobs import JOB_NAME_LABEL, anchor_name, study_slug
from autoresearch.launchers.kubernetes import EXIT_DELETED, EXIT_NEVER_STARTED, USER_AGENT, KubernetesLauncher
from autoresearch.params import distributions
from autoresearch.proposers.prompt import build_prompt, untrusted
from autoresearch.report import write_report
from autoresearch.spec import SpecError, StudySpec, load_spec
from autoresearch.study import Tally, make_storage, open_study
from autoresearch.worker import run_worker
from tests.autoresearch.helpers import REPO, wait_for

NS = "autoresearch"
TEST_AGENT = "autoresearch-tests"
CONTROLLER_MANIFEST = REPO / "k8s" / "base" / "controller.yaml"
pytestmark = pytest.mark.postgres


class Cluster:
    """kmock's Kubernetes emulator served from its own event loop thread, so synchronous clients can call it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.mock = kmock.KubernetesEmulator()
        self._server = kmock.Server(self.mock)
        self._call(self.mock.__aenter__())
        self._call(self._server.__aenter__())
        self.url = str(self._server.url).rstrip("/")
        for resource in ("batch/v1/jobs", "v1/pods", "v1/configmaps"):
            self.mock.resources[resource] = {}
        self.mock[kmock.subresource("log")] << (lambda request: f"output of {request.name}\n".encode())
        configuration = client.Configuration()
        configuration.host = self.url
        self.batch = client.BatchV1Api(client.ApiClient(configuration))
        self.batch.api_client.user_agent = TEST_AGENT  # the test's own calls, told from the launcher's
        self.core = client.CoreV1Api(self.batch.api_client)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def close(self) -> None:
        self._call(self._server.__aexit__(None, None, None))
        self._call(self.mock.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def jobs(self) -> dict[str, dict[str, Any]]:
        listed = self.batch.list_namespaced_job(NS, _preload_content=False)
        return {job["metadata"]["name"]: job for job in json.loads(listed.data)["items"]}

    def set_status(self, job: str, **status: Any) -> None:
        self.batch.patch_namespaced_job_status(job, NS, {"status": status})

    def finish(self, job: str, kind: str, reason: str, message: str = "") -> None:
        condition = {"type": kind, "status": "True", "reason": reason, "message": message}
        self.set_status(job, ready=0, active=0, conditions=[condition],
                        **({"succeeded": 1} if kind == "Complete" else {"failed": 1}))

    def add_pod(self, job: str, name: str, exit_code: int | None = None, stamp: str = "2026-01-01T00:00:00Z",
                conditions: list[dict[str, str]] | None = None) -> None:
        state = {"terminated": {"exitCode": exit_code}} if exit_code is not None else {"running": {}}
        self.core.create_namespaced_pod(NS, {
            "metadata": {"name": name, "labels": {JOB_NAME_LABEL: job}, "creationTimestamp": stamp},
            "spec": {"containers": [{"name": "trial", "image": "x"}]},
            "status": {"conditions": conditions or [],
                       "containerStatuses": [{"name": "trial", "state": state, "image": "x", "imageID": "",
                                              "ready": exit_code is None, "restartCount": 0}]},
        })

    def deletes(self) -> list[Any]:
        return list(self.mock[kmock.action.DELETE, kmock.resource("batch/v1/jobs")])


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    running = Cluster()
    yield running
    running.close()


def write_study(folder: Path, storage: str, host: str, *, objective: str = "tests.autoresearch.objectives:sleepy",
                n_trials: int = 2, parallel: int = 2, start_deadline_s: float = 60, max_retries: int = 2) -> Path:
    """The study file in ``folder``, with an artifact store (``folder/bucket``, an absolute path) that stands
    for the bucket the controller and every pod share."""
    path = folder / "t.toml"
    path.write_text(textwrap.dedent(f"""
        name = "K8s_{uuid.uuid4().hex[:10]}"
        storage = "{storage}"
        objective = "{objective}"
        launcher = "kubernetes"
        artifact_store = "{(folder / 'bucket').resolve()}"
        [space.x]
        type = "float"
        low = 0.0
        high = 1.0
        [fixed]
        sleep = 0.0
        [training]
        api = "none"
        [budget]
        n_trials = {n_trials}
        parallel = {parallel}
        timeout_s = 60
        max_retries = {max_retries}
        [heartbeat]
        interval_s = 1
        grace_s = 4
        [kubernetes]
        image = "registry.example/autoresearch:1"
        study_file_in_image = "studies/t.toml"
        namespace = "{NS}"
        host = "{host}"
        start_deadline_s = {start_deadline_s}
        """))
    return path


class Setup:
    """A study, its launcher, and the trials the controller would ask, for launcher-level tests."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.study = open_study(spec, create=True)
        self.launcher = KubernetesLauncher(spec)

    def ask(self) -> tuple[int, int]:
        trial = self.study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        return trial.number, trial._trial_id

    def until(self, condition: Callable[[], bool], workers: list[Any], what: str) -> None:
        """Let the launcher wait (as the controller does) until ``condition`` holds."""
        for _ in range(100):
            if condition():
                return
            self.launcher.wait_any(workers, 0.2)
        raise AssertionError(f"never saw {what}")


@pytest.fixture
def setup(tmp_path: Path, postgres_url: str, cluster: Cluster) -> Iterator[Setup]:
    made = Setup(load_spec(write_study(tmp_path, postgres_url, cluster.url, start_deadline_s=30)))
    yield made
    made.launcher.close()


def test_create_duplicate_watch_to_completion_and_log_copy(setup: Setup, cluster: Cluster) -> None:
    slug = study_slug(setup.spec.name)
    cluster.core.create_namespaced_config_map(NS, {"metadata": {"name": anchor_name(slug), "uid": "anchor-uid"}})
    assert setup.launcher.adopt(setup.study) == {}
    number, trial_id = setup.ask()
    worker = setup.launcher.launch(number, trial_id, None)
    name = f"{slug}-t{number}-a0"
    assert worker.job == name and list(cluster.jobs()) == [name]
    job = cluster.jobs()[name]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "anchor-uid"  # the anchor existed: 409, then read
    assert job["metadata"]["labels"]["autoresearch.dev/trial-number"] == str(number)

    again = setup.launcher.launch(number, trial_id, None)  # a repeated create answers 409: the same Job
    assert again.created and list(cluster.jobs()) == [name]

    cluster.set_status(name, active=1, ready=1)
    cluster.add_pod(name, f"{name}-abcde")
    setup.until(lambda: setup.launcher.watch.started(name), [worker], "the pod become ready")
    assert worker.exit_code() is None
    cluster.add_pod(name, f"{name}-zzzzz", exit_code=0, stamp="2026-01-01T00:01:00Z")
    cluster.finish(name, "Complete", "CompletionsReached")
    setup.until(lambda: worker.exit_code() is not None, [worker], "the Job complete")
    assert worker.exit_code() == 0
    log = (setup.spec.trial_dir(number) / f"{name}.log").read_text()
    assert log.index(f"output of {name}-abcde") < log.index(f"output of {name}-zzzzz")
    assert json.loads(setup.study.trials[0].system_attrs[next(k for k in setup.study.trials[0].system_attrs
                                                               if k.startswith("artifacts:"))])["filename"] == f"{name}.log"
    assert [d.params.get("propagationPolicy") for d in cluster.deletes()] == ["Background"]
    assert cluster.jobs() == {}


def test_a_failed_job_exits_with_its_pods_code(setup: Setup, cluster: Cluster) -> None:
    setup.launcher.adopt(setup.study)
    worker = setup.launcher.launch(*setup.ask(), None)
    cluster.set_status(worker.job, active=1, ready=1)
    cluster.add_pod(worker.job, f"{worker.job}-p", exit_code=137)
    cluster.finish(worker.job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    setup.until(lambda: worker.exit_code() is not None, [worker], "the Job fail")
    assert worker.exit_code() == 137
    record = json.loads((setup.spec.trial_dir(worker.number) / "job.json").read_text())
    assert record["reason"].startswith("Job failed: BackoffLimitExceeded")
    assert record["status"]["failed"] == 1 and cluster.jobs() == {}


def test_a_job_past_its_deadline_exits_124(setup: Setup, cluster: Cluster) -> None:
    setup.launcher.adopt(setup.study)
    worker = setup.launcher.launch(*setup.ask(), None)
    cluster.set_status(worker.job, active=1, ready=1)
    cluster.finish(worker.job, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
    setup.until(lambda: worker.exit_code() is not None, [worker], "the Job fail")
    assert worker.exit_code() == EXIT_TIMEOUT
    assert "DeadlineExceeded" in worker.reason


def test_a_job_that_never_starts_is_deleted_after_the_start_deadline(tmp_path: Path, postgres_url: str,
                                                                     cluster: Cluster) -> None:
    made = Setup(load_spec(write_study(tmp_path, postgres_url, cluster.url, start_deadline_s=0.5)))
    try:
        made.launcher.adopt(made.study)
        worker = made.launcher.launch(*made.ask(), None)
        cluster.set_status(worker.job, active=1, ready=0)  # a pod exists but stays Pending
        made.until(lambda: worker.exit_code() is not None, [worker], "the start deadline")
        assert worker.exit_code() == EXIT_NEVER_STARTED and "never started within 0.5 s" in worker.reason
        assert cluster.jobs() == {} and len(cluster.deletes()) == 1
    finally:
        made.launcher.close()


def test_a_job_suspended_in_a_queue_is_not_late(tmp_path: Path, postgres_url: str, cluster: Cluster) -> None:
    made = Setup(load_spec(write_study(tmp_path, postgres_url, cluster.url, start_deadline_s=0.5)))
    try:
        made.launcher.adopt(made.study)
        worker = made.launcher.launch(*made.ask(), None)
        cluster.batch.patch_namespaced_job(worker.job, NS, {"spec": {"suspend": True}})  # as Kueue's webhook does
        made.until(lambda: (made.launcher.watch.get(worker.job) or {}).get("spec", {}).get("suspend") is True,
                   [worker], "the suspended Job")
        for _ in range(4):  # twice the start deadline, queued
            made.launcher.wait_any([worker], 0.25)
            assert worker.exit_code() is None and worker.elapsed() < 0.5
        cluster.batch.patch_namespaced_job(worker.job, NS, {"spec": {"suspend": False}})  # admitted, but no pod
        made.until(lambda: worker.exit_code() is not None, [worker], "the start deadline")
        assert worker.exit_code() == EXIT_NEVER_STARTED
    finally:
        made.launcher.close()


def test_a_deleted_job_and_a_killed_one(setup: Setup, cluster: Cluster) -> None:
    setup.launcher.adopt(setup.study)
    gone, killed = (setup.launcher.launch(*setup.ask(), None) for _ in range(2))
    cluster.set_status(gone.job, active=1, ready=1)
    cluster.batch.delete_namespaced_job(gone.job, NS)  # someone else deletes it
    setup.until(lambda: gone.exit_code() is not None, [gone], "the deletion")
    assert gone.exit_code() == EXIT_DELETED and "outside the controller" in gone.reason
    killed.kill()  # timeout, Ctrl-C or a cancelled study
    assert killed.exit_code() == EXIT_DELETED
    assert killed.job not in cluster.jobs() and cluster.deletes()[-1].params["propagationPolicy"] == "Background"


def test_a_pruned_trial_ends_with_its_job_complete_and_deleted(setup: Setup, cluster: Cluster) -> None:
    setup.launcher.adopt(setup.study)
    number, trial_id = setup.ask()
    worker = setup.launcher.launch(number, trial_id, None)
    cluster.set_status(worker.job, active=1, ready=1)
    cluster.add_pod(worker.job, f"{worker.job}-p")
    setup.study.tell(number, state=TrialState.PRUNED)  # what the worker in the pod does, then it exits 0
    cluster.finish(worker.job, "Complete", "CompletionsReached")
    setup.until(lambda: worker.exit_code() is not None, [worker], "the Job complete")
    assert worker.exit_code() == 0 and (setup.spec.trial_dir(number) / f"{worker.job}.log").exists()
    # The trial was told before its Job ended: its log is the study's artifact, named after the Job.
    assert [a.filename for a in get_all_artifact_meta(setup.study)] == [f"{worker.job}.log"]
    assert cluster.jobs() == {} and cluster.deletes()[0].params["propagationPolicy"] == "Background"


def test_410_gone_makes_the_watch_list_again(setup: Setup, cluster: Cluster) -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                        "reason": "Expired", "message": "too old resource version"}}
    cluster.mock[kmock.action.WATCH][:1] << json.dumps(gone).encode() + b"\n"
    setup.launcher.adopt(setup.study)
    worker = setup.launcher.launch(*setup.ask(), None)
    cluster.finish(worker.job, "Complete", "CompletionsReached")
    setup.until(lambda: worker.exit_code() is not None, [worker], "the Job complete")
    assert worker.exit_code() == 0
    assert setup.launcher.watch.lists >= 2  # the adopt list, and the one after 410
    assert setup.launcher.watch.error is None


def test_restart_reconciles_running_trials_with_their_jobs(setup: Setup, cluster: Cluster) -> None:
    live, done, crashed = (setup.ask() for _ in range(3))
    old = KubernetesLauncher(setup.spec)
    old.adopt(setup.study)
    workers = {number: old.launch(number, trial_id, None) for number, trial_id in (live, done, crashed)}
    old.close()  # the controller goes away; its Jobs go on
    setup.study.tell(done[0], 0.5)  # this trial's worker told while no controller watched
    cluster.set_status(workers[live[0]].job, active=1, ready=1)
    cluster.add_pod(workers[crashed[0]].job, f"{workers[crashed[0]].job}-p", exit_code=137)
    cluster.finish(workers[crashed[0]].job, "Failed", "BackoffLimitExceeded")

    adopted = setup.launcher.adopt(setup.study)
    assert sorted(adopted) == [live[1], crashed[1]]
    assert adopted[live[1]].job == workers[live[0]].job and adopted[live[1]].exit_code() is None
    assert adopted[crashed[1]].exit_code() == 137  # the controller fails and retries this trial
    assert workers[done[0]].job not in cluster.jobs()  # its trial is settled: the Job goes
    assert workers[live[0]].job in cluster.jobs()


def test_an_unreachable_api_server_neither_hangs_nor_crashes(tmp_path: Path, postgres_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    made = Setup(load_spec(write_study(tmp_path, postgres_url, f"http://127.0.0.1:{port}", start_deadline_s=1)))
    try:
        assert made.launcher.adopt(made.study) == {}
        worker = made.launcher.launch(*made.ask(), None)
        assert worker.exit_code() is None and worker.reason.startswith("cannot create the Job yet")
        made.until(lambda: worker.exit_code() is not None, [worker], "the start deadline")
        assert worker.exit_code() == EXIT_NEVER_STARTED and "cannot create the Job yet" in worker.reason
        made.until(lambda: made.launcher.watch.error is not None, [worker], "the watch report its error")
    finally:
        made.launcher.close()


class Kubelet:
    """Plays the cluster for the controller: each new Job gets a pod that runs the trial worker, or a scripted fate.

    ``plan`` maps (trial number, attempt) to ``crash`` (the pod dies without telling, exit 137), ``config``
    (the worker exits 2 on a bad study file; the Job's podFailurePolicy fails it at once) or
    ``preempt`` (the first pod is killed mid-trial, the Job starts a second one); anything else runs the worker.
    With ``pod_roots``, each pod runs its Job's command in a process of its own, in a fresh folder under
    ``pod_roots`` (its working directory and HOME) holding a copy of the study file where the image has it:
    a filesystem of its own, as a real pod has, which the controller never sees.
    """

    def __init__(self, cluster: Cluster, path: Path, plan: dict[tuple[int, int], str],
                 pod_roots: Path | None = None) -> None:
        self.cluster, self.path, self.plan, self.pod_roots = cluster, path, plan, pod_roots
        self.seen: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, self.errors

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, job in self.cluster.jobs().items():
                if name not in self.seen:
                    self.seen.append(name)
                    threading.Thread(target=self._pod, args=(job,), daemon=True).start()

    def _pod(self, job: dict[str, Any]) -> None:
        try:
            labels = job["metadata"]["labels"]
            number, attempt = int(labels["autoresearch.dev/trial-number"]), int(labels["autoresearch.dev/attempt"])
            name = job["metadata"]["name"]
            fate = self.plan.get((number, attempt))
            self.cluster.set_status(name, active=1, ready=1)
            if fate == "crash":
                self.cluster.add_pod(name, f"{name}-1", exit_code=137)
                self.cluster.finish(name, "Failed", "BackoffLimitExceeded")
                return
            if fate == "config":
                self.cluster.add_pod(name, f"{name}-1", exit_code=2)
                self.cluster.finish(name, "Failed", "PodFailurePolicy")
                return
            if fate == "preempt":
                self._preempted_pod(number)
                # The pod failed with DisruptionTarget: podFailurePolicy ignores it (status.failed stays 0) and the
                # Job starts a replacement pod once the old one is gone; it runs the same trial again.
                self.cluster.add_pod(name, f"{name}-1", exit_code=137, conditions=[
                    {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}])
                self.cluster.set_status(name, active=1, ready=0)
                self.cluster.set_status(name, active=1, ready=1)
            code = self._own_pod(job) if self.pod_roots else run_worker(load_spec(self.path), number, None)
            self.cluster.add_pod(name, f"{name}-2", exit_code=code, stamp="2026-01-01T00:05:00Z")
            self.cluster.finish(name, "Complete" if code == 0 else "Failed", "CompletionsReached" if code == 0
                                else "BackoffLimitExceeded")
        except BaseException as error:  # noqa: BLE001 - reported by stop()
            self.errors.append(error)

    def _own_pod(self, job: dict[str, Any]) -> int:
        """Run the Job's container command and environment in the pod's own root; its exit code."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        root = self.pod_roots / job["metadata"]["name"]
        study_file = root / load_spec(self.path).kubernetes.study_file_in_image
        study_file.parent.mkdir(parents=True)
        shutil.copy(self.path, study_file)
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}, "HOME": str(root),
               "PYTHONPATH": str(REPO)}  # the image has the package installed; here it is imported from the checkout
        command = [sys.executable, "-m", "autoresearch", *container["command"][1:]]
        return subprocess.run(command, cwd=root, env=env, timeout=120).returncode

    def _preempted_pod(self, number: int) -> None:
        """A real worker process that reports step 0 and is then killed, as a node preemption would."""
        spec = load_spec(self.path)
        pod = subprocess.Popen([sys.executable, "-m", "autoresearch", "trial", "--study", str(self.path),
                                "--trial-number", str(number)], cwd=REPO)
        try:
            wait_for(lambda: bool(open_study(spec).trials[number].intermediate_values), 60, "step 0 reported")
        finally:
            pod.send_signal(signal.SIGKILL)
            pod.wait()
        (spec.trial_dir(number) / "go").touch()


def run_with_kubelet(path: Path, cluster: Cluster, plan: dict[tuple[int, int], str],
                     n_trials: int | None = None, pod_roots: Path | None = None) -> tuple[Tally, Kubelet]:
    """Run the study through the launcher while the Kubelet plays its pods; the final tally and the Kubelet."""
    kubelet = Kubelet(cluster, path, plan, pod_roots)
    try:
        state = run_study(load_spec(path), n_trials=n_trials, poll_s=0.2)
    finally:
        kubelet.stop()
    return state, kubelet


def test_a_study_runs_through_jobs_and_a_crashed_pod_is_retried_once(tmp_path: Path, postgres_url: str,
                                                                     cluster: Cluster) -> None:
    path = write_study(tmp_path, postgres_url, cluster.url, n_trials=3, parallel=2)
    state, kubelet = run_with_kubelet(path, cluster, {(1, 0): "crash"})
    assert (state.complete, state.failed, state.failed_final, state.settled) == (3, 1, 0, 3)
    trials = open_study(load_spec(path)).trials
    crashed = trials[1]
    assert crashed.state == TrialState.FAIL
    assert "exited with code 137 (Job failed: BackoffLimitExceeded" in crashed.user_attrs["failure_reason"]
    retry = next(t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == crashed.params
    slug = study_slug(load_spec(path).name)
    assert f"{slug}-t{retry.number}-a1" in kubelet.seen  # the retry is attempt 1 of the same parameters
    assert len(kubelet.seen) == 4 and cluster.jobs() == {}  # every Job is deleted once its log is copied
    assert all(list(load_spec(path).trial_dir(t.number).glob(f"{slug}-t{t.number}-a*.log")) for t in trials)


def test_a_configuration_error_in_the_pod_fails_the_trial_without_a_retry(tmp_path: Path, postgres_url: str,
                                                                          cluster: Cluster) -> None:
    path = write_study(tmp_path, postgres_url, cluster.url, n_trials=2, parallel=1)
    state, kubelet = run_with_kubelet(path, cluster, {(0, 0): "config"})
    assert (state.complete, state.failed, state.failed_final, state.settled) == (1, 1, 1, 2)
    failed = open_study(load_spec(path)).trials[0]
    assert "exited with code 2 (Job failed: PodFailurePolicy" in failed.user_attrs["failure_reason"]
    assert failed.user_attrs["failure_reason"].endswith("a configuration error, not retried")
    assert len(kubelet.seen) == 2  # no second attempt of trial 0


@pytest.mark.filterwarnings("ignore:The reported value is ignored")  # the second pod reports step 0 again
def test_a_preempted_trial_runs_again_without_counting_as_a_failure(tmp_path: Path, postgres_url: str,
                                                                     cluster: Cluster) -> None:
    path = write_study(tmp_path, postgres_url, cluster.url, n_trials=1, parallel=1,
                       objective="tests.autoresearch.k8s_objectives:report_then_wait")
    state, kubelet = run_with_kubelet(path, cluster, {(0, 0): "preempt"})
    assert (state.complete, state.failed, state.settled) == (1, 0, 1)
    (trial,) = open_study(load_spec(path)).trials
    assert trial.state == TrialState.COMPLETE and trial.value == trial.params["x"]
    assert sorted(trial.intermediate_values) == [0, 1] and trial.user_attrs["retry_count"] == 0
    assert len(kubelet.seen) == 1
    log = (load_spec(path).trial_dir(0) / f"{kubelet.seen[0]}.log").read_text()
    assert log.index(f"==> pod {kubelet.seen[0]}-1 <==") < log.index(f"==> pod {kubelet.seen[0]}-2 <==")


TRIAL_FILES = {"metrics.jsonl", "predictions.jsonl", "learning_curve.png"}


def test_trial_pods_on_filesystems_of_their_own_leave_everything_in_the_studys_storage(
        tmp_path: Path, postgres_url: str, cluster: Cluster) -> None:
    """Separate filesystems: the controller reads only the study's storage and artifact store, never a pod's files."""
    controller_folder, pod_roots = tmp_path / "controller", tmp_path / "pods"
    controller_folder.mkdir()
    path = write_study(controller_folder, postgres_url, cluster.url, n_trials=3, parallel=2,
                       objective="tests.autoresearch.k8s_objectives:hacked_trial_zero")
    spec = load_spec(path)
    state, kubelet = run_with_kubelet(path, cluster, {}, pod_roots=pod_roots)
    assert (state.complete, state.settled) == (3, 3) and len(kubelet.seen) == 3
    # Each pod wrote its trial folder on its own filesystem; the controller's run folder has none of those files.
    for job in kubelet.seen:
        assert {p.name for p in (pod_roots / job).rglob("*")} >= TRIAL_FILES
    assert not {p.name for p in spec.run_folder.rglob("*")} & TRIAL_FILES
    shutil.rmtree(pod_roots)  # the pods are gone, as on a cluster

    study = open_study(spec)
    trials = study.trials
    assert [t.user_attrs["trial_dir"] for t in trials] == ["trials/00000", "trials/00001", "trials/00002"]
    # The report flags the reward-hacked trial, and it alone.
    text = write_report(spec, study, tmp_path / "report").read_text()
    assert "| #0 | sampler | training reward rose 0.100 -> 0.900 while held-out accuracy fell 0.500 -> 0.100 " \
           "(n=100) |" in text
    assert "| #1 | sampler | training reward" not in text and "| #2 | sampler | training reward" not in text
    # The proposer's prompt holds every trial's curves and the best trial's wrong predictions.
    prompt = build_prompt(spec, distributions(spec), trials, None, 2).user
    records = {r["trial"]: r for r in map(json.loads, (line for line in prompt.splitlines() if line.startswith('{"')))
               if "trial" in r}
    assert all(records[n]["train_reward_first_last"] == [0.1, 0.9] for n in range(3))
    assert records[0]["held_out_first_last"] == [0.5, 0.1] and "reward_hacking" in records[0]
    assert records[0]["held_out_curve"] == {"3": 0.1}
    best = max(trials[1:], key=lambda t: t.value).number
    assert f"## Held-out examples the best trial (#{best}) got wrong" in prompt
    assert untrusted(f"SELECT {best} FROM nowhere", spec.proposer.quote_chars) in prompt
    assert "How many customers?" not in prompt  # a match is no mistake
    # The artifact store lists every trial's files and every Job's pod log, and serves them.
    store, storage = open_artifact_store(spec), make_storage(spec)
    for trial in trials:
        metas = {m.filename: m for m in get_all_artifact_meta(trial, storage=storage)}
        assert set(metas) == TRIAL_FILES, trial.number
        download_artifact(artifact_store=store, artifact_id=metas["metrics.jsonl"].artifact_id,
                          file_path=str(tmp_path / f"metrics-{trial.number}.jsonl"))
        points = [json.loads(line) for line in (tmp_path / f"metrics-{trial.number}.jsonl").read_text().splitlines()]
        assert [p["reward_mean"] for p in points if p["phase"] == "rl"] == [0.1, 0.5, 0.9]
    # The study's own: the study file the controller ran, and each Job's pod log (its trial was told before).
    assert {m.filename for m in get_all_artifact_meta(study)} == {path.name} | {f"{job}.log" for job in kubelet.seen}


def test_make_launcher_picks_kubernetes(setup: Setup) -> None:
    launcher = make_launcher(setup.spec)
    try:
        assert isinstance(launcher, KubernetesLauncher)
    finally:
        launcher.close()


def test_a_refused_job_fails_at_once(setup: Setup, cluster: Cluster) -> None:
    cluster.mock[kmock.action.CREATE, kmock.resource("batch/v1/jobs")] << 403 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
        "message": "jobs.batch is forbidden"}
    setup.launcher.adopt(setup.study)
    worker = setup.launcher.launch(*setup.ask(), None)
    assert worker.exit_code() == 2 and worker.reason.startswith("Kubernetes refused the Job or its owner ConfigMap: 403")


def test_no_cluster_is_a_one_line_error(tmp_path: Path, postgres_url: str) -> None:
    path = write_study(tmp_path, postgres_url, "http://unused")
    path.write_text(path.read_text().replace('host = "http://unused"', f'kubeconfig = "{tmp_path / "missing"}"'))
    with pytest.raises(SpecError, match="kubernetes: cannot find the cluster"):
        KubernetesLauncher(load_spec(path))


def role_rules(manifest: Path, name: str) -> set[tuple[str, str, str]]:
    """The (API group, resource, verb) triples the Role ``name`` in ``manifest`` grants."""
    role = next(doc for doc in yaml.safe_load_all(manifest.read_text())
                if doc and doc["kind"] == "Role" and doc["metadata"]["name"] == name)
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def launcher_calls(cluster: Cluster) -> set[tuple[str, str, str]]:
    """The (API group, resource, RBAC verb) triples of every request the launcher's client sent to kmock."""
    verbs = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
             kmock.action.CREATE: "create", kmock.action.DELETE: "delete"}
    calls = set()
    for request in cluster.mock:
        agents = {value for key, value in request.headers.items() if key.lower() == "user-agent"}
        assert agents in ({USER_AGENT}, {TEST_AGENT}), f"a request from an unknown client: {request}"
        if agents == {USER_AGENT}:
            verb = verbs.get(request.action) or {"PATCH": "patch", "PUT": "update"}[str(request.method.value).upper()]
            resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            calls.add((request.resource.group or "", resource, verb))
    return calls


def test_the_controllers_role_grants_exactly_the_calls_the_launcher_makes(tmp_path: Path, postgres_url: str,
                                                                         cluster: Cluster) -> None:
    path = write_study(tmp_path, postgres_url, cluster.url, n_trials=1, parallel=1)
    first, _ = run_with_kubelet(path, cluster, {})
    # A second controller on the same study: the anchor ConfigMap exists (read, not created), Jobs are adopted.
    second, _ = run_with_kubelet(path, cluster, {}, n_trials=2)
    assert (first.complete, second.complete) == (1, 2)
    calls = launcher_calls(cluster)
    assert ("", "configmaps", "get") in calls and ("batch", "jobs", "watch") in calls and ("", "pods/log", "get") in calls
    assert calls == role_rules(CONTROLLER_MANIFEST, "autoresearch-controller")

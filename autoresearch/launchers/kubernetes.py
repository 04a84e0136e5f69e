"""Run each trial attempt as a Kubernetes Job (``launcher = "kubernetes"``), as DESIGN.md section 8 describes.

A daemon thread keeps the latest state of the study's Jobs through one
list-then-watch by label selector, and lists again when the API server answers
410 Gone or drops the connection; ``wait_any`` only reads that state, so it
wakes as soon as a Job changes and never blocks on the network, even while the
API server is down (creating, deleting and reading logs are calls of the
controller's thread, each bounded by ``API_TIMEOUT``). A finished Job's pod logs are
copied into the trial folder as ``<job>.log`` and uploaded to the study's artifact
store (as the trial's artifact when its worker died before telling, else as the
study's: Optuna takes artifacts for running trials only), the Job's final status
into ``job.json``, and the Job is then deleted with
Background propagation; ``ttlSecondsAfterFinished`` cleans up after a
controller that died. Exit codes the controller sees: 0 for a Complete Job,
the trial container's exit code for a Failed one, 124 when the Job ran past
its deadline, 2 when Kubernetes refused the Job (invalid, forbidden), 125 when
it was not created or no pod became ready within ``start_deadline_s``, and -15
(SIGTERM) when the Job was deleted. A Job that Kueue holds suspended is
queued, not late: neither the start deadline nor the trial's timeout runs.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from urllib3.exceptions import HTTPError, ReadTimeoutError

from ..artifacts import open_artifact_store, upload_files
from ..spec import KubernetesSpec, SpecError, StudySpec
from ..study import make_storage, open_study
from . import EXIT_CONFIG_ERROR, EXIT_TIMEOUT
from .k8s_jobs import (ATTEMPT_LABEL, CONTAINER, JOB_NAME_LABEL, NUMBER_LABEL, STUDY_LABEL,
                       anchor_manifest, job_manifest, job_name, study_selector, study_slug)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

EXIT_NEVER_STARTED = 125
EXIT_DELETED = -15
API_ERRORS = (ApiException, HTTPError, OSError)  # what a call to an unreachable or refusing API server raises
API_TIMEOUT = (5, 30)  # connect and read seconds for one call from the controller's thread
USER_AGENT = "autoresearch-controller"
WATCH_S = 60  # server-side timeout of one watch request; the client gives up reading 10 s later
RETRY_S = (1.0, 30.0)  # first and longest wait before listing again after an API error


def make_api_client(k: KubernetesSpec) -> client.ApiClient:
    """An API client for ``host``, else the kubeconfig the study file names, else in-cluster, else ~/.kube/config."""
    configuration = client.Configuration()
    if k.host:
        configuration.host = k.host
        return _named(client.ApiClient(configuration))
    try:
        if k.kubeconfig or k.context:
            config.load_kube_config(config_file=k.kubeconfig, context=k.context, client_configuration=configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                config.load_kube_config(client_configuration=configuration)
    except (ConfigException, OSError) as error:
        raise SpecError(f"kubernetes: cannot find the cluster (not in a pod, no usable kubeconfig): {error}; "
                        "set kubeconfig, context or host in [kubernetes]") from None
    return _named(client.ApiClient(configuration))


def _named(api: client.ApiClient) -> client.ApiClient:
    """The client under the controller's own User-Agent, so that its calls stand out in the API server's audit
    log (and the Role test tells them from the test's own)."""
    api.user_agent = USER_AGENT
    return api


def _api_error(error: Exception) -> str:
    """One line: the HTTP status and reason, and the API server's own message when it sent one."""
    if not isinstance(error, ApiException):
        return f"{type(error).__name__}: {error}"
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return ": ".join(str(part) for part in (f"{error.status} {error.reason}".strip(), message) if part)


def _is_ours(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    """The label selector, checked again here: a test API server (and a careless proxy) may ignore it."""
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(key) == value for key, value in labels.items())


def _terminal(job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's Complete or Failed condition once it has one."""
    return next((c for c in job.get("status", {}).get("conditions") or []
                 if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"), None)


class JobWatch:
    """The latest state of one study's Jobs, kept current by a list-then-watch loop on a daemon thread."""

    def __init__(self, batch: client.BatchV1Api, namespace: str, slug: str) -> None:
        self._batch, self._namespace, self._slug = batch, namespace, slug
        self._labels = {STUDY_LABEL: slug}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._started: set[str] = set()
        self._deleted: set[str] = set()
        self._changed = threading.Condition()
        self._version = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resource_version: str | None = None
        self._stream: watch.Watch | None = None
        self.error: str | None = None  # the API error of the current failure streak, for the controller's user
        self.lists = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name=f"watch-jobs-{self._slug}")
            self._thread.start()

    def stop(self) -> None:
        """End the thread: the client's Watch.stop shuts down the connection the thread is blocked reading."""
        self._stop.set()
        if self._stream is not None:
            self._stream.stop()
        if self._thread is not None:
            self._thread.join(5)

    def get(self, name: str) -> dict[str, Any] | None:
        with self._changed:
            return self._jobs.get(name)

    def jobs(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._jobs.values())

    def started(self, name: str) -> bool:
        """Whether a pod of the Job was ever ready, or the Job finished: a Job that never starts is killed."""
        with self._changed:
            return name in self._started

    def deleted(self, name: str) -> bool:
        with self._changed:
            return name in self._deleted

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the state differs from version ``seen`` or ``timeout`` passes; return the version now."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen, timeout)
            return self._version

    def relist(self) -> None:
        """List the Jobs now (raising API errors); the watch then goes on from this list's resourceVersion."""
        self._resource_version = self._list()

    def _run(self) -> None:
        resource_version = self._resource_version
        delay = RETRY_S[0]
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                    self._recovered()
                    delay = RETRY_S[0]
                resource_version = self._watch(resource_version)
            except ReadTimeoutError:
                continue  # an idle watch: go on from the same resourceVersion
            except API_ERRORS as error:
                resource_version = None
                if isinstance(error, ApiException) and error.status == 410:  # our resourceVersion is too old: list again
                    continue
                self._failed(error, delay)
                delay = min(delay * 2, RETRY_S[1])

    def _failed(self, error: Exception, delay: float) -> None:
        if self._stop.is_set():
            return
        message = _api_error(error)
        if self.error is None:
            log.warning("kubernetes: watching the study's Jobs failed (%s); retrying", message)
        self.error = message
        self._stop.wait(delay)

    def _recovered(self) -> None:
        if self.error is not None:
            log.warning("kubernetes: watching the study's Jobs again")
            self.error = None

    def _list(self) -> str:
        response = self._batch.list_namespaced_job(self._namespace, label_selector=study_selector(self._slug),
                                                   _preload_content=False, _request_timeout=API_TIMEOUT)
        body = json.loads(response.data)
        items = {job["metadata"]["name"]: job for job in body.get("items", []) if _is_ours(job, self._labels)}
        with self._changed:
            self._deleted |= set(self._jobs) - set(items)
            self._jobs = {}
            for job in items.values():
                self._store(job)
            self._bump()
        self.lists += 1
        return body.get("metadata", {}).get("resourceVersion") or ""

    def _watch(self, resource_version: str) -> str:
        self._stream = stream = watch.Watch()
        if self._stop.is_set():
            return resource_version
        for event in stream.stream(self._batch.list_namespaced_job, self._namespace,
                                   label_selector=study_selector(self._slug), resource_version=resource_version,
                                   allow_watch_bookmarks=True, timeout_seconds=WATCH_S,
                                   _request_timeout=(10, WATCH_S + 10)):
            job = event["raw_object"]
            resource_version = job.get("metadata", {}).get("resourceVersion") or resource_version
            if event["type"] == "BOOKMARK" or not _is_ours(job, self._labels):
                continue
            with self._changed:
                if event["type"] == "DELETED":
                    self._jobs.pop(job["metadata"]["name"], None)
                    self._deleted.add(job["metadata"]["name"])
                else:
                    self._store(job)
                self._bump()
            if self._stop.is_set():
                stream.stop()
        return resource_version

    def _store(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        self._jobs[name] = job
        status = job.get("status") or {}
        if status.get("ready") or status.get("succeeded") or status.get("failed") or _terminal(job):
            self._started.add(name)

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()


@dataclass
class KubernetesWorker:
    """One trial attempt's Job, as the controller sees a worker."""

    trial_id: int
    number: int
    job: str
    launcher: "KubernetesLauncher"
    attempt: int = 0
    trainer_url: str | None = None
    started: float = field(default_factory=time.monotonic)
    created: bool = False
    code: int | None = None
    reason: str | None = None  # why the Job ended, also in the trial folder's job.json

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def exit_code(self) -> int | None:
        if self.code is None:
            self.launcher._settle(self)
        return self.code

    def kill(self) -> None:
        """Delete the Job (Background: its pod gets SIGTERM and its grace period); its log is copied first."""
        if self.code is None:
            self.launcher._finish(self, EXIT_DELETED, "killed by the controller")


class KubernetesLauncher:
    """Creates one Job per trial attempt and follows them through a JobWatch."""

    def __init__(self, spec: StudySpec) -> None:
        if spec.kubernetes is None:
            raise SpecError(f"{spec.path}: launcher = \"kubernetes\" needs a [kubernetes] table")
        self._spec, self._k = spec, spec.kubernetes
        self._slug = study_slug(spec.name)
        api = make_api_client(self._k)
        self._batch, self._core = client.BatchV1Api(api), client.CoreV1Api(api)
        self._watch = JobWatch(self._batch, self._k.namespace, self._slug)
        self._storage = make_storage(spec, schema_checked=True)
        self._artifacts = open_artifact_store(spec)
        self._owner_uid: str | None = None
        self._seen = 0

    @property
    def watch(self) -> JobWatch:
        return self._watch

    def launch(self, number: int, trial_id: int, trainer_url: str | None) -> KubernetesWorker:
        """Create the Job for trial ``number``; when the API server is unreachable, retry until the start deadline."""
        frozen = self._storage.get_trial(trial_id)
        attempt = len(RetryHeartbeatStaleTrialCallback.retry_history(frozen))
        worker = KubernetesWorker(trial_id, number, job_name(self._slug, number, attempt), self, attempt, trainer_url)
        self._watch.start()
        self._create(worker)
        return worker

    def adopt(self, study: "optuna.Study") -> dict[int, KubernetesWorker]:
        """Workers for the RUNNING trials whose Jobs still exist; the Jobs of settled trials are cleaned up.

        A Job that finished while no controller watched is adopted too: the
        controller reaps it at once (a Failed Job fails and retries its trial).
        """
        try:
            self._watch.relist()
        except API_ERRORS as error:
            log.warning("kubernetes: cannot list the study's Jobs (%s): its running trials go stale and are retried",
                        _api_error(error))
            return {}
        self._watch.start()
        study_id = self._storage.get_study_id_from_name(study.study_name)
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        newest: dict[int, dict[str, Any]] = {}
        leftovers: list[dict[str, Any]] = []
        for job in sorted(self._watch.jobs(), key=lambda j: int(j["metadata"]["labels"].get(ATTEMPT_LABEL, 0))):
            number = int(job["metadata"]["labels"][NUMBER_LABEL])
            if number in running:
                if number in newest:
                    leftovers.append(newest[number])
                newest[number] = job
            else:
                leftovers.append(job)
        workers: dict[int, KubernetesWorker] = {}
        for number, job in newest.items():
            trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, number)
            workers[trial_id] = KubernetesWorker(trial_id, number, job["metadata"]["name"], self,
                                                 int(job["metadata"]["labels"].get(ATTEMPT_LABEL, 0)),
                                                 started=_started(job), created=True)
        for job in leftovers:
            self._delete(job["metadata"]["name"])
        return workers

    def wait_any(self, workers: Iterable[KubernetesWorker], timeout: float) -> None:
        """Return when any of the study's Jobs changed since the last return, or after ``timeout`` seconds."""
        self._seen = self._watch.wait(self._seen, timeout)

    def close(self) -> None:
        """Stop watching; Jobs of RUNNING trials keep running for the next controller to adopt.

        The controller returns only once its workers are gone, so every Job it
        saw end was already settled (log copied, Job deleted).
        """
        self._watch.stop()
        self._batch.api_client.close()
        self._storage.engine.dispose()

    def _create(self, worker: KubernetesWorker) -> None:
        try:
            owner = self._anchor_uid()
            self._batch.create_namespaced_job(
                self._k.namespace, job_manifest(self._spec, worker.number, worker.attempt, worker.trainer_url, owner),
                _request_timeout=API_TIMEOUT)
        except ApiException as error:
            if error.status == 409:  # created before (a repeated launch): this attempt's Job already exists
                worker.created = True
                return
            if error.status is not None and 400 <= error.status < 500 and error.status != 429:
                # Refused for good (invalid, forbidden, no such namespace): a new attempt would be refused too.
                self._finish(worker, EXIT_CONFIG_ERROR, f"Kubernetes refused the Job or its owner ConfigMap: "
                                                        f"{_api_error(error)}")
                return
            worker.reason = f"cannot create the Job yet: {_api_error(error)}"
            return
        except (HTTPError, OSError) as error:
            worker.reason = f"cannot create the Job yet: {_api_error(error)}"
            return
        worker.created, worker.reason = True, None

    def _anchor_uid(self) -> str | None:
        """The uid of the study's anchor ConfigMap, created on first use; it owns every Job of the study."""
        if self._owner_uid is None:
            manifest = anchor_manifest(self._spec)
            try:
                created = self._core.create_namespaced_config_map(self._k.namespace, manifest,
                                                                  _preload_content=False, _request_timeout=API_TIMEOUT)
                anchor = json.loads(created.data)
            except ApiException as error:
                if error.status != 409:
                    raise
                existing = self._core.read_namespaced_config_map(manifest["metadata"]["name"], self._k.namespace,
                                                                 _preload_content=False, _request_timeout=API_TIMEOUT)
                anchor = json.loads(existing.data)
            self._owner_uid = anchor.get("metadata", {}).get("uid")
        return self._owner_uid

    def _settle(self, worker: KubernetesWorker) -> None:
        """Give the worker its exit code if its Job has ended, never started, or cannot be created in time."""
        if not worker.created:
            self._create(worker)
            if worker.code is not None:
                return
        job = self._watch.get(worker.job) if worker.created else None
        condition = _terminal(job) if job is not None else None
        if condition is not None:
            why = condition.get("reason") or condition["type"]
            reason = f"Job {condition['type'].lower()}: {why}: {condition.get('message') or ''}".rstrip(": ")
            if condition["type"] == "Complete":
                self._finish(worker, 0, reason)
            else:  # the deadline has its own code; otherwise the trial container's
                self._finish(worker, EXIT_TIMEOUT if why == "DeadlineExceeded" else None, reason)
        elif worker.created and self._watch.deleted(worker.job):
            worker.code, worker.reason = EXIT_DELETED, "the Job was deleted outside the controller"
            self._record(worker, None)
        elif job is not None and (job.get("spec") or {}).get("suspend"):
            worker.started = time.monotonic()  # queued by Kueue: the start deadline and the timeout wait with it
        elif not self._watch.started(worker.job) and worker.elapsed() > self._k.start_deadline_s:
            why = worker.reason or "no pod of the Job became ready"
            self._finish(worker, EXIT_NEVER_STARTED, f"never started within {self._k.start_deadline_s:g} s: {why}")

    def _finish(self, worker: KubernetesWorker, code: int | None, reason: str) -> None:
        """Copy the pod logs, record how the Job ended, then delete it (Background).

        ``code`` None: the trial container's exit code (1 if no pod says).
        """
        pod_code = self._copy_logs(worker) if worker.created else None
        worker.code = code if code is not None else (pod_code or 1)
        worker.reason = reason
        self._record(worker, self._watch.get(worker.job))
        self._delete(worker.job)  # also when the create timed out: it may have made the Job; 404 is ignored

    def _copy_logs(self, worker: KubernetesWorker) -> int | None:
        """Write every pod's log (oldest first) into the trial folder's ``<job>.log`` and upload it to the study's
        artifact store; return the last pod's exit code."""
        try:
            listed = self._core.list_namespaced_pod(self._k.namespace, label_selector=f"{JOB_NAME_LABEL}={worker.job}",
                                                    _preload_content=False, _request_timeout=API_TIMEOUT)
        except API_ERRORS as error:
            log.warning("kubernetes: cannot list the pods of Job %s (%s)", worker.job, _api_error(error))
            return None
        pods = [p for p in json.loads(listed.data).get("items", []) if _is_ours(p, {JOB_NAME_LABEL: worker.job})]
        if not pods:
            return None
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        parts = []
        for pod in pods:
            try:
                text = self._core.read_namespaced_pod_log(pod["metadata"]["name"], self._k.namespace, container=CONTAINER,
                                                          _preload_content=False, _request_timeout=API_TIMEOUT
                                                          ).data.decode(errors="replace")
            except API_ERRORS as error:  # a pod that never started has no log
                text = f"(no log: {_api_error(error)})\n"
            parts.append(f"==> pod {pod['metadata']['name']} <==\n{text}")
        path = self._spec.trial_dir(worker.number) / f"{worker.job}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(parts))
        self._upload_log(worker, path)
        return _exit_code(pods[-1])

    def _upload_log(self, worker: KubernetesWorker, path: Path) -> None:
        """The log as the trial's artifact while the trial runs (its worker died before telling), else as the
        study's, named after the Job: Optuna takes artifacts for running trials only. A store that fails is
        logged: the log is in the trial folder, and the trial's result does not depend on it."""
        trial = self._storage.get_trial(worker.trial_id)
        try:
            if trial.state == TrialState.RUNNING:
                upload_files(self._artifacts, [path], trial, self._storage)
            else:
                upload_files(self._artifacts, [path], open_study(self._spec, self._storage))
        except Exception as error:  # noqa: BLE001 - a bucket's SDK raises its own errors (permissions, network)
            log.warning("kubernetes: the log of Job %s did not reach the artifact store (%s: %s)", worker.job,
                        type(error).__name__, error)

    def _record(self, worker: KubernetesWorker, job: dict[str, Any] | None) -> None:
        path = self._spec.trial_dir(worker.number) / "job.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"job": worker.job, "exit_code": worker.code, "reason": worker.reason,
                                    "status": (job or {}).get("status")}, indent=2) + "\n")

    def _delete(self, name: str) -> None:
        try:
            self._batch.delete_namespaced_job(name, self._k.namespace, propagation_policy="Background",
                                              _request_timeout=API_TIMEOUT)
        except API_ERRORS as error:
            if not (isinstance(error, ApiException) and error.status == 404):
                log.warning("kubernetes: cannot delete Job %s (%s); its TTL removes it", name, _api_error(error))


def _exit_code(pod: dict[str, Any]) -> int | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if status.get("name") == CONTAINER and terminated:
            return int(terminated.get("exitCode", 1))
    return None


def _started(job: dict[str, Any]) -> float:
    """The monotonic time the Job was created, so an adopted trial keeps its timeout (now if unknown)."""
    stamp = job.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return time.monotonic()
    created = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    age = (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()
    return time.monotonic() - max(age, 0.0)

"""Manifests for trial Jobs and the study's anchor object: pure functions of the study file, no API calls.

Kept apart from the API loop (kubernetes.py) so that ``autoresearch run --dry-run``
prints exactly what the launcher would create, and tests validate it against the
Kubernetes schemas without a server. The cluster side (namespace, Secrets, RBAC)
is in k8s/; the names and labels here are that contract.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from ..spec import ENV_PREFIX, KubernetesSpec, SpecError, StudySpec
from . import EXIT_CONFIG_ERROR

STUDY_LABEL = "autoresearch.dev/study"
NUMBER_LABEL = "autoresearch.dev/trial-number"
ATTEMPT_LABEL = "autoresearch.dev/attempt"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on a Job's pods by the Job controller
CONTAINER = "trial"
SLUG_MAX = 40  # leaves room in a 63-character Job name for "-t<number>-a<attempt>"


def study_slug(name: str) -> str:
    """The study name as a DNS-1123 label of at most 40 characters.

    Study names may hold ``_``, ``.`` and capitals, which Kubernetes names may
    not; when anything had to change, a hash of the full name keeps two
    studies (``a_b`` and ``a.b``) from sharing Jobs.
    """
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")
    if slug == name and len(slug) <= SLUG_MAX:
        return slug
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{slug[:SLUG_MAX - 7].rstrip('-')}-{digest}".lstrip("-")


def job_name(slug: str, number: int, attempt: int) -> str:
    """One name per trial attempt, so a repeated create answers 409 instead of starting a second pod."""
    return f"{slug}-t{number}-a{attempt}"


def anchor_name(slug: str) -> str:
    return f"autoresearch-study-{slug}"


def study_labels(slug: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "autoresearch", "app.kubernetes.io/component": "trial", STUDY_LABEL: slug}


def study_selector(slug: str) -> str:
    return ",".join(f"{key}={value}" for key, value in study_labels(slug).items())


def trial_labels(slug: str, number: int, attempt: int) -> dict[str, str]:
    return {**study_labels(slug), NUMBER_LABEL: str(number), ATTEMPT_LABEL: str(attempt)}


def study_file_in_image(spec: StudySpec) -> str:
    """Where the trial image holds the study file: as configured, else its path below the project root."""
    k = _kube(spec)
    if k.study_file_in_image:
        return k.study_file_in_image
    root = next((folder for folder in spec.path.parents if (folder / "pyproject.toml").is_file()), None)
    if root is None:
        raise SpecError(f"{spec.path}: kubernetes.study_file_in_image: the study file is outside a project "
                        "(no pyproject.toml above it); say where the image holds it")
    return spec.path.relative_to(root).as_posix()


def anchor_manifest(spec: StudySpec) -> dict[str, Any]:
    """The per-study ConfigMap that owns the study's Jobs: deleting it deletes them all (Background)."""
    slug = study_slug(spec.name)
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": anchor_name(slug), "namespace": _kube(spec).namespace,
                     "labels": {**study_labels(slug), "app.kubernetes.io/component": "study"}},
        "data": {"study": spec.name},
    }


def job_manifest(spec: StudySpec, number: int, attempt: int, trainer_url: str | None,
                 owner_uid: str | None = None) -> dict[str, Any]:
    """The Job that runs ``autoresearch trial`` for one attempt of trial ``number``.

    Retries belong to the controller (through Optuna), so ``backoffLimit`` is 0;
    a preempted pod (``DisruptionTarget``) does not count against it and is
    replaced once it has fully terminated, re-running the same trial. The
    deadline is the study's per-trial timeout plus the heartbeat grace period:
    the controller times trials out itself, the deadline stops a Job whose
    controller is gone. ``owner_uid`` is the anchor ConfigMap's (none in a dry run).
    """
    k = _kube(spec)
    slug = study_slug(spec.name)
    labels = trial_labels(slug, number, attempt)
    command = ["autoresearch", "trial", "--study", study_file_in_image(spec), "--trial-number", str(number)]
    if trainer_url:
        command += ["--trainer-url", trainer_url]
    limits = k.resources.limits.as_manifest()
    requests = k.resources.requests.as_manifest()
    if "nvidia.com/gpu" in requests:
        limits.setdefault("nvidia.com/gpu", requests["nvidia.com/gpu"])  # GPUs are requested through limits
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [{
            "name": CONTAINER, "image": k.image, "imagePullPolicy": k.image_pull_policy, "command": command,
            "env": [{"name": "AUTORESEARCH_TRIAL_NUMBER", "value": str(number)}, *_secret_env(spec)],
            "resources": {key: value for key, value in (("requests", requests), ("limits", limits)) if value},
        }],
    }
    if k.service_account:
        pod_spec["serviceAccountName"] = k.service_account
    if k.node_selector:
        pod_spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        pod_spec["tolerations"] = [_camel(t.model_dump(exclude_none=True)) for t in k.tolerations]
    metadata: dict[str, Any] = {"name": job_name(slug, number, attempt), "namespace": k.namespace,
                                "labels": {**labels, **({QUEUE_LABEL: k.queue_name} if k.queue_name else {})}}
    if owner_uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": anchor_name(slug),
                                        "uid": owner_uid}]
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": math.ceil(spec.budget.timeout_s) + spec.heartbeat.grace_s,
            "ttlSecondsAfterFinished": k.ttl_s,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                      "values": [EXIT_CONFIG_ERROR]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _secret_env(spec: StudySpec) -> list[dict[str, Any]]:
    """Each ``env:NAME`` the study file uses (storage, training.api_key) is filled from its Secret in the pod,
    and so is every variable of ``secret_env``."""
    k = _kube(spec)
    wanted = [(value[len(ENV_PREFIX):], secret) for value, secret in
              [(spec.storage or "", k.storage_secret), (spec.training.api_key_source, k.api_key_secret)]
              if value.startswith(ENV_PREFIX)] + list(k.secret_env.items())
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": s.name, "key": s.key, **({"optional": True} if s.optional else {})}}}
            for name, s in wanted]


def _camel(fields: dict[str, Any]) -> dict[str, Any]:
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key): value for key, value in fields.items()}


def _kube(spec: StudySpec) -> KubernetesSpec:
    if spec.kubernetes is None:
        raise SpecError(f"{spec.path}: kubernetes: the study file has no [kubernetes] table")
    return spec.kubernetes

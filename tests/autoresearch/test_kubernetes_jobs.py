"""Trial Job manifests: valid against the Kubernetes schemas (strict), and carrying the cluster contract."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import ValidationError, validate
from kubernetes_validate.utils import latest_version

from autoresearch.cli import main
from autoresearch.launchers.k8s_jobs import (EXIT_CONFIG_ERROR, anchor_manifest, job_manifest, study_file_in_image,
                                             study_slug)
from autoresearch.spec import SpecError, load_spec

VERSIONS = ["1.31", latest_version()]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

MINIMAL = """
[kubernetes]
image = "registry.example/autoresearch:1"
study_file_in_image = "studies/t.toml"
"""
FULL = """
[kubernetes]
image = "registry.example/autoresearch:1"
study_file_in_image = "studies/t.toml"
namespace = "research"
image_pull_policy = "Always"
service_account = "trial-runner"
queue_name = "autoresearch"
ttl_s = 600
start_deadline_s = 120
node_selector = { "cloud.google.com/gke-accelerator" = "nvidia-l4" }
tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" },
               { key = "spot", value = "true", effect = "NoExecute", toleration_seconds = 30 }]
storage_secret = { name = "pg", key = "dsn" }
secret_env = { HF_TOKEN = { name = "hf-token", key = "token", optional = true } }
[kubernetes.resources.requests]
cpu = "4"
memory = "16Gi"
"nvidia.com/gpu" = 1
[kubernetes.resources.limits]
memory = "20Gi"
"""


def write_study(folder: Path, *, name: str = "Text2SQL_gke.v1", storage: str = "env:AUTORESEARCH_STORAGE_URL",
                api_key: str = "env:TINKER_API_KEY", api: str = "http://trainer-api.autoresearch.svc:8000",
                launcher: str = "kubernetes", kube: str = MINIMAL, extra: str = "",
                artifact_store: str | None = "gs://autoresearch-artifacts") -> Path:
    path = folder / "t.toml"
    path.write_text(textwrap.dedent(f"""
        name = "{name}"
        storage = "{storage}"
        launcher = "{launcher}"
        {f'artifact_store = "{artifact_store}"' if artifact_store else ""}
        [space.learning_rate]
        type = "float"
        low = 1e-5
        high = 1e-3
        log = true
        [training]
        api = "{api}"
        api_key = "{api_key}"
        [budget]
        n_trials = 5
        parallel = 3
        timeout_s = 1800.5
        """) + kube + extra)
    return path


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kube", [MINIMAL, FULL], ids=["minimal", "full"])
@pytest.mark.parametrize("trainer_url", [None, "http://trainer-api.autoresearch.svc:8000"])
def test_every_job_validates_strictly(tmp_path: Path, version: str, kube: str, trainer_url: str | None) -> None:
    spec = load_spec(write_study(tmp_path, kube=kube))
    validate(anchor_manifest(spec), version, strict=True)
    for number, attempt in ((0, 0), (7, 2), (123456, 11)):
        validate(job_manifest(spec, number, attempt, trainer_url, owner_uid="0b5e7f7e-1b8e-4a8a-9d43-5f1f0d3c2a11"),
                 version, strict=True)
        validate(job_manifest(spec, number, attempt, trainer_url), version, strict=True)


def test_the_strict_check_rejects_an_unknown_field(tmp_path: Path) -> None:
    job = job_manifest(load_spec(write_study(tmp_path)), 0, 0, None)
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(ValidationError):
        validate(job, "1.31", strict=True)


def test_job_carries_names_labels_and_policies(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path, kube=FULL))
    job = job_manifest(spec, 12, 3, "http://trainer-api.autoresearch.svc:8000", owner_uid="uid-1")
    slug = study_slug(spec.name)
    meta, body = job["metadata"], job["spec"]
    pod = body["template"]["spec"]
    container = pod["containers"][0]
    trial_labels = {"app.kubernetes.io/name": "autoresearch", "app.kubernetes.io/component": "trial",
                    "autoresearch.dev/study": slug, "autoresearch.dev/trial-number": "12",
                    "autoresearch.dev/attempt": "3"}
    assert meta["name"] == f"{slug}-t12-a3" and meta["namespace"] == "research"
    assert meta["labels"] == {**trial_labels, "kueue.x-k8s.io/queue-name": "autoresearch"}
    assert body["template"]["metadata"]["labels"] == trial_labels
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "ConfigMap", "name": f"autoresearch-study-{slug}",
                                        "uid": "uid-1"}]
    assert (body["backoffLimit"], body["podReplacementPolicy"], body["ttlSecondsAfterFinished"]) == (0, "Failed", 600)
    assert body["activeDeadlineSeconds"] == math.ceil(spec.budget.timeout_s) + spec.heartbeat.grace_s
    assert body["podFailurePolicy"]["rules"] == [
        {"action": "FailJob",
         "onExitCodes": {"containerName": "trial", "operator": "In", "values": [EXIT_CONFIG_ERROR]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "trial-runner"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"][1] == {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                     "tolerationSeconds": 30}
    assert container["command"] == ["autoresearch", "trial", "--study", "studies/t.toml", "--trial-number", "12",
                                    "--trainer-url", "http://trainer-api.autoresearch.svc:8000"]
    assert container["env"] == [
        {"name": "AUTORESEARCH_TRIAL_NUMBER", "value": "12"},
        {"name": "AUTORESEARCH_STORAGE_URL", "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}},
        {"name": "TINKER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "trainer-api-key", "key": "api-key"}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}},
    ]
    # A GPU request is also its limit (Kubernetes does not overcommit GPUs).
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"memory": "20Gi", "nvidia.com/gpu": "1"}}


def test_literal_values_need_no_secret_and_no_trainer_url(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path, storage="postgresql://u@db:5432/optuna", api_key="tml-literal", api="none"))
    container = job_manifest(spec, 0, 0, None)["spec"]["template"]["spec"]["containers"][0]
    assert container["env"] == [{"name": "AUTORESEARCH_TRIAL_NUMBER", "value": "0"}]
    assert "--trainer-url" not in container["command"]
    assert "ownerReferences" not in job_manifest(spec, 0, 0, None)["metadata"]


@pytest.mark.parametrize("name", ["a", "Text2SQL_gke.v1", "text2sql-gke-v1", "x" * 200, "A.b_c-D", "9_" + "z" * 60])
def test_slugs_are_dns_labels_and_names_fit(name: str) -> None:
    slug = study_slug(name)
    assert DNS_LABEL.match(slug) and len(slug) <= 40
    assert len(f"{slug}-t{10**9}-a{10**6}") <= 63


def test_names_that_differ_only_in_punctuation_get_different_slugs() -> None:
    names = ["a_b", "a.b", "a-b", "A-b", "x" * 50, "x" * 51]
    assert len({study_slug(n) for n in names}) == len(names)
    assert study_slug("plain-name") == "plain-name"


def test_study_file_in_image_defaults_to_the_path_below_the_project_root(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "studies").mkdir()
    kube = '\n[kubernetes]\nimage = "registry.example/autoresearch:1"\n'
    assert study_file_in_image(load_spec(write_study(tmp_path / "studies", kube=kube))) == "studies/t.toml"


def test_study_file_outside_a_project_must_be_named(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path, kube='\n[kubernetes]\nimage = "registry.example/autoresearch:1"\n'))
    with pytest.raises(SpecError, match="kubernetes.study_file_in_image"):
        job_manifest(spec, 0, 0, None)


@pytest.mark.parametrize(("change", "message"), [
    ({"kube": ""}, "needs a [kubernetes] table"),
    ({"storage": "sqlite:///x.db"}, "needs a 'storage' database"),
    ({"api": "local"}, "trial pods cannot reach a training API"),
    ({"artifact_store": None}, "needs an 'artifact_store' that trial pods, the controller and the dashboard share"),
    ({"kube": FULL.replace('memory = "20Gi"', '"nvidia.com/gpu" = 2')}, "requests and limits must be equal"),
    ({"kube": MINIMAL + 'namespace = "Bad_NS"\n'}, "kubernetes.namespace"),
    ({"kube": MINIMAL + "[kubernetes.resources.requests]\ncpu = \"lots\"\n"}, "kubernetes.resources.requests.cpu"),
    ({"kube": MINIMAL + "bogus = 1\n"}, "kubernetes.bogus"),
    ({"api_key": "sk-not-tinker"}, "training.api_key"),
])
def test_bad_kubernetes_settings_fail_in_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)) as error:
        load_spec(write_study(tmp_path, **change))
    assert "\n" not in str(error.value)


def test_env_values_are_read_when_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(write_study(tmp_path))
    monkeypatch.delenv("AUTORESEARCH_STORAGE_URL", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(SpecError, match="storage: environment variable AUTORESEARCH_STORAGE_URL is not set"):
        spec.storage_url
    with pytest.raises(SpecError, match="training.api_key: environment variable TINKER_API_KEY is not set"):
        spec.training.api_key
    monkeypatch.setenv("AUTORESEARCH_STORAGE_URL", "postgresql://u@db:5432/optuna")
    monkeypatch.setenv("TINKER_API_KEY", "tml-from-secret")
    assert spec.storage_url == "postgresql+psycopg://u@db:5432/optuna"
    assert spec.training.api_key == "tml-from-secret"
    monkeypatch.setenv("TINKER_API_KEY", "sk-wrong")
    with pytest.raises(SpecError, match="must start with 'tml-'"):
        spec.training.api_key


def test_dry_run_prints_the_jobs_it_would_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AUTORESEARCH_STORAGE_URL", raising=False)  # storage unreachable: numbering starts at 0
    path = write_study(tmp_path, kube=FULL, extra='[dataset]\nsource = "synthetic:retail"\nn_train = 20\nn_eval = 8\n')
    assert main(["run", str(path), "--dry-run", "--n-trials", "2"]) == 0
    captured = capsys.readouterr()
    assert "storage env:AUTORESEARCH_STORAGE_URL" in captured.err  # the summary; stdout holds the manifests alone
    documents = list(yaml.safe_load_all(captured.out))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Job", "Job"]  # parallel 3, but only 2 trials asked
    assert [d["metadata"]["labels"].get("autoresearch.dev/trial-number") for d in documents[1:]] == ["0", "1"]
    for document in documents:
        validate(document, "1.31", strict=True)

"""Every kustomization under k8s/ renders, every object in it validates strictly against the newest
Kubernetes schemas kubernetes-validate bundles, and the manifests keep the cluster contract the
Kubernetes launcher, the study file, the images and the README rely on.

Custom resources (Kueue's) have no bundled schema: their apiVersion, kind, metadata and the spec
fields Kueue requires are checked here instead, with the references between them.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

import trainer_api.__main__ as trainer_cli
from autoresearch.cli import build_parser
from autoresearch.launchers.k8s_jobs import job_manifest
from autoresearch.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
OVERLAYS_ON_GKE = ["overlays/gke", "overlays/kueue", "overlays/cloudsql"]
GKE_STUDY = REPO / "studies" / "text2sql-gke.toml"
NAMESPACE = "autoresearch"
APP_UID = 10001
KUEUE = "kueue.x-k8s.io/v1beta1"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ResourceFlavor", "ClusterQueue"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
STORAGE_SECRET = ("autoresearch-storage", "url")
API_KEY_SECRET = ("trainer-api-key", "api-key")


def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` of one folder, parsed; kustomize itself rejects a broken patch or reference."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    return _render(kustomization)


@functools.cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {kustomization}: {done.stderr.strip()}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def schema_version() -> str:
    version = kubernetes_validate.latest_version()
    assert tuple(map(int, version.split(".")[:2])) >= (1, 31), f"kubernetes-validate bundles schemas up to {version}"
    return version


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    """Env var name -> (secret, key, optional) for every secretKeyRef of one container."""
    refs = {}
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[env["name"]] = (ref["name"], ref["key"], ref.get("optional", False))
    return refs


def documented_secrets() -> set[tuple[str, str]]:
    """(secret, key) pairs the README's ``kubectl create secret generic`` commands create."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    created = set()
    for name, options in re.findall(r"kubectl[^\n]*create secret generic ([a-z0-9-]+)([^\n]*)", text):
        created |= {(name, key) for key in re.findall(r"--from-literal=([-._a-zA-Z0-9]+)=", options)}
    return created


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (K8S / "images" / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def check_kueue(obj: dict[str, Any], objects: tuple[dict[str, Any], ...]) -> None:
    """What Kueue's CRDs require of the three kinds the kueue overlay uses, and their references."""
    kind, spec = obj["kind"], obj.get("spec", {})
    assert obj["apiVersion"] == KUEUE, obj["apiVersion"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    if kind == "ResourceFlavor":
        assert set(spec) <= {"nodeLabels", "nodeTaints", "tolerations", "topologyName"}
    elif kind == "ClusterQueue":
        flavors = {o["metadata"]["name"] for o in objects if o["kind"] == "ResourceFlavor"}
        assert spec["resourceGroups"], "a ClusterQueue without resourceGroups admits nothing"
        for group in spec["resourceGroups"]:
            covered = group["coveredResources"]
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors, f"ClusterQueue names unknown ResourceFlavor {flavor['name']}"
                assert [r["name"] for r in flavor["resources"]] == covered, "flavors list coveredResources in order"
                for resource in flavor["resources"]:
                    parse_quantity(resource["nominalQuota"])
        assert spec["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    elif kind == "LocalQueue":
        assert obj["metadata"]["namespace"] == NAMESPACE
        find(objects, "ClusterQueue", spec["clusterQueue"])
    else:
        pytest.fail(f"no check for custom resource {kind}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_strictly(kustomization: str) -> None:
    version = schema_version()
    objects = render(kustomization)
    assert objects
    for obj in objects:
        where = f"{kustomization}: {obj['kind']} {obj['metadata'].get('name')}"
        if obj["apiVersion"].startswith("kueue.x-k8s.io/"):
            check_kueue(obj, objects)
        else:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {error.message} at {'/'.join(map(str, error.path))}")
        namespaced = obj["kind"] not in CLUSTER_SCOPED
        assert obj["metadata"].get("namespace") == (NAMESPACE if namespaced else None), where


def test_strict_validation_rejects_a_misplaced_field() -> None:
    """The validator is not a rubber stamp: a field in the wrong place fails under strict mode."""
    deployment = find(render("base"), "Deployment", "trainer-api")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, schema_version(), strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_reach_named_ports_of_their_pods(kustomization: str) -> None:
    objects = render(kustomization)
    expected = {"trainer-api": 8000, "optuna-dashboard": 8080, "postgres": 5432}
    for service in (o for o in objects if o["kind"] == "Service"):
        name, selector = service["metadata"]["name"], service["spec"]["selector"]
        targets = [w for w in objects if w["kind"] in WORKLOADS
                   and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ports = {p["name"]: p["containerPort"] for c in pod_spec(targets[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port named {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]] == expected[name]
    assert {s["metadata"]["name"] for s in objects if s["kind"] == "Service"} == set(expected)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_take_their_secrets_by_contract_and_the_readme_creates_them(kustomization: str) -> None:
    objects = render(kustomization)
    wanted = {
        ("Job", "autoresearch-controller", "controller"): {"AUTORESEARCH_STORAGE_URL": STORAGE_SECRET,
                                                          "TINKER_API_KEY": API_KEY_SECRET},
        ("Deployment", "optuna-dashboard", "optuna-dashboard"): {"AUTORESEARCH_STORAGE_URL": STORAGE_SECRET},
        ("Deployment", "trainer-api", "trainer-api"): {"TRAINER_API_KEY": API_KEY_SECRET},
    }
    for (kind, name, container_name), env in wanted.items():
        container = next(c for c in pod_spec(find(objects, kind, name))["containers"] if c["name"] == container_name)
        refs = secret_refs(container)
        assert {var: refs[var][:2] for var in env} == env, f"{kind} {name}"
    created = documented_secrets()
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        for container in containers(pod_spec(workload)):
            for var, (secret, key, _optional) in secret_refs(container).items():
                assert (secret, key) in created, f"{workload['metadata']['name']}: {var} needs {secret}/{key}, " \
                                                 "which the README does not create"
            defined = {env["name"] for env in container.get("env", [])}
            for var in re.findall(r"\$\((\w+)\)", " ".join(container.get("command", []) + container.get("args", []))):
                assert var in defined, f"{container['name']} expands $({var}), which it does not define"


def test_the_controller_role_is_bound_to_the_controller_alone_and_nothing_is_cluster_wide() -> None:
    """Its verbs are checked against the calls the launcher makes, in tests/autoresearch/test_kubernetes_launcher.py."""
    objects = render("base")
    find(objects, "Role", "autoresearch-controller")
    binding = find(objects, "RoleBinding", "autoresearch-controller")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "autoresearch-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "autoresearch-controller",
                                    "namespace": NAMESPACE}]
    find(objects, "ServiceAccount", "autoresearch-controller")
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_the_controller_gets_an_api_token_and_nothing_runs_as_root(kustomization: str) -> None:
    for workload in (o for o in render(kustomization) if o["kind"] in WORKLOADS):
        spec, name = pod_spec(workload), workload["metadata"]["name"]
        if name == "autoresearch-controller":
            assert spec["serviceAccountName"] == "autoresearch-controller"
            assert spec.get("automountServiceAccountToken", True)
        else:
            assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in containers(spec):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, f"{name}/{container['name']}"
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"], f"{name}/{container['name']} has no memory limit"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_long_running_containers_have_probes_on_their_own_ports(kustomization: str) -> None:
    routes_source = (REPO / "trainer_api" / "routes" / "server.py").read_text()
    health_route = re.search(r'^HEALTH_PATH = "([^"]+)"', routes_source, re.MULTILINE)
    assert health_route and "@router.get(HEALTH_PATH)\nasync def healthz" in routes_source
    for workload in (o for o in render(kustomization) if o["kind"] in ("Deployment", "StatefulSet")):
        for container in pod_spec(workload)["containers"]:
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                action = container[probe]
                assert "httpGet" in action or "exec" in action, f"{workload['metadata']['name']} {probe}"
                if "httpGet" in action:
                    assert action["httpGet"]["port"] in ports
            if workload["metadata"]["name"] == "trainer-api":
                paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
                assert paths == {health_route.group(1)}, "trainer-api probes must use the service's health route"


def test_the_controller_job_runs_the_gke_study_against_this_cluster() -> None:
    job = find(render("base"), "Job", "autoresearch-controller")
    controller = next(c for c in pod_spec(job)["containers"] if c["name"] == "controller")
    args = build_parser().parse_args(controller["args"])
    assert args.func.__name__ == "_run" and not args.dry_run
    spec = load_spec(REPO / args.study)
    assert spec.launcher == "kubernetes" and spec.kubernetes is not None
    assert spec.kubernetes.namespace == NAMESPACE
    assert spec.storage == "env:AUTORESEARCH_STORAGE_URL"
    assert spec.training.api_key_source == "env:TINKER_API_KEY"
    trainer = find(render("base"), "Service", "trainer-api")
    assert spec.training.api == f"http://trainer-api.{NAMESPACE}.svc:{trainer['spec']['ports'][0]['port']}"
    assert pod_spec(job)["restartPolicy"] == "Never"
    volumes = {m["mountPath"] for m in controller["volumeMounts"]}
    assert spec.run_folder.parent.as_posix().replace(REPO.as_posix(), "/app") in volumes, "run folder not writable"


@pytest.mark.parametrize("kustomization", ["base", "overlays/gke"])
def test_the_training_api_serves_on_its_service_port_with_checkpoints_on_its_volume(
        kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(kustomization)
    container = pod_spec(find(objects, "Deployment", "trainer-api"))["containers"][0]
    entrypoint = [args for op, args in dockerfile("trainer-api.Dockerfile") if op == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint[0])[-1] == "serve" and "command" not in container
    parsed = []
    monkeypatch.setattr(trainer_cli, "_serve", lambda args: parsed.append(args) or 0)
    assert trainer_cli.main(["serve", *container["args"]]) == 0
    served = parsed[0]
    service_port = find(objects, "Service", "trainer-api")["spec"]["ports"][0]["port"]
    assert (served.host, served.port) == ("0.0.0.0", service_port)
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(served.checkpoint_root.startswith(mount + "/") for mount in mounts), "checkpoints would die with the pod"
    assert served.device == ("cuda" if kustomization != "base" else None)
    assert served.base_model == load_spec(GKE_STUDY).training.base_model


@pytest.mark.parametrize("kustomization", OVERLAYS_ON_GKE)
def test_trial_jobs_from_the_study_use_the_controllers_image_and_documented_secrets(kustomization: str) -> None:
    spec = load_spec(GKE_STUDY)
    trial = job_manifest(spec, number=0, attempt=0, trainer_url=spec.training.api)
    kubernetes_validate.validate(trial, schema_version(), strict=True)
    objects = render(kustomization)
    controller = find(objects, "Job", "autoresearch-controller")
    assert trial["spec"]["template"]["spec"]["containers"][0]["image"] == pod_spec(controller)["containers"][0]["image"]
    refs = secret_refs(trial["spec"]["template"]["spec"]["containers"][0])
    assert {var: ref[:2] for var, ref in refs.items()} == {"AUTORESEARCH_STORAGE_URL": STORAGE_SECRET,
                                                           "TINKER_API_KEY": API_KEY_SECRET,
                                                           "HF_TOKEN": ("hf-token", "token")}
    assert {ref[:2] for ref in refs.values()} <= documented_secrets()


WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"


@pytest.mark.parametrize("kustomization", OVERLAYS_ON_GKE)
def test_trials_the_controller_and_the_dashboard_reach_the_studys_bucket_through_workload_identity(
        kustomization: str) -> None:
    objects = render(kustomization)
    spec = load_spec(GKE_STUDY)
    scheme, _, bucket = (spec.artifact_store or "").partition("://")
    assert scheme == "gs", "the GKE study keeps its artifacts in a bucket the pods share"
    trial = pod_spec(job_manifest(spec, number=0, attempt=0, trainer_url=spec.training.api))
    dashboard = find(objects, "Deployment", "optuna-dashboard")
    controller = find(objects, "Job", "autoresearch-controller")
    accounts = {name: find(objects, "ServiceAccount", name)["metadata"]["annotations"][WORKLOAD_IDENTITY]
                for name in (trial["serviceAccountName"], pod_spec(dashboard)["serviceAccountName"],
                             pod_spec(controller)["serviceAccountName"])}
    assert set(accounts) == {"autoresearch", "autoresearch-controller"}
    [google_account] = set(accounts.values())
    assert re.fullmatch(r"[a-z][-a-z0-9]*@[-A-Z_a-z0-9]+\.iam\.gserviceaccount\.com", google_account)
    assert trial["automountServiceAccountToken"] is False  # an identity for the bucket, no Kubernetes API rights
    # The dashboard reads its artifact store from its --from-config file, which names the study's bucket.
    container = pod_spec(dashboard)["containers"][0]
    [config_path] = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--from-config=")]
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod_spec(dashboard)["volumes"] if v["name"] == mount["name"])
    config = find(objects, "ConfigMap", volume["configMap"]["name"])["data"][config_path.rsplit("/", 1)[1]]
    assert tomllib.loads(config) == {"artifact_store": {"gcs": {"bucket_name": bucket}}}


@pytest.mark.parametrize("kustomization", OVERLAYS_ON_GKE)
def test_gke_puts_the_training_api_on_a_gpu_node_and_pins_images_and_disks(kustomization: str) -> None:
    objects = render(kustomization)
    trainer = pod_spec(find(objects, "Deployment", "trainer-api"))
    assert "cloud.google.com/gke-accelerator" in trainer["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in trainer["tolerations"]
    container = trainer["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--device=cuda" in container["args"]
    images = {c["image"] for o in objects if o["kind"] in WORKLOADS for c in containers(pod_spec(o))}
    assert not images & {"autoresearch", "trainer-api"}, "the base's image names must point at the registry"
    assert {image.rsplit("/", 1)[-1] for image in images} >= {"autoresearch:latest", "trainer-api:latest"}
    claims = [o["spec"] for o in objects if o["kind"] == "PersistentVolumeClaim"]
    claims += [t["spec"] for o in objects if o["kind"] == "StatefulSet" for t in o["spec"]["volumeClaimTemplates"]]
    assert claims and all(c["storageClassName"] == "standard-rwo" for c in claims)


def test_kueue_quota_admits_at_least_one_trial_of_the_study() -> None:
    objects = render("overlays/kueue")
    local = find(objects, "LocalQueue", "autoresearch")
    quota = {r["name"]: parse_quantity(r["nominalQuota"])
             for group in find(objects, "ClusterQueue", local["spec"]["clusterQueue"])["spec"]["resourceGroups"]
             for flavor in group["flavors"] for r in flavor["resources"]}
    requests = load_spec(GKE_STUDY).kubernetes.resources.requests.as_manifest()
    for resource, amount in requests.items():
        assert resource in quota, f"the ClusterQueue has no quota for {resource}, so trials are never admitted"
        assert parse_quantity(amount) <= quota[resource]
    assert "kueue.x-k8s.io/queue-name" not in find(objects, "Job", "autoresearch-controller")["metadata"]["labels"]


def test_cloudsql_replaces_the_statefulset_behind_the_same_service() -> None:
    objects = render("overlays/cloudsql")
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    service = find(objects, "Service", "postgres")
    assert service["spec"].get("clusterIP") != "None"
    proxy = pod_spec(find(objects, "Deployment", "cloud-sql-proxy"))
    assert proxy["serviceAccountName"] == "cloud-sql-proxy"
    account = find(objects, "ServiceAccount", "cloud-sql-proxy")
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    assert not any(ref[0] == "postgres" for w in objects if w["kind"] in WORKLOADS
                   for c in containers(pod_spec(w)) for ref in secret_refs(c).values())


@pytest.mark.parametrize(("name", "install", "entrypoint"), [
    ("autoresearch.Dockerfile", "'.[gcs]'", ["autoresearch"]),
    ("trainer-api.Dockerfile", "'.[trainer,vllm]'", ["python", "-m", "trainer_api", "serve"]),
])
def test_images_install_this_repository_and_run_as_the_manifests_uid(name: str, install: str,
                                                                     entrypoint: list[str]) -> None:
    steps = dockerfile(name)
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in steps and ("COPY", ". /app") in steps
    runs = " && ".join(args for op, args in steps if op == "RUN")
    assert f"pip install --no-cache-dir {install}" in runs
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [e for group in re.findall(r"\[([\w,-]+)\]", install) for e in group.split(",")]
    assert all(extra in pyproject["optional-dependencies"] for extra in extras)
    assert steps.index(("COPY", ". /app")) < next(i for i, (op, args) in enumerate(steps) if "pip install" in args)
    users = [args for op, args in steps if op == "USER"]
    assert users == [str(APP_UID)], "one non-root numeric USER, the uid the manifests run as"
    assert [yaml.safe_load(args) for op, args in steps if op == "ENTRYPOINT"] == [entrypoint]
    if entrypoint == ["autoresearch"]:
        assert "autoresearch" in pyproject["scripts"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_of_this_repositorys_images_run_as_the_image_user(kustomization: str) -> None:
    for workload in (o for o in render(kustomization) if o["kind"] in WORKLOADS):
        images = {c["image"].rsplit("/", 1)[-1].split(":")[0] for c in containers(pod_spec(workload))}
        if images & {"autoresearch", "trainer-api"}:
            assert pod_spec(workload)["securityContext"]["runAsUser"] == APP_UID, workload["metadata"]["name"]

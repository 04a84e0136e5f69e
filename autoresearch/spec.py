"""Study files (``studies/*.toml``) as validated pydantic models.

A study file is the whole contract between a researcher and the controller:
what to search, which reward knobs may move, how much to spend and where to
run. Everything is checked up front so that a typo fails in one line that
names the file and the field, instead of hours later inside a trial.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from env.text2sql import RewardConfig

OBJECTIVE_METRIC = "eval_execution_accuracy"
OBJECTIVE_DIRECTION = "maximize"
DEFAULT_OBJECTIVE = "autoresearch.trial:run_trial"
REWARD_PREFIX = "reward."
BUCKET_SCHEMES = ("gs", "s3")
"""The bucket URLs ``artifact_store`` takes: Google Cloud Storage and S3 (artifacts.py opens them)."""


class SpecError(ValueError):
    """A study file that cannot be used; the message is the one line a user sees."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Range(_Strict):
    """A float range, optionally log-scaled: a searched float, or the bounds of a reward weight."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check_range(self) -> "_Range":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


class RewardRange(_Range):
    """Bounds for one RewardConfig weight; StudySpec checks them against RewardConfig's own bounds."""


class FloatParam(_Range):
    type: Literal["float"]
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_step(self) -> "FloatParam":
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("a log-scaled int range needs low >= 1 and step 1")
        return self


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Union[str, int, float, bool]] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Any]) -> list[Any]:
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError("choices must be distinct")
        return choices


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class DatasetSpec(_Strict):
    """Where examples come from: ``synthetic`` (the built-in generator) or anything ``env.text2sql.data.load``
    reads (a JSONL or Parquet file, a Spider/BIRD folder, a Hugging Face id). Without ``eval_source`` the held-out
    split is drawn from ``source`` with ``seed``, disjoint from the training split."""

    source: str = "synthetic"
    eval_source: str | None = None
    n_train: int = Field(200, ge=1)
    n_eval: int = Field(50, ge=1)
    seed: int = 0


ENV_PREFIX = "env:"


def from_env(value: str, where: str) -> str:
    """``env:NAME`` stands for the variable NAME, read when the value is used: a study file names the secret a
    cluster injects (see k8s/) without holding it, and a laptop without the variable can still validate the file."""
    if not value.startswith(ENV_PREFIX):
        return value
    name = value[len(ENV_PREFIX):]
    if name not in os.environ:
        raise SpecError(f"{where}: environment variable {name} is not set (the study file says {value!r})")
    return os.environ[name]


class TinyModelSpec(_Strict):
    """The size of the random Gemma-family model that ``base_model = "tiny"`` makes
    (``python -m trainer_api make-tiny-model``): its attention heads are 32 wide, so the hidden size is
    a multiple of 32. The defaults are the smallest model, the one the tests use; the tiny study asks for
    a wider one, which learns far more per CPU second (studies/text2sql-tiny.toml)."""

    hidden_size: int = Field(64, ge=64, le=4096, multiple_of=32)
    num_layers: int = Field(2, ge=1, le=64)


class TrainingSpec(_Strict):
    """The Tinker-compatible service: a URL, ``local`` (start one), or ``none`` (objectives that do not train)."""

    api: str = "local"
    base_model: str = "tiny"
    tiny_model: TinyModelSpec = TinyModelSpec()
    """Used only when ``base_model`` is ``tiny``."""
    api_key_source: str = Field("tml-autoresearch-local", alias="api_key")
    device: str | None = None
    sampler: Literal["torch", "vllm"] | None = None
    """What serves sampling in a local service (None: the service's default, vLLM when installed on a GPU)."""
    startup_timeout_s: float = Field(300, gt=0)

    @field_validator("api")
    @classmethod
    def _api(cls, api: str) -> str:
        if api not in ("local", "none") and not api.startswith(("http://", "https://")):
            raise ValueError("must be 'local', 'none' or an http(s):// URL")
        return api

    @field_validator("api_key_source")
    @classmethod
    def _key(cls, key: str) -> str:
        if not key.startswith(("tml-", ENV_PREFIX)):
            raise ValueError("must start with 'tml-' (the tinker SDK refuses other keys) or be 'env:NAME'")
        return key

    @property
    def api_key(self) -> str:
        """The key itself, read from the environment when the study file says ``env:NAME``."""
        key = from_env(self.api_key_source, "training.api_key")
        if not key.startswith("tml-"):
            raise SpecError(f"training.api_key: the key from {self.api_key_source!r} must start with 'tml-'")
        return key


class BudgetSpec(_Strict):
    n_trials: int = Field(20, ge=1)
    parallel: int = Field(1, ge=1)
    timeout_s: float = Field(3600, gt=0)
    max_retries: int = Field(2, ge=0)


class PrunerSpec(_Strict):
    type: Literal["none", "median", "hyperband", "wilcoxon"] = "median"
    n_startup_trials: int = Field(3, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


class SamplerSpec(_Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(5, ge=0)


class HeartbeatSpec(_Strict):
    """Worker heartbeats; ``grace_s`` must sit well above the worst stall (a long eval, a GC pause)."""

    interval_s: int = Field(5, ge=1)
    grace_s: int = Field(60, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "HeartbeatSpec":
        if self.grace_s <= self.interval_s:
            raise ValueError("grace_s must exceed interval_s")
        return self


class ProposerSpec(_Strict):
    """The LLM that proposes a share of the trials (``[proposer]``); ``proposer = "none"`` is plain Optuna.

    Nothing here reaches the objective: the proposer only fills parameter
    slots of the declared space, and every proposal is validated against it.
    """

    type: Literal["none", "gemini", "openai"] = "none"
    model: str | None = None
    share: float = Field(0.3, gt=0, le=1)
    proposals_per_call: int = Field(2, ge=1, le=20)
    api_key: str | None = None
    vertex_project: str | None = None
    vertex_location: str = "us-central1"
    base_url: str | None = None
    api_version: Literal["v1", "v1beta"] = "v1beta"
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    retry_delay_s: float = Field(1.0, ge=0)
    deadline_s: float | None = Field(None, gt=0)
    failure_cooldown_s: float = Field(300, ge=0)
    max_calls: int = Field(50, ge=0)
    max_tokens: int = Field(2_000_000, ge=0)
    usd_per_million_input_tokens: float = Field(0.0, ge=0)
    usd_per_million_output_tokens: float = Field(0.0, ge=0)
    out_of_range: Literal["clamp", "reject"] = "clamp"
    quote_chars: int = Field(300, ge=20, le=5000)
    notes: str | None = None
    mode: Literal["live", "record", "replay"] = "live"
    cassette: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @field_validator("api_key")
    @classmethod
    def _key_from_env(cls, key: str | None) -> str | None:
        if key is not None and not key.startswith(ENV_PREFIX):
            raise ValueError("must be 'env:NAME': keep keys in the environment, not in study files")
        return key

    @model_validator(mode="after")
    def _check(self) -> "ProposerSpec":
        if self.type != "none" and not self.model:
            raise ValueError(f"a {self.type} proposer needs 'model'")
        if self.type == "openai" and not self.base_url:
            raise ValueError("an openai proposer needs 'base_url' (the server's /v1 endpoint)")
        if self.vertex_project and self.type != "gemini":
            raise ValueError("vertex_project is for a gemini proposer only")
        return self

    @property
    def deadline(self) -> float:
        """The longest the controller waits for one call, retries included (a server that trickles bytes never
        trips the per-read timeout): ``deadline_s``, else every attempt's timeout plus generous backoff."""
        return self.deadline_s or (self.timeout_s + 10 * max(self.retry_delay_s, 1.0)) * (self.max_retries + 1)


class Quantities(_Strict):
    """Resource quantities for the trial container: ``cpu = "2"``, ``memory = "8Gi"``, ``"nvidia.com/gpu" = 1``."""

    cpu: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMk]i?|e[0-9]+)?$")
    ephemeral_storage: str | None = Field(None, alias="ephemeral-storage", pattern=r"^[0-9]+([EPTGMk]i?)?$")
    gpu: int | None = Field(None, alias="nvidia.com/gpu", ge=0)

    def as_manifest(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.model_dump(by_alias=True, exclude_none=True).items()}


class Resources(_Strict):
    requests: Quantities = Quantities(cpu="1", memory="2Gi")
    limits: Quantities = Quantities()

    @model_validator(mode="after")
    def _gpus(self) -> "Resources":
        # GPUs cannot be overcommitted: Kubernetes rejects a request without the same limit.
        if None not in (self.requests.gpu, self.limits.gpu) and self.requests.gpu != self.limits.gpu:
            raise ValueError("nvidia.com/gpu: requests and limits must be equal")
        return self


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SecretKey(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool = False  # a missing Secret leaves the variable unset instead of keeping the pod from starting


class KubernetesSpec(_Strict):
    """``[kubernetes]``: where and how trial Jobs run (``launcher = "kubernetes"``); see k8s/ for the cluster side.

    ``study_file_in_image`` is the study file's path inside the image (relative to its working directory);
    by default the file's path relative to the project root (the folder with ``pyproject.toml``), which the
    image copies to its working directory. The controller finds the API server at ``host``, else through
    ``kubeconfig``/``context``, else in-cluster, else in ``~/.kube/config``.
    """

    namespace: str = Field("autoresearch", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    image: str = Field(min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    study_file_in_image: str | None = None
    service_account: str | None = None
    resources: Resources = Resources()
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    queue_name: str | None = None
    # At least a minute: a Job deleted right after it ends takes its final status with it before it is read.
    ttl_s: int = Field(3600, ge=60)
    start_deadline_s: float = Field(600, gt=0)
    storage_secret: SecretKey = SecretKey(name="autoresearch-storage", key="url")
    api_key_secret: SecretKey = SecretKey(name="trainer-api-key", key="api-key")
    # More environment variables of trial pods from Secrets, e.g. HF_TOKEN for a gated model's tokenizer.
    secret_env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], SecretKey] = Field(default_factory=dict)
    kubeconfig: str | None = None
    context: str | None = None
    host: str | None = None


class StudySpec(_Strict):
    """One study file, with paths resolved against the file's folder."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str | None = None
    run_dir: Path | None = None
    # Where trial files go: gs://BUCKET, s3://BUCKET, or a folder (relative to the study file); see artifacts.py.
    artifact_store: str | None = None
    objective: str = DEFAULT_OBJECTIVE
    metric: Literal["eval_execution_accuracy"] = OBJECTIVE_METRIC
    direction: Literal["maximize"] = OBJECTIVE_DIRECTION
    space: dict[str, Param] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)
    reward_space: dict[str, RewardRange] = Field(default_factory=dict)
    dataset: DatasetSpec = DatasetSpec()
    training: TrainingSpec = TrainingSpec()
    budget: BudgetSpec = BudgetSpec()
    pruner: PrunerSpec = PrunerSpec()
    sampler: SamplerSpec = SamplerSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    launcher: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesSpec | None = None
    proposer: ProposerSpec = ProposerSpec()

    _path: Path = PrivateAttr(default=Path("study.toml"))

    @field_validator("metric", "direction", mode="before")
    @classmethod
    def _fixed_objective(cls, value: Any) -> Any:
        if value not in (OBJECTIVE_METRIC, OBJECTIVE_DIRECTION):
            raise ValueError(
                f"the objective is fixed (held-out execution accuracy, maximised); {value!r} is not allowed"
            )
        return value

    @field_validator("objective")
    @classmethod
    def _objective_path(cls, value: str) -> str:
        module, _, attr = value.partition(":")
        if not module or not attr:
            raise ValueError("must look like 'package.module:function'")
        return value

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store(cls, value: str | None) -> str | None:
        """A folder, or a bucket named alone (``gs://BUCKET``, ``s3://BUCKET``; a trailing slash is dropped)."""
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must name a folder, gs://BUCKET or s3://BUCKET")
        if value.startswith(ENV_PREFIX):
            raise ValueError("takes no env: value: name the bucket or folder itself (not a secret; every pod reads "
                             "it from its copy of the study file)")
        scheme, separator, rest = value.partition("://")
        if not separator:
            return value
        if scheme not in BUCKET_SCHEMES:
            raise ValueError(f"{value!r}: a bucket is gs://BUCKET or s3://BUCKET; a folder is a plain path")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/?", rest):
            raise ValueError(f"{value!r}: name the bucket alone; Optuna's GCS and S3 stores keep artifacts at the "
                             "bucket's root, which is where optuna-dashboard reads them")
        return f"{scheme}://{rest.rstrip('/')}"

    @field_validator("reward_space")
    @classmethod
    def _reward_bounds(cls, ranges: dict[str, RewardRange]) -> dict[str, RewardRange]:
        for name, bounds in ranges.items():
            field = RewardConfig.model_fields.get(name)
            if field is None:
                raise ValueError(f"{name!r} is not a RewardConfig weight (known: {', '.join(RewardConfig.model_fields)})")
            lo = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
            hi = next((m.le for m in field.metadata if hasattr(m, "le")), None)
            if (lo is not None and bounds.low < lo) or (hi is not None and bounds.high > hi):
                raise ValueError(f"{name}: [{bounds.low}, {bounds.high}] leaves RewardConfig's bounds [{lo}, {hi}]")
        return ranges

    @model_validator(mode="after")
    def _no_overlap(self) -> "StudySpec":
        both = set(self.space) & set(self.fixed)
        if both:
            raise ValueError(f"parameter(s) both searched and fixed: {', '.join(sorted(both))}")
        return self

    @model_validator(mode="after")
    def _kubernetes_table(self) -> "StudySpec":
        if self.launcher == "kubernetes" and self.kubernetes is None:
            raise ValueError("launcher = \"kubernetes\" needs a [kubernetes] table (at least 'image')")
        if self.launcher == "kubernetes" and (self.storage or "sqlite").startswith("sqlite"):
            raise ValueError("launcher = \"kubernetes\" needs a 'storage' database that trial pods reach "
                             "(PostgreSQL or MySQL, e.g. \"env:AUTORESEARCH_STORAGE_URL\"), not a SQLite file")
        if self.launcher == "kubernetes" and self.artifact_store is None:
            raise ValueError("launcher = \"kubernetes\" needs an 'artifact_store' that trial pods, the controller and "
                             "the dashboard share (gs://BUCKET, s3://BUCKET, or a folder on a volume every pod mounts): "
                             "the default folder inside the run folder would stay in each trial's pod")
        if self.launcher == "kubernetes" and self.training.api == "local":
            raise ValueError("launcher = \"kubernetes\": trial pods cannot reach a training API the controller starts; "
                             "set training.api to its Service URL (or 'none')")
        return self

    @property
    def path(self) -> Path:
        return self._path

    @property
    def run_folder(self) -> Path:
        """Where the study database (by default), artifacts and trial folders live."""
        folder = self.run_dir or Path("runs") / self.name
        return folder if folder.is_absolute() else (self._path.parent / folder).resolve()

    @property
    def storage_url(self) -> str:
        """The SQLAlchemy URL; ``postgresql://`` means the psycopg 3 driver this project installs."""
        url = from_env(self.storage, f"{self._path}: storage") if self.storage else f"sqlite:///{self.run_folder}/study.db"
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return url

    @property
    def artifact_dir(self) -> Path | None:
        """The folder of a filesystem artifact store (``<run folder>/artifacts`` by default); None for a bucket."""
        if self.artifact_store is None:
            return self.run_folder / "artifacts"
        if self.artifact_store.partition("://")[1]:
            return None
        folder = Path(self.artifact_store).expanduser()
        return folder if folder.is_absolute() else (self._path.parent / folder).resolve()

    def trial_dir(self, number: int) -> Path:
        return self.run_folder / "trials" / f"{number:05d}"

    def load_objective(self) -> Callable[..., Any]:
        """Import the objective function named by ``objective``."""
        module, _, attr = self.objective.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise SpecError(f"{self._path}: objective: cannot import {self.objective!r}: {error}") from None


def _location(loc: tuple[Any, ...]) -> str:
    # Pydantic inserts the union member's tag ("float", "int"...) into the path: drop it.
    parts = [str(p) for p in loc if p not in ("float", "int", "categorical")]
    return ".".join(parts) or "study"


def _resolve_data_paths(data: dict[str, Any], folder: Path) -> None:
    """Dataset paths are relative to the study file, like the run folder; ids and absolute paths stay as they are."""
    dataset = data.get("dataset")
    if not isinstance(dataset, dict):
        return
    for key in ("source", "eval_source"):
        value = dataset.get(key)
        if isinstance(value, str) and value != "synthetic" and (folder / value).exists():
            dataset[key] = str((folder / value).resolve())


def parse_spec(data: dict[str, Any], path: Path) -> StudySpec:
    """Validate a parsed TOML document; raise SpecError with every problem on one line."""
    _resolve_data_paths(data, path.parent)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{_location(issue['loc'])}: {issue['msg'].removeprefix('Value error, ')}" for issue in error.errors()
        )
        raise SpecError(f"{path}: {problems}") from None
    spec._path = path.resolve()
    if spec.objective == DEFAULT_OBJECTIVE:
        from .params import check_trial_params

        try:
            check_trial_params(spec)
        except ValueError as error:
            raise SpecError(f"{path}: {error}") from None
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate one study file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such study file") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from None
    return parse_spec(data, path)

"""Pydantic models of the SDK's JSON request bodies.

They ignore fields they do not know (newer SDKs add some) but type-check the rest,
so a wrong type is a 400 that names the field instead of a failure deep inside.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import AdamStep


class _Body(BaseModel):
    """Request bodies ignore fields they do not know (newer SDKs add some) but type-check the rest."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ClientConfigBody(_Body):
    sdk_version: str | None = None


class CreateSessionBody(_Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionBody(_Body):
    session_id: str


class LoraBody(_Body):
    rank: int = Field(ge=1)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfigBody(_Body):
    type: str = "adamw"


class CreateModelBody(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraBody | None = None
    optimizer_config: OptimizerConfigBody = OptimizerConfigBody()


class ModelBody(_Body):
    model_id: str


class OptimStepBody(_Body):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamStep | None = None  # pydantic type-checks the engine's dataclass; unknown keys are ignored
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsBody(_Body):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)


class SaveExternalBody(_Body):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)
    age_encryption_recipients: list[str] | None = None


class TtlBody(_Body):
    ttl_seconds: int | None = Field(ge=1)


class SaveForSamplerBody(SaveWeightsBody):
    sampling_session_seq_id: int | None = None


class LoadWeightsBody(_Body):
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool = False


class CreateSamplingSessionBody(_Body):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class SamplingParamsBody(_Body):
    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[int] | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class ChunkBody(_Body):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]


class ModelInputBody(_Body):
    chunks: list[ChunkBody]

    def tokens(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]


class SampleBody(_Body):
    num_samples: int = 1
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None

    @field_validator("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")
    @classmethod
    def _unsupported(cls, value: int) -> int:
        if value:
            raise ValueError("top-k logprobs and prompt_alt_tokens are not supported by this service")
        return value


class RetrieveBody(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(_Body):
    tinker_path: str

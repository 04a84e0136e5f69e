"""Pydantic models of the SDK's JSON request bodies.

They ignore fields they do not know (newer SDKs add some) but type-check the rest,
so a wrong type is a 400 that names the field instead of a failure deep inside.
Python's JSON parser accepts ``NaN`` and ``Infinity``; no float field here does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from .losses import check_supported
from .optim import AdamStep

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""Ids and counters: a JSON integer the engine, torch and numpy can hold (2**70 is a 400, not an overflow)."""
MAX_TTL_SECONDS = 100 * 365 * 86400
"""100 years: a longer TTL would overflow the expiry timestamp and break every listing of the run."""
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
"""Counts the SDK's wire format holds in 32 bits: 2**70 is a 400 naming the field, not an overflow further in."""
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
"""A token id: non-negative and within int32, the SDK's wire type (the engine checks the vocabulary)."""


class _Body(BaseModel):
    """Request bodies ignore fields they do not know (newer SDKs add some) but type-check the rest.

    ``allow_inf_nan=False`` refuses NaN and infinities in every float field, nested ones and
    free-form metadata (``JsonValue``) included, so none can be stored and later fail to encode.
    """

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


class ClientConfigBody(_Body):
    sdk_version: str | None = None


class CreateSessionBody(_Body):
    tags: list[str] = []
    user_metadata: dict[str, JsonValue] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionBody(_Body):
    session_id: str


class LoraBody(_Body):
    rank: int = Field(ge=1)
    seed: Int64 | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfigBody(_Body):
    type: str = "adamw"


class CreateModelBody(_Body):
    session_id: str
    model_seq_id: Int64
    base_model: str
    user_metadata: dict[str, JsonValue] | None = None
    lora_config: LoraBody | None = None
    optimizer_config: OptimizerConfigBody = OptimizerConfigBody()


class ModelBody(_Body):
    model_id: str


class OptimStepBody(_Body):
    model_id: str
    seq_id: Int64 | None = None
    adam_params: AdamStep | None = None  # pydantic type-checks the engine's dataclass; unknown keys are ignored
    optimizer_params: dict[str, JsonValue] | None = None


class SaveWeightsBody(_Body):
    model_id: str
    path: str | None = None
    seq_id: Int64 | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_TTL_SECONDS)


class SaveExternalBody(_Body):
    model_id: str
    path: str
    seq_id: Int64 | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_TTL_SECONDS)
    age_encryption_recipients: list[str] | None = None


class TtlBody(_Body):
    ttl_seconds: int | None = Field(ge=1, le=MAX_TTL_SECONDS)


class SaveForSamplerBody(SaveWeightsBody):
    sampling_session_seq_id: Int64 | None = None


class LoadWeightsBody(_Body):
    model_id: str | None = None
    seq_id: Int64 | None = None
    session_id: str | None = None
    model_seq_id: Int64 | None = None
    base_model: str | None = None
    user_metadata: dict[str, JsonValue] | None = None
    path: str
    optimizer: bool = False


class CreateSamplingSessionBody(_Body):
    session_id: str
    sampling_session_seq_id: Int64
    base_model: str | None = None
    model_path: str | None = None


class SamplingParamsBody(_Body):
    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[TokenId] | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_k: int = Field(default=-1, ge=-1, le=2**31 - 1)
    """-1 (or 0) for no limit."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class ChunkBody(_Body):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[TokenId]


class ModelInputBody(_Body):
    chunks: list[ChunkBody]

    def tokens(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]


class SampleBody(_Body):
    num_samples: Int32 = 1
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: Int64 | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Int32 = 0
    topk_sample_logprobs: Int32 = 0
    prompt_alt_tokens_k: Int32 = 0
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1, le=2**31 - 1)
    record_stability_info: bool | None = None

    @field_validator("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")
    @classmethod
    def _unsupported(cls, value: int) -> int:
        if value:
            raise ValueError("top-k logprobs and prompt_alt_tokens are not supported by this service")
        return value

    @field_validator("record_stability_info")
    @classmethod
    def _no_stability_info(cls, value: bool | None) -> bool | None:
        """Only ``stable_reinforce`` uses it: refusing the first sample saves a caller a batch of rollouts
        that its first training step would then refuse (the SDK sends the loss no earlier)."""
        if value:
            check_supported("stable_reinforce")
        return value


class RetrieveBody(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(_Body):
    tinker_path: str

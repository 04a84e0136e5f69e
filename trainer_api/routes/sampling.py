"""Sampling: sessions over the base model or the caller's own checkpoints, and sample requests."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request

from ..bodies import LimitedBodyRoute, json_object
from ..engine import BASE_SNAPSHOT, Engine
from ..exceptions import UserError
from ..sampling import SampleTask, SamplingSpec
from ..schemas import CreateSamplingSessionBody, SampleBody, SamplingParamsBody
from .deps import Owned

router = APIRouter(route_class=LimitedBodyRoute)


def sampling_spec(engine: Engine, params: SamplingParamsBody, prompt_len: int) -> SamplingSpec:
    """Map the SDK's SamplingParams: ``stop=None`` means EOS, ``[]`` means no stop at all."""
    stop = params.stop
    if stop is None:
        stop_ids, stop_strings = engine.eos_ids, ()
    elif isinstance(stop, str):
        stop_ids, stop_strings = frozenset(), (stop,)
    elif all(isinstance(s, int) for s in stop):
        stop_ids, stop_strings = frozenset(stop), ()
    else:
        stop_ids, stop_strings = frozenset(), tuple(stop)
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = min(engine.limits.max_sample_tokens, engine.max_seq_len - prompt_len)
    if max_tokens > engine.limits.max_sample_tokens:
        raise UserError(f"max_tokens {max_tokens} exceeds this service's limit of {engine.limits.max_sample_tokens}")
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_token_ids=stop_ids,
        stop_strings=stop_strings,
    )


@router.post("/api/v1/create_sampling_session")
def create_sampling_session(body: CreateSamplingSessionBody, view: Owned) -> dict[str, Any]:
    session = view.live_session(body.session_id)
    if body.model_path is None:
        if body.base_model is None:
            raise UserError("create_sampling_session needs model_path or base_model")
        view.engine.check_base_model(body.base_model)
        key = BASE_SNAPSHOT
    else:
        key = view.checkpoint(body.model_path).tinker_path
    view.engine.snapshot(key)  # fail now, not at the first sample, if the checkpoint is missing
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    view.open_sampler(session, sampler_id, key, body.model_path)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.post("/api/v1/join_sampling_session")
async def join_sampling_session(request: Request, view: Owned) -> dict[str, Any]:
    sampler = view.sampler(str((await json_object(request)).get("sampling_session_id")))
    counter = sampler.clients
    sampler.clients += 1
    return {"type": "join_sampling_session", "client_counter": counter}


@router.get("/api/v1/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, view: Owned) -> dict[str, Any]:
    sampler = view.sampler(sampler_id)
    return {"sampler_id": sampler_id, "base_model": view.service.model_name, "model_path": sampler.model_path}


@router.post("/api/v1/asample")
def asample(body: SampleBody, view: Owned) -> dict[str, Any]:
    """A plain ``def``: the weights may have to be read from a checkpoint first."""
    engine = view.engine
    if body.sampling_session_id is not None:
        snapshot = engine.snapshot(view.sampler(body.sampling_session_id).snapshot_key)
    elif body.model_path is not None:
        snapshot = engine.snapshot(view.checkpoint(body.model_path).tinker_path)
    else:
        engine.check_base_model(body.base_model or view.service.model_name)
        snapshot = engine.snapshot(BASE_SNAPSHOT)
    prompt = body.prompt.tokens()
    spec = sampling_spec(engine, body.sampling_params, len(prompt))
    future = engine.sample(snapshot, SampleTask(tuple(prompt), body.num_samples, spec, bool(body.prompt_logprobs)))
    sequence_ids = [f"seq-{uuid.uuid4().hex[:12]}" for _ in range(body.num_samples)]
    return view.submit(future, lambda out: out, "sample", sample_sequence_ids=sequence_ids)

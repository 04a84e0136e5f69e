"""Saving and loading weights: the caller saves only its own adapters, into its own runs, and loads only
its own checkpoints, into its own adapters."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from ..bodies import LimitedBodyRoute
from ..exceptions import UserError
from ..schemas import (
    LoadWeightsBody,
    SaveExternalBody,
    SaveForSamplerBody,
    SaveWeightsBody,
    WeightsInfoBody,
)
from .deps import Owned
from .models import run_id

router = APIRouter(route_class=LimitedBodyRoute)


@router.post("/api/v1/save_weights")
async def save_weights(body: SaveWeightsBody, view: Owned) -> dict[str, Any]:
    model = view.model(body.model_id)
    name = body.path or f"step-{model.steps:06d}-{uuid.uuid4().hex[:6]}"
    future = view.engine.save_state(body.model_id, name, body.overwrite, body.user_metadata, body.ttl_seconds)
    return view.submit(future, lambda p: {"type": "save_weights", "path": p}, "save_weights", model_id=body.model_id)


@router.post("/api/v1/save_weights_for_sampler")
async def save_weights_for_sampler(body: SaveForSamplerBody, view: Owned) -> dict[str, Any]:
    model = view.model(body.model_id)
    if body.path is None and body.sampling_session_seq_id is None:
        raise UserError("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
    future = view.engine.save_for_sampler(body.model_id, body.path, body.user_metadata, body.ttl_seconds)
    sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}" if body.path is None else None

    def encode(key: str) -> dict[str, Any]:
        if sampler_id is not None and sampler_id not in view.service.samplers:
            view.open_sampler(view.session(model.session_id), sampler_id, key, None)
        path = key if key.startswith("tinker://") else None
        return {"type": "save_weights_for_sampler", "path": path, "sampling_session_id": sampler_id}

    return view.submit(future, encode, "save_weights_for_sampler", model_id=body.model_id)


@router.post("/api/v1/save_weights_external")
async def save_weights_external(body: SaveExternalBody, view: Owned) -> dict[str, Any]:
    if body.age_encryption_recipients:
        raise UserError("age encryption of exported weights is not implemented by this service")
    view.model(body.model_id)
    future = view.engine.save_external(body.model_id, body.path, body.ttl_seconds)
    return view.submit(
        future, lambda out: {"type": "save_weights_external", "path": out[0], "size_bytes": out[1]},
        "save_weights_external", model_id=body.model_id,
    )


@router.post("/api/v1/load_weights")
def load_weights(body: LoadWeightsBody, view: Owned) -> dict[str, Any]:
    """Into a new adapter of the caller's session, or into one of the caller's loaded adapters."""
    view.checkpoint(body.path)
    if body.session_id is not None:
        if body.model_seq_id is None:
            raise UserError("load_weights with session_id also needs model_seq_id")
        session = view.live_session(body.session_id)
        view.engine.check_base_model(body.base_model)
        model_id = run_id(body.session_id, body.model_seq_id)
        with view.new_run():
            future = view.engine.load_state(
                model_id, body.path, body.optimizer, create=(body.session_id, body.user_metadata or {})
            )
            view.claim_run(session, model_id)
    elif body.model_id is not None:
        model_id = body.model_id
        view.model(model_id)
        future = view.engine.load_state(model_id, body.path, body.optimizer)
    else:
        raise UserError("load_weights needs either model_id or session_id and model_seq_id")
    return view.submit(
        future, lambda p: {"type": "load_weights", "path": p, "model_id": model_id}, "load_weights", model_id=model_id
    )


@router.post("/api/v1/weights_info")
def weights_info(body: WeightsInfoBody, view: Owned) -> dict[str, Any]:
    loaded = view.engine.store.load(view.checkpoint(body.tinker_path), with_optimizer=False)
    lora = loaded.meta["lora"]
    return {
        "base_model": loaded.meta["base_model"], "optimizer_config": {"type": "adamw"}, "is_lora": True,
        "lora_rank": lora["rank"], "train_unembed": lora["train_unembed"],
        "train_mlp": lora["train_mlp"], "train_attn": lora["train_attn"],
    }

"""Saving and loading weights: the caller saves only its own adapters, into its own runs, and loads only
its own checkpoints, into its own adapters."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from ..bodies import LimitedBodyRoute
from ..checkpoints import age_recipients, checkpoint_ref
from ..exceptions import UserError
from ..ownership import LiveModel, TenantView
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


def refuse_over_quota(view: TenantView, model: LiveModel, kind: str, name: str, overwrite: bool) -> None:
    """Answer a save the caller's quota cannot take with a 413 on the request itself, before it is queued.

    The adapter's tensors are a lower bound on what any save of it writes (its optimizer state and
    metadata come on top), so this never refuses a save that would fit; the store checks again with the
    exact size when it writes, since other saves may land in between. An adapter still being built has
    no tensors yet, and then only the count is checked here.
    """
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.params)
    view.engine.store.check_quota(checkpoint_ref(model.model_id, kind, name), adapter_bytes, overwrite)


@router.post("/api/v1/save_weights")
def save_weights(body: SaveWeightsBody, view: Owned) -> dict[str, Any]:
    """Plain ``def``: the quota check reads storage, so FastAPI runs it off the event loop."""
    model = view.model(body.model_id)
    name = body.path or f"step-{model.steps:06d}-{uuid.uuid4().hex[:6]}"
    refuse_over_quota(view, model, "weights", name, body.overwrite)
    future = view.engine.save_state(body.model_id, name, body.overwrite, body.user_metadata, body.ttl_seconds)
    return view.submit(future, lambda p: {"type": "save_weights", "path": p}, "save_weights", model_id=body.model_id)


@router.post("/api/v1/save_weights_for_sampler")
def save_weights_for_sampler(body: SaveForSamplerBody, view: Owned) -> dict[str, Any]:
    """A named snapshot is written to disk (and replaces one of that name), so it passes the quota check."""
    model = view.model(body.model_id)
    if body.path is None and body.sampling_session_seq_id is None:
        raise UserError("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
    if body.path is not None:
        refuse_over_quota(view, model, "sampler_weights", body.path, overwrite=True)
    future = view.engine.save_for_sampler(body.model_id, body.path, body.user_metadata, body.ttl_seconds)
    sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}" if body.path is None else None

    def encode(key: str) -> dict[str, Any]:
        if sampler_id is not None and sampler_id not in view.service.samplers:
            view.open_sampler(view.session(model.session_id), sampler_id, key, None)
        path = key if key.startswith("tinker://") else None
        return {"type": "save_weights_for_sampler", "path": path, "sampling_session_id": sampler_id}

    return view.submit(future, encode, "save_weights_for_sampler", model_id=body.model_id)


@router.post("/api/v1/save_weights_external")
def save_weights_external(body: SaveExternalBody, view: Owned) -> dict[str, Any]:
    """A PEFT directory; with ``age_encryption_recipients``, every file encrypted to them as ``<file>.age``."""
    model = view.model(body.model_id)
    recipients = age_recipients(body.age_encryption_recipients or [])
    refuse_over_quota(view, model, "external_weights", body.path, overwrite=False)
    future = view.engine.save_external(body.model_id, body.path, body.ttl_seconds, recipients)
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

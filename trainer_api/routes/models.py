"""Training runs as live adapters: create one in the caller's session, describe it, unload it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..bodies import LimitedBodyRoute
from ..engine import LoraSpec
from ..exceptions import UserError
from ..schemas import CreateModelBody, LoraBody, ModelBody
from .deps import Owned

router = APIRouter(route_class=LimitedBodyRoute)


def run_id(session_id: str, model_seq_id: int) -> str:
    """The SDK numbers the models of a session; the run id makes that number unique across sessions."""
    return f"{session_id}:train:{model_seq_id}"


@router.post("/api/v1/create_model")
def create_model(body: CreateModelBody, view: Owned) -> dict[str, Any]:
    """A plain ``def`` (run in the thread pool): claiming the run writes its owner record to storage."""
    session = view.live_session(body.session_id)
    view.engine.check_base_model(body.base_model)
    if body.optimizer_config.type != "adamw":
        raise UserError(f"optimizer {body.optimizer_config.type!r} is not supported; only 'adamw'")
    lora = body.lora_config or LoraBody(rank=32)
    model_id = run_id(body.session_id, body.model_seq_id)
    with view.new_run():
        future = view.engine.create_model(
            model_id, body.session_id,
            LoraSpec(lora.rank, lora.seed, lora.train_mlp, lora.train_attn, lora.train_unembed),
            body.user_metadata or {},
        )
        view.claim_run(session, model_id)
    return view.submit(future, lambda mid: {"type": "create_model", "model_id": mid}, "create_model", model_id=model_id)


@router.post("/api/v1/get_info")
async def get_info(body: ModelBody, view: Owned) -> dict[str, Any]:
    model = view.model(body.model_id)
    name = view.service.model_name
    return {
        "type": "get_info",
        "model_data": {"arch": view.engine.arch, "model_name": name, "tokenizer_id": name},
        "model_id": model.model_id,
        "optimizer_config": {"type": "adamw"},
        "is_lora": True,
        "lora_rank": model.lora.rank,
        "model_name": name,
    }


@router.post("/api/v1/unload_model")
async def unload_model(body: ModelBody, view: Owned) -> dict[str, Any]:
    view.model(body.model_id)
    future = view.engine.unload(body.model_id)
    return view.submit(future, lambda mid: {"type": "unload_model", "model_id": mid}, "unload_model", model_id=body.model_id)

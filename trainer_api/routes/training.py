"""Training steps on the caller's own adapters: forward, forward_backward and optim_step."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .. import wire
from ..bodies import LimitedBodyRoute, decoded_body, parse_json_object
from ..exceptions import UserError
from ..optim import AdamStep
from ..ownership import TenantView
from ..schemas import OptimStepBody
from .deps import Owned

router = APIRouter(route_class=LimitedBodyRoute)


async def _forward_backward(request: Request, view: TenantView, forward_only: bool | None) -> dict[str, Any]:
    """Protobuf (the current SDK) or JSON (older SDKs) in; the model must be the caller's."""
    body = await decoded_body(request)
    if wire.PROTO_CONTENT_TYPE in request.headers.get("content-type", ""):
        req = wire.decode_forward_backward_proto(body, forward_only)
    else:
        req = wire.decode_forward_backward_json(parse_json_object(body), bool(forward_only))
    view.model(req.model_id)
    future = view.engine.forward_backward(req)
    return view.submit(future, lambda out: out, "forward_backward", model_id=req.model_id)


@router.post("/api/v1/forward_backward")
async def forward_backward(request: Request, view: Owned) -> dict[str, Any]:
    return await _forward_backward(request, view, None)


@router.post("/api/v1/forward")
async def forward(request: Request, view: Owned) -> dict[str, Any]:
    return await _forward_backward(request, view, True)


@router.post("/api/v1/optim_step")
async def optim_step(body: OptimStepBody, view: Owned) -> dict[str, Any]:
    if body.optimizer_params is not None:
        raise UserError(f"optimizer {body.optimizer_params.get('type')!r} is not supported; send adam_params")
    view.model(body.model_id)
    future = view.engine.optim_step(body.model_id, body.adam_params or AdamStep())
    return view.submit(future, lambda m: {"metrics": m}, "optim_step", model_id=body.model_id)

"""Routes about the server itself: health, client configuration, capabilities, telemetry and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .. import metrics
from ..bodies import LimitedBodyRoute, max_body_bytes
from ..schemas import ClientConfigBody
from .deps import Owned, ServiceDep

HEALTH_PATH = "/api/v1/healthz"
"""The one route that answers without a key (probes cannot send one)."""

router = APIRouter(route_class=LimitedBodyRoute)


@router.get(HEALTH_PATH)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/api/v1/client/config")
async def client_config(body: ClientConfigBody, request: Request, service: ServiceDep) -> dict[str, Any]:
    return {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "parallel_fwdbwd_chunks": False,
        "proto_compress_fwdbwd": False,
        "fwdbwd_max_chunk_len": service.engine.limits.max_batch_datums,
        # The SDK splits forward_backward batches into bodies of at most this many bytes (its default 5 MB).
        "fwdbwd_max_chunk_bytes_count": min(5_000_000, max_body_bytes(request) // 2),
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": True,
        "use_pyqwest_transport": False,
    }


@router.post("/api/v1/client/dynamic_config")
async def client_dynamic_config(body: ClientConfigBody) -> dict[str, Any]:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": True}


@router.get("/api/v1/get_server_capabilities")
async def capabilities(service: ServiceDep) -> dict[str, Any]:
    return {
        "supported_models": [
            {"model_name": service.model_name, "max_context_length": service.engine.max_seq_len,
             "trainable": True, "sampleable": True}
        ]
    }


@router.post("/api/v1/telemetry")
async def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


@router.get("/metrics")
async def prometheus(view: Owned) -> PlainTextResponse:
    """Service-wide gauges and counters, plus per-run series for the caller's own runs only (it needs a key)."""
    service = view.service
    return PlainTextResponse(
        metrics.render(service.engine, service.requests, service.futures.pending(), service.active_sessions(),
                       view.live_models()),
        media_type="text/plain; version=0.0.4",
    )

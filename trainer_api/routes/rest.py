"""The REST client's routes: the caller's training runs, their checkpoints, TTLs, exports and storage use.

Plain ``def`` routes: they read run records and checkpoint listings from storage,
which FastAPI runs in its thread pool, away from the event loop that answers polls.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from ..bodies import LimitedBodyRoute
from ..checkpoints import iso
from ..schemas import TtlBody
from .deps import Owned

router = APIRouter(route_class=LimitedBodyRoute)


def _page(items: list[Any], offset: int, limit: int) -> dict[str, Any]:
    return {"offset": offset, "limit": limit, "total_count": len(items)}


@router.get("/api/v1/training_runs")
def list_training_runs(view: Owned, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    runs = view.runs()
    return {"training_runs": [view.describe_run(r) for r in runs[offset : offset + limit]],
            "cursor": _page(runs, offset, limit)}


@router.get("/api/v1/training_runs/{model_id}")
def get_training_run(model_id: str, view: Owned) -> dict[str, Any]:
    return view.describe_run(view.run(model_id))


@router.get("/api/v1/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: str, view: Owned) -> dict[str, Any]:
    view.run(model_id)
    return {"checkpoints": view.engine.store.list(model_id)}


@router.get("/api/v1/training_runs/{model_id}/device_usage")
def device_usage(model_id: str, view: Owned) -> dict[str, Any]:
    """Not in Tinker: what a training run cost on the device, for a study to record next to its result."""
    view.run(model_id)
    engine = view.engine
    return {"training_run_id": model_id, "device": engine.device.type, "device_seconds": engine.device_seconds(model_id)}


@router.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(model_id: str, kind: str, name: str, view: Owned) -> dict[str, Any]:
    view.engine.store.delete(view.checkpoint_at(model_id, kind, name))
    return {}


@router.put("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
def set_checkpoint_ttl(model_id: str, kind: str, name: str, body: TtlBody, view: Owned) -> dict[str, Any]:
    view.engine.store.set_ttl(view.checkpoint_at(model_id, kind, name), body.ttl_seconds)
    return {}


@router.get("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(model_id: str, kind: str, name: str, view: Owned) -> dict[str, Any]:
    """URLs in the checkpoint root's own scheme (file:// for a local root); nothing is signed."""
    return {"urls": view.engine.store.files(view.checkpoint_at(model_id, kind, name)),
            "expires": iso(time.time() + 7 * 24 * 3600)}


@router.get("/api/v1/billing/usage/checkpoints/current")
def checkpoint_storage_usage(view: Owned) -> dict[str, Any]:
    """The caller's own checkpoints: their number and bytes."""
    checkpoints = view.checkpoints()
    size = sum(c["size_bytes"] for c in checkpoints)
    return {"effective_rate_usd_per_gigabyte_month": None,
            "data": [{"checkpoint_count": len(checkpoints), "size_bytes": size, "size_gigabytes": size / 1e9}]}


@router.get("/api/v1/checkpoints")
def list_user_checkpoints(view: Owned, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    everything = view.checkpoints()
    return {"checkpoints": everything[offset : offset + limit], "cursor": _page(everything, offset, limit)}

"""Results of queued work: long-polled ``retrieve_future`` and ``cancel_future``, for the caller's requests only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import wire
from ..bodies import LimitedBodyRoute
from ..errors import failure_payload
from ..futures import FutureStore
from ..schemas import RetrieveBody
from .deps import Owned

POLL_SECONDS = 20.0
"""How long retrieve_future holds a request open; well under the SDK's 45 s read timeout."""

router = APIRouter(route_class=LimitedBodyRoute)


@router.post("/api/v1/retrieve_future", response_model=None)
async def retrieve_future(body: RetrieveBody, request: Request, view: Owned) -> dict[str, Any] | Response:
    entry = view.future(body.request_id)
    if not await FutureStore.wait(entry, POLL_SECONDS):
        return {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
    FutureStore.mark_delivered(entry)
    if entry.future.cancelled():
        return {"error": "the request was cancelled", "category": "user"}
    exc = entry.future.exception()
    if exc is not None:
        return failure_payload(exc)
    result = entry.encode(entry.future.result())
    want_proto = wire.PROTO_CONTENT_TYPE in request.headers.get("accept", "")
    if isinstance(result, wire.ForwardBackwardOut):
        if want_proto:
            return Response(wire.encode_forward_backward_proto(result), media_type=wire.PROTO_CONTENT_TYPE)
        return wire.encode_forward_backward_json(result)
    if isinstance(result, wire.SampleOut):
        if want_proto:
            return Response(wire.encode_sample_proto(result), media_type=wire.PROTO_CONTENT_TYPE)
        return wire.encode_sample_json(result)
    return result


@router.post("/api/v1/cancel_future")
async def cancel_future(body: RetrieveBody, view: Owned) -> dict[str, Any]:
    view.cancel(body.request_id)
    return {}

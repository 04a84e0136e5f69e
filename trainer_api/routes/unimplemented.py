"""The catch-all: SDK endpoints this service does not implement answer 404 with the reason."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..bodies import LimitedBodyRoute
from ..errors import error_response

_UNIMPLEMENTED: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"/copy_weights$"), "there are no projects to copy between"),
    (re.compile(r"/sessions/[^/]+/project$|/audit|/billing/"), "a self-hosted service has no projects, billing or audit log"),
    (re.compile(r"/trace_export$"), "session traces are not recorded"),
    (re.compile(r"/sessions/search$"), "session search is not implemented; list_sessions and get_session are"),
    (re.compile(r"/publish$"), "there is no public checkpoint sharing; checkpoints are private to the API key that made them"),
    (re.compile(r"/create_custom_loss$"), "custom losses run client-side (client config custom_loss_server_side is false)"),
    (re.compile(r"/retrieve_futures$"), "sampling results are polled per request (sample_use_retrieve_futures is false)"),
    (re.compile(r"/auth/token$|/whoami$"), "JWT authentication is not implemented; send X-API-Key"),
]
"""SDK endpoints this service does not implement, and why (said in the 404's message)."""

router = APIRouter(route_class=LimitedBodyRoute)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def not_implemented(path: str, request: Request) -> JSONResponse:
    for pattern, reason in _UNIMPLEMENTED:
        if pattern.search("/" + path):
            return error_response(404, f"{request.method} /{path} is not implemented by trainer_api: {reason}")
    return error_response(404, f"no such endpoint: {request.method} /{path}")

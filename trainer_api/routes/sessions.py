"""SDK sessions: create, heartbeat, finish, get and list, each only on the caller's own sessions."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..bodies import LimitedBodyRoute, json_object
from ..errors import error_response
from ..schemas import CreateSessionBody, SessionBody
from .deps import Owned

log = logging.getLogger("trainer_api.app")

router = APIRouter(route_class=LimitedBodyRoute)


@router.post("/api/v1/create_session")
async def create_session(body: CreateSessionBody, view: Owned) -> dict[str, str]:
    session = view.create_session(body.user_metadata, body.display_name)
    log.info("session created", extra={"session_id": session.session_id, "tenant": view.tenant.name,
                                       "sdk_version": body.sdk_version})
    return {"type": "create_session", "session_id": session.session_id}


@router.post("/api/v1/session_heartbeat", response_model=None)
async def heartbeat(body: SessionBody, view: Owned) -> dict[str, str] | JSONResponse:
    session = view.session(body.session_id)
    if session.finished is not None:
        # 410 tells the SDK to stop its heartbeat loop.
        return error_response(410, f"session {body.session_id} has finished ({session.finished})")
    session.last_heartbeat = time.time()
    return {"type": "session_heartbeat"}


@router.post("/api/v1/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request, view: Owned) -> dict[str, Any]:
    session = view.session(session_id)
    reason = (await json_object(request)).get("reason")
    view.service.finish_session(session, str(reason.get("type", "success") if isinstance(reason, dict) else "success"))
    return {}


@router.get("/api/v1/sessions/{session_id}")
async def get_session(session_id: str, view: Owned) -> dict[str, Any]:
    s = view.session(session_id)
    return {
        "training_run_ids": s.training_run_ids,
        "sampler_ids": s.sampler_ids,
        "user_metadata": {k: str(v) for k, v in (s.user_metadata or {}).items()},
        "display_name": s.display_name,
    }


@router.get("/api/v1/sessions")
async def list_sessions(view: Owned, limit: int = 20, offset: int = 0) -> dict[str, list[str]]:
    return {"sessions": [s.session_id for s in view.sessions()][offset : offset + limit]}

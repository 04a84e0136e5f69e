"""Every failure as the SDK expects it: ``{"error", "category"}`` with the right HTTP status.

One mapping from exception to (status, category, message) serves the exception
handlers (a request that fails at once) and ``retrieve_future`` (queued work that
failed later), so a caller sees the same answer either way.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import wire
from .checkpoints import CheckpointError, CheckpointNotFound
from .exceptions import ServiceError
from .losses import LossConfigError

log = logging.getLogger("trainer_api.app")


def error_response(status: int, message: str, category: str = "user") -> JSONResponse:
    """The SDK reads ``error`` and ``category``; ``detail`` is what FastAPI clients expect."""
    return JSONResponse({"error": message, "category": category, "detail": message}, status_code=status)


def classify(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, SDK error category and message for an exception, in one place."""
    if isinstance(exc, ServiceError):
        return exc.status_code, exc.category, str(exc)
    if isinstance(exc, CheckpointNotFound):
        return 404, "user", str(exc)
    if isinstance(exc, (CheckpointError, LossConfigError, wire.WireError)):
        return 400, "user", str(exc)
    return 500, "server", f"internal error: {type(exc).__name__}: {exc}"[:500]


def failure_payload(exc: BaseException) -> dict[str, str]:
    """The body retrieve_future returns for a request that failed."""
    _, category, message = classify(exc)
    return {"error": message, "category": category}


def _field(loc: tuple) -> str:
    """``a.b.0.c``; a path deeper than 8 keeps its first 8 parts (a deeply nested body would fill the message)."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts[:8]) + (f"... ({len(parts)} levels deep)" if len(parts) > 8 else "") or "body"


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    problems = "; ".join(f"{_field(err['loc'])}: {err['msg']}" for err in errors[:10])
    if len(errors) > 10:
        problems += f"; and {len(errors) - 10} more"
    return error_response(400, f"invalid request body: {problems}")


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (a body that is not JSON, 405, ...) in the SDK's shape, with a clearer message."""
    message = str(exc.detail)
    if isinstance(exc.__cause__, RecursionError):
        message = "the JSON body is nested too deeply"
    elif exc.__cause__ is not None and exc.status_code == 400:
        message = f"{message}: {type(exc.__cause__).__name__}: {exc.__cause__}"[:500]
    response = error_response(exc.status_code, message, "user" if exc.status_code < 500 else "server")
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _on_known_error(request: Request, exc: Exception) -> JSONResponse:
    status, category, message = classify(exc)
    return error_response(status, message, category)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug is still a JSON body the SDK can read; the traceback goes to the log (Starlette re-raises
    the exception after this answer, and uvicorn logs it), never into the body."""
    log.error("unexpected error", extra={"path": request.url.path, "error": type(exc).__name__})
    return await _on_known_error(request, exc)


def install_handlers(app: FastAPI) -> None:
    """A wrong field is a 400 naming it; the service's own errors keep their status and category; anything
    else is a JSON 500."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    for known in (ServiceError, CheckpointError, LossConfigError, wire.WireError):
        app.add_exception_handler(known, _on_known_error)
    app.add_exception_handler(Exception, _on_unexpected_error)

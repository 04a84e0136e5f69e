"""The FastAPI app that makes this service a drop-in server for the tinker SDK (0.38).

The routes live in ``routes/``, one router per resource; this module assembles
them with what every request shares: authentication (each API key a tenant), the
request log and counters, the ``{"error", "category"}`` error handlers, and the
reaper that finishes sessions whose client went silent and forgets old finished ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .errors import error_response, install_handlers
from .ownership import RunCaps
from .routes import ROUTERS
from .routes.server import HEALTH_PATH
from .service import Service
from .tenants import Keyring, Unauthorized

log = logging.getLogger("trainer_api.app")

SESSION_RETENTION_SECONDS = 3600.0
"""How long a finished session, and its samplers, stay known after its last heartbeat (then 404)."""
MAX_SWEEP_INTERVAL_SECONDS = 30.0


def forget_finished_sessions(service: Service, retention: float, now: float | None = None) -> list[str]:
    """Drop sessions finished and silent for ``retention`` seconds, with their samplers and the unnamed
    weights only those samplers served, so that a long-lived service does not keep every session it ever
    saw; their checkpoints stay on disk."""
    cutoff = (now if now is not None else time.time()) - retention
    gone = [s for s in list(service.sessions.values()) if s.finished is not None and s.last_heartbeat < cutoff]
    unreachable: set[str] = set()
    for session in gone:
        del service.sessions[session.session_id]
        for sampler_id in session.sampler_ids:
            sampler = service.samplers.pop(sampler_id, None)
            if sampler is not None:
                unreachable.add(sampler.snapshot_key)
    unreachable -= {sampler.snapshot_key for sampler in service.samplers.values()}
    if unreachable:
        service.engine.forget_snapshots(unreachable)
    return [s.session_id for s in gone]


def sweep(service: Service, session_timeout: float | None, retention: float, now: float | None = None) -> None:
    """One pass of the reaper: finish silent sessions, forget old finished ones, expire old results.

    Results also expire when new work is queued; sweeping here frees them on an idle service too.
    """
    if session_timeout:
        service.reap_expired(session_timeout, now)
    forgotten = forget_finished_sessions(service, retention, now)
    if forgotten:
        log.info("finished sessions forgotten", extra={"sessions": len(forgotten)})
    service.futures.expire()


def create_app(
    service: Service,
    keyring: Keyring,
    session_timeout: float | None = 300.0,
    docs: bool = False,
    run_caps: RunCaps | None = None,
    session_retention: float = SESSION_RETENTION_SECONDS,
) -> FastAPI:
    """Build the FastAPI app; all state lives in ``service``, the API keys in ``keyring`` (empty: open).

    Sessions silent for ``session_timeout`` seconds (the SDK sends a heartbeat every
    10 s) are finished and their adapters unloaded; finished ones are forgotten
    ``session_retention`` seconds after their last heartbeat. ``run_caps`` bounds the
    training runs loaded at once, per key and in all (default: ``RunCaps()``). ``docs`` serves
    ``/docs`` and ``/openapi.json`` (without a key); they are off by default, since a
    shared service need not describe itself to everyone who can reach it.
    """
    interval = min([MAX_SWEEP_INTERVAL_SECONDS, session_retention / 4] + ([session_timeout / 4] if session_timeout else []))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(interval)
                sweep(service, session_timeout, session_retention)

        reaper = asyncio.create_task(sweep_forever())
        yield
        reaper.cancel()

    app = FastAPI(
        title="trainer_api", version="0.1.0", lifespan=lifespan,
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
    )
    app.state.service = service
    app.state.run_caps = run_caps or RunCaps()
    public = {HEALTH_PATH} | ({"/docs", "/docs/oauth2-redirect", "/openapi.json"} if docs else set())

    @app.middleware("http")
    async def authenticate_and_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Authenticate before anything reads the body, so a caller without a key costs almost nothing."""
        start = time.perf_counter()
        tenant = None
        if request.url.path in public:
            response = await call_next(request)
        else:
            try:
                tenant = request.state.tenant = keyring.authenticate(request.headers.get("x-api-key"))
            except Unauthorized as exc:
                response = error_response(exc.status_code, str(exc), exc.category)
            else:
                response = await call_next(request)
        route = request.scope.get("route")
        service.requests[(getattr(route, "path", "unmatched"), response.status_code)] += 1
        log.info(
            "request",
            extra={"method": request.method, "path": request.url.path, "status": response.status_code,
                   "tenant": tenant.name if tenant else None, "ms": round((time.perf_counter() - start) * 1000, 2)},
        )
        return response

    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app

"""The FastAPI app that makes this service a drop-in server for the tinker SDK (0.38).

The routes live in ``routes/``, one router per resource; this module assembles
them with what every request shares: authentication (each API key a tenant), the
request log and counters, the ``{"error", "category"}`` error handlers, and the
reaper that finishes sessions whose client went silent.
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
from .routes import ROUTERS
from .routes.server import HEALTH_PATH
from .service import Service
from .tenants import Keyring, Unauthorized

log = logging.getLogger("trainer_api.app")


def create_app(
    service: Service,
    keyring: Keyring,
    session_timeout: float | None = 300.0,
    docs: bool = False,
) -> FastAPI:
    """Build the FastAPI app; all state lives in ``service``, the API keys in ``keyring`` (empty: open).

    Sessions silent for ``session_timeout`` seconds (the SDK sends a heartbeat every
    10 s) are finished and their adapters unloaded. ``docs`` serves ``/docs`` and
    ``/openapi.json`` (without a key); they are off by default, since a shared
    service need not describe itself to everyone who can reach it.
    """
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = None
        if session_timeout:
            async def reap_forever() -> None:
                while True:
                    await asyncio.sleep(min(30.0, session_timeout / 4))
                    service.reap_expired(session_timeout)

            reaper = asyncio.create_task(reap_forever())
        yield
        if reaper is not None:
            reaper.cancel()

    app = FastAPI(
        title="trainer_api", version="0.1.0", lifespan=lifespan,
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
    )
    app.state.service = service
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

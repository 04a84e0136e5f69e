"""The service's routes, one router per resource; ``ROUTERS`` is the order ``create_app`` mounts them in.

The catch-all that explains unimplemented SDK endpoints comes last, so it only
answers paths no other router has.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import (
    futures,
    models,
    rest,
    sampling,
    server,
    sessions,
    training,
    unimplemented,
    weights,
)

ROUTERS: tuple[APIRouter, ...] = (
    server.router,
    sessions.router,
    models.router,
    training.router,
    weights.router,
    sampling.router,
    futures.router,
    rest.router,
    unimplemented.router,
)

"""FastAPI dependencies the routers share: the service, and the caller's view of it.

The middleware in ``app.py`` authenticates every request before its body is read
and leaves the caller's :class:`~trainer_api.tenants.Tenant` on ``request.state``;
:func:`tenant_view` turns it into the only handle routes have on sessions, runs,
samplers, checkpoints and futures, so ownership is checked in one place.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..ownership import TenantView
from ..service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


def tenant_view(request: Request) -> TenantView:
    """The authenticated caller's view of the service."""
    return TenantView(request.app.state.service, request.state.tenant, request.app.state.run_caps)


ServiceDep = Annotated[Service, Depends(get_service)]
Owned = Annotated[TenantView, Depends(tenant_view)]

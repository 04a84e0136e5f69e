"""The caller's view of the service: the one place where ownership is checked.

Routes get a :class:`TenantView` from a FastAPI dependency (``routes/deps.py``) and
reach sessions, samplers, training runs, checkpoints and futures only through it.
Every session, run, sampler, future and checkpoint belongs to the tenant (API key)
that created it; another tenant's id fails here exactly as an id that never existed
does (404, same message), so a caller cannot even learn what others are running.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import (
    CheckpointNotFound,
    CheckpointRef,
    checkpoint_ref,
    parse_path,
    valid_run_record,
)
from .engine import Tenant as LiveModel
from .exceptions import Busy, NotFound, UserError
from .futures import FutureEntry
from .service import SamplerState, Service, SessionState
from .tenants import Tenant

DEFAULT_MAX_RUNS_PER_KEY = 32
"""Training runs one API key may have loaded at once (``--max-runs-per-key``): each holds an adapter,
its gradients and optimizer state in device memory, so one key must not be able to fill it."""
DEFAULT_MAX_LOADED_RUNS = 64
"""Training runs the service holds at once, all keys together (``--max-loaded-runs``): a rank-32
adapter of Gemma 3 1B on every attention and MLP projection is 26M float32 parameters, about 0.4 GB
with their gradients and two Adam moments (computed from the model's shapes, not measured)."""


class TooManyRuns(UserError):
    """The key has its quota of loaded runs: 429 (the SDK retries it for about a minute, so a run that
    a finishing session frees lets the creation through)."""

    status_code = 429


@dataclass
class RunCaps:
    """How many training runs may be loaded at once, per API key and in all (None: no limit).

    Counting the loaded runs and reserving a place is one step under a lock, so concurrent creations
    cannot pass a cap; the creation itself (for a load, a checkpoint read) runs outside it, so no
    key waits on another's.
    """

    per_key: int | None = DEFAULT_MAX_RUNS_PER_KEY
    total: int | None = DEFAULT_MAX_LOADED_RUNS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _creating: Counter[str] = field(default_factory=Counter, repr=False)

    @contextmanager
    def place(self, tenant_id: str, loaded: Callable[[], list[str | None]]) -> Iterator[None]:
        """A place for one more of ``tenant_id``'s runs while the block creates it; ``loaded`` gives the
        owners of the runs loaded now."""
        with self._lock:
            owners = Counter(loaded()) + self._creating
            if self.per_key is not None and owners[tenant_id] >= self.per_key:
                raise TooManyRuns(
                    f"this API key has {owners[tenant_id]} training runs loaded, the most it may have at once "
                    f"(--max-runs-per-key {self.per_key}); unload one (unload_model) or close its ServiceClient"
                )
            if self.total is not None and owners.total() >= self.total:
                raise Busy(
                    f"the service holds {owners.total()} training runs, the most it holds at once "
                    f"(--max-loaded-runs {self.total}); try again once some are unloaded"
                )
            self._creating[tenant_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._creating[tenant_id] -= 1


class TenantView:
    """What one tenant may see and touch; built per request for the authenticated caller."""

    def __init__(self, service: Service, tenant: Tenant, caps: RunCaps) -> None:
        self.service = service
        self.engine = service.engine
        self.tenant = tenant
        self.caps = caps

    # ------------------------------------------------------------ sessions
    def create_session(self, user_metadata: dict[str, Any] | None, display_name: str | None) -> SessionState:
        session = SessionState(f"session-{uuid.uuid4().hex[:16]}", self.tenant.id, user_metadata, display_name)
        self.service.sessions[session.session_id] = session
        return session

    def session(self, session_id: str) -> SessionState:
        session = self.service.sessions.get(session_id)
        if session is None or session.owner != self.tenant.id:
            raise NotFound(f"unknown session_id {session_id!r}; create a session first")
        return session

    def live_session(self, session_id: str) -> SessionState:
        """A session of the caller's that may still create models and samplers."""
        session = self.session(session_id)
        if session.finished is not None:
            raise UserError(f"session {session_id} has finished ({session.finished}); create a new ServiceClient")
        return session

    def sessions(self) -> list[SessionState]:
        return [s for s in self.service.sessions.values() if s.owner == self.tenant.id]

    # ------------------------------------------------------------ samplers
    def sampler(self, sampler_id: str) -> SamplerState:
        sampler = self.service.samplers.get(sampler_id)
        if sampler is None or sampler.owner != self.tenant.id:
            raise NotFound(f"unknown sampling_session_id {sampler_id!r}")
        return sampler

    def open_sampler(self, session: SessionState, sampler_id: str, snapshot_key: str, model_path: str | None) -> None:
        self.service.samplers[sampler_id] = SamplerState(sampler_id, self.tenant.id, snapshot_key, model_path)
        session.sampler_ids.append(sampler_id)

    # ------------------------------------------------------------ training runs
    def new_run(self) -> AbstractContextManager[None]:
        """Guard the creation of a run (inside the block) with the caps on loaded runs."""
        return self.caps.place(self.tenant.id, lambda: [self.service.live_owner(t.model_id) for t in self.engine.tenants()])

    def claim_run(self, session: SessionState, model_id: str) -> None:
        """Record a run the caller just created in ``session`` as the caller's."""
        self.service.claim_run(model_id, self.tenant.id)
        session.training_run_ids.append(model_id)

    def owns_run(self, model_id: str) -> bool:
        """Whether the run is the caller's; may read its owner record from storage (call it off the event loop)."""
        return self.service.run_owner(model_id) == self.tenant.id

    def model(self, model_id: str) -> LiveModel:
        """The caller's loaded adapter ``model_id``; answers from memory (a loaded adapter was claimed here)."""
        if self.service.live_owner(model_id) != self.tenant.id:
            raise NotFound(f"unknown model_id {model_id!r}: it was never created on this service or was unloaded")
        return self.engine.tenant(model_id)

    def live_models(self) -> list[LiveModel]:
        """The caller's loaded adapters."""
        return [t for t in self.engine.tenants() if self.service.live_owner(t.model_id) == self.tenant.id]

    def run(self, model_id: str) -> dict[str, Any]:
        """The caller's training run record (loaded or not, from this process or an earlier one)."""
        record = self.engine.store.read_run(model_id) if self.owns_run(model_id) else None
        if record is None:
            raise NotFound(f"unknown training run {model_id!r}")
        if not valid_run_record(record):
            raise UserError(f"the record of training run {model_id!r} (run.json) is damaged")
        return record

    def runs(self) -> list[dict[str, Any]]:
        """The caller's run records, oldest first; a damaged record is skipped (the store logs unreadable ones)."""
        return [r for r in self.engine.store.list_runs() if self.owns_run(r["training_run_id"]) and valid_run_record(r)]

    def describe_run(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.service.training_run(record, self.tenant.name)

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self, tinker_path: str) -> CheckpointRef:
        """A ``tinker://`` path into one of the caller's runs (a malformed path is a 400)."""
        return self._owned(parse_path(tinker_path))

    def checkpoint_at(self, model_id: str, kind: str, name: str) -> CheckpointRef:
        return self._owned(checkpoint_ref(model_id, kind, name))

    def _owned(self, ref: CheckpointRef) -> CheckpointRef:
        if not self.owns_run(ref.model_id):
            raise CheckpointNotFound.at(ref)
        return ref

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every live checkpoint of the caller's runs."""
        return [c for r in self.runs() for c in self.engine.store.list(r["training_run_id"])]

    # ------------------------------------------------------------ futures
    def submit(self, future: Future, encode: Callable[[Any], Any], kind: str, **extra: Any) -> dict[str, Any]:
        """Register queued work as the caller's; the answer carries the request id the SDK polls."""
        return {"request_id": self.service.futures.add(future, encode, kind, self.tenant.id), **extra}

    def future(self, request_id: str) -> FutureEntry:
        entry = self._own_entry(request_id)
        if entry is None:
            raise NotFound(f"unknown request_id {request_id!r} (never issued or expired)")
        return entry

    def cancel(self, request_id: str) -> None:
        """Cancel the caller's request; an unknown (or another tenant's) id is ignored, as the SDK expects."""
        entry = self._own_entry(request_id)
        if entry is not None:
            entry.future.cancel()

    def _own_entry(self, request_id: str) -> FutureEntry | None:
        entry = self.service.futures.get(request_id)
        return entry if entry is not None and entry.owner == self.tenant.id else None

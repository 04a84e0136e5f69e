"""Per-process state behind the routes: sessions, samplers, pending futures, run owners, request counts.

Routes never read this state directly: they reach it through ``ownership.TenantView``,
which answers for the caller's own resources only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import iso
from .engine import Engine
from .exceptions import NotFound, ServiceError
from .futures import FutureStore

log = logging.getLogger("trainer_api.service")


@dataclass
class SessionState:
    """What the service knows about one SDK session."""

    session_id: str
    owner: str
    """The tenant id that created the session."""
    user_metadata: dict[str, Any] | None
    display_name: str | None
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    training_run_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)
    finished: str | None = None


@dataclass
class SamplerState:
    """A sampling session: which frozen weights it serves."""

    sampler_id: str
    owner: str
    snapshot_key: str
    model_path: str | None
    clients: int = 1


class Service:
    """Per-process state behind the routes: sessions, samplers, pending futures and who owns which run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.futures = FutureStore()
        self.sessions: dict[str, SessionState] = {}
        self.samplers: dict[str, SamplerState] = {}
        self.requests: Counter[tuple[str, int]] = Counter()
        self._run_owners: dict[str, str] = {}
        store = getattr(engine, "store", None)
        if store is not None:
            # One service per checkpoint root: at start-up nothing else is writing there, so whatever an
            # interrupted save left behind (partial directories, an old copy set aside, temp files) is ours.
            store.recover()

    def live_owner(self, model_id: str) -> str | None:
        """The owner of a run this process created, loaded or looked up: memory only, so the checks on the
        training hot path (async routes, on the event loop) never wait on storage."""
        return self._run_owners.get(model_id)

    def run_owner(self, model_id: str) -> str | None:
        """The tenant id owning a training run, from memory or (a run of an earlier process) its owner record.

        Owners never change, so an owner read from storage is remembered.
        """
        owner = self._run_owners.get(model_id)
        if owner is None:
            owner = self.engine.store.read_owner(model_id)
            if owner is not None:
                self._run_owners[model_id] = owner
        return owner

    def claim_run(self, model_id: str, tenant_id: str) -> None:
        """Make ``tenant_id`` the owner of a new run, on disk too, so its checkpoints stay its own after a restart.

        ``owner.json`` is replaced atomically (temporary file, fsync, rename), so it is never seen half-written.
        """
        self.engine.store.write_owner(model_id, tenant_id)
        self._run_owners[model_id] = tenant_id

    def finish_session(self, session: SessionState, reason: str) -> None:
        """Mark a session finished (first reason wins) and unload its adapters to free memory."""
        session.finished = session.finished or reason
        for model_id in session.training_run_ids:
            try:
                self.engine.unload(model_id)
            except NotFound:
                pass  # already unloaded
            except ServiceError as exc:
                log.warning("could not unload", extra={"model_id": model_id, "error": str(exc)})

    def reap_expired(self, timeout_seconds: float, now: float | None = None) -> list[str]:
        """Finish sessions whose client stopped sending heartbeats (a crashed trial), freeing their adapters."""
        cutoff = (now if now is not None else time.time()) - timeout_seconds
        expired = [s.session_id for s in self.sessions.values() if s.finished is None and s.last_heartbeat < cutoff]
        for session_id in expired:
            log.info("session expired", extra={"session_id": session_id})
            self.finish_session(self.sessions[session_id], "expired")
        return expired

    def active_sessions(self, within_seconds: float = 120.0) -> int:
        """Sessions not finished whose client sent a heartbeat recently."""
        cutoff = time.time() - within_seconds
        return sum(1 for s in self.sessions.values() if s.finished is None and s.last_heartbeat >= cutoff)

    def training_run(self, record: dict[str, Any], owner_name: str) -> dict[str, Any]:
        """A run record in the SDK's TrainingRun shape, with its latest checkpoints and last activity."""
        model_id = record["training_run_id"]
        checkpoints = self.engine.store.list(model_id)
        training = [c for c in checkpoints if c["checkpoint_type"] == "training"]
        sampler = [c for c in checkpoints if c["checkpoint_type"] == "sampler"]
        live = {t.model_id: t for t in self.engine.tenants()}.get(model_id)
        return {
            "training_run_id": model_id,
            "base_model": record["base_model"],
            "model_owner": owner_name,
            "is_lora": True,
            "corrupted": False,
            "lora_rank": record["lora"]["rank"],
            "last_request_time": iso(live.last_request_time if live else record["created_at"]),
            "last_checkpoint": training[-1] if training else None,
            "last_sampler_checkpoint": sampler[-1] if sampler else None,
            "user_metadata": {k: str(v) for k, v in (record.get("user_metadata") or {}).items()},
        }

"""Per-process state behind the routes: sessions, samplers, pending futures, request counts."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .checkpoints import iso
from .engine import Engine, NotFound, ServiceError, UserError
from .futures import FutureStore

log = logging.getLogger("trainer_api.service")


@dataclass
class SessionState:
    """What the service knows about one SDK session."""

    session_id: str
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
    snapshot_key: str
    model_path: str | None
    clients: int = 1


class Service:
    """Per-process state behind the routes: sessions, samplers and pending futures."""

    def __init__(self, engine: Engine, api_key: str | None = None) -> None:
        self.engine = engine
        self.api_key = api_key
        self.model_name = engine.model_name
        self.futures = FutureStore()
        self.sessions: dict[str, SessionState] = {}
        self.samplers: dict[str, SamplerState] = {}
        self.requests: Counter[tuple[str, int]] = Counter()

    def finish_session(self, session_id: str, reason: str) -> None:
        """Mark a session finished (first reason wins) and unload its adapters to free memory."""
        session = self.session(session_id)
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
            self.finish_session(session_id, "expired")
        return expired

    def active_sessions(self, within_seconds: float = 120.0) -> int:
        """Sessions not finished whose client sent a heartbeat recently."""
        cutoff = time.time() - within_seconds
        return sum(1 for s in self.sessions.values() if s.finished is None and s.last_heartbeat >= cutoff)

    def session(self, session_id: str) -> SessionState:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"unknown session_id {session_id!r}; create a session first")
        return session

    def live_session(self, session_id: str) -> SessionState:
        """A session that may still create models and samplers."""
        session = self.session(session_id)
        if session.finished is not None:
            raise UserError(f"session {session_id} has finished ({session.finished}); create a new ServiceClient")
        return session

    def future_response(self, future: Any, encode: Callable[[Any], Any], kind: str, **extra: Any) -> dict[str, Any]:
        request_id = self.futures.add(future, encode, kind)
        return {"request_id": request_id, **extra}

    def open_sampler(self, session_id: str, sampler_id: str, snapshot_key: str, model_path: str | None) -> str:
        self.samplers[sampler_id] = SamplerState(sampler_id, snapshot_key, model_path)
        self.session(session_id).sampler_ids.append(sampler_id)
        return sampler_id

    def training_run(self, model_id: str) -> dict[str, Any]:
        record = self.engine.store.read_run(model_id)
        if record is None:
            raise NotFound(f"unknown training run {model_id!r}")
        checkpoints = self.engine.store.list(model_id)
        training = [c for c in checkpoints if c["checkpoint_type"] == "training"]
        sampler = [c for c in checkpoints if c["checkpoint_type"] == "sampler"]
        live = {t.model_id: t for t in self.engine.tenants()}.get(model_id)
        return {
            "training_run_id": model_id,
            "base_model": record["base_model"],
            "model_owner": "local",
            "is_lora": True,
            "corrupted": False,
            "lora_rank": record["lora"]["rank"],
            "last_request_time": iso(live.last_request_time if live else record["created_at"]),
            "last_checkpoint": training[-1] if training else None,
            "last_sampler_checkpoint": sampler[-1] if sampler else None,
            "user_metadata": {k: str(v) for k, v in (record.get("user_metadata") or {}).items()},
        }

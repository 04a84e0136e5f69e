"""Request ids for queued work, and long-polling for their results.

Every mutating call answers ``{request_id}`` at once; the SDK then polls
``retrieve_future``. A poll waits up to ``poll_seconds`` for the result before
answering ``try_again``, so a client learns of completion within one round trip
instead of sleeping between polls.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FutureEntry:
    future: Future
    encode: Callable[[Any], Any]
    kind: str
    owner: str
    """The tenant id whose request this is: only it may retrieve or cancel it."""
    created_at: float = field(default_factory=time.time)
    delivered_at: float | None = None


class FutureStore:
    """Maps request ids to engine futures; safe to use from any thread.

    A delivered result is kept for ``delivered_ttl`` seconds (a client whose response
    was lost in transit can ask again) and an undelivered one for ``ttl_seconds``, so
    results of a long training run, and results nobody ever claims, do not accumulate
    in memory. Work still running is never dropped. Routes run on the event loop and
    in the thread pool alike (sync routes), so every access to the map holds a lock.
    """

    def __init__(self, ttl_seconds: float = 3600.0, delivered_ttl: float = 120.0, sweep_every: float = 1.0) -> None:
        self.ttl_seconds = ttl_seconds
        self.delivered_ttl = delivered_ttl
        self.sweep_every = sweep_every
        self._entries: dict[str, FutureEntry] = {}
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def add(self, future: Future, encode: Callable[[Any], Any], kind: str, owner: str) -> str:
        """Register ``owner``'s ``future``; ``encode`` turns its result into the response payload."""
        request_id = f"{kind}:{uuid.uuid4().hex}"
        entry = FutureEntry(future, encode, kind, owner)
        with self._lock:
            self._entries[request_id] = entry
        self._expire()
        return request_id

    def get(self, request_id: str) -> FutureEntry | None:
        """The entry for ``request_id`` whoever owns it: callers go through ``TenantView.future``."""
        with self._lock:
            return self._entries.get(request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def pending(self) -> int:
        with self._lock:
            entries = list(self._entries.values())
        return sum(1 for e in entries if not e.future.done())

    @staticmethod
    async def wait(entry: FutureEntry, poll_seconds: float) -> bool:
        """Wait up to ``poll_seconds`` for completion without cancelling the underlying work."""
        if entry.future.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), poll_seconds)
        except asyncio.TimeoutError:
            return entry.future.done()
        except asyncio.CancelledError:
            if entry.future.cancelled():
                return True
            raise
        except Exception:  # the work failed: that is a completion too
            return True
        return True

    @staticmethod
    def mark_delivered(entry: FutureEntry) -> None:
        if entry.delivered_at is None:
            entry.delivered_at = time.time()

    def _expire(self, force: bool = False) -> None:
        """Drop finished entries past their TTL; at most once per ``sweep_every`` seconds unless ``force``."""
        now = time.time()
        with self._lock:
            if not force and now - self._last_sweep < self.sweep_every:
                return
            self._last_sweep = now
            stale = [
                k for k, e in self._entries.items()
                if e.future.done()
                and (e.created_at < now - self.ttl_seconds
                     or (e.delivered_at is not None and e.delivered_at < now - self.delivered_ttl))
            ]
            for key in stale:
                del self._entries[key]

    def expire(self) -> None:
        """Sweep now (the periodic sweep runs on ``add``)."""
        self._expire(force=True)

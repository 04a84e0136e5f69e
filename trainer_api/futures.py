"""Request ids for queued work, and long-polling for their results.

Every mutating call answers ``{request_id}`` at once; the SDK then polls
``retrieve_future``. A poll waits up to ``poll_seconds`` for the result before
answering ``try_again``, so a client learns of completion within one round trip
instead of sleeping between polls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class _Entry:
    future: Future
    encode: Callable[[Any], Any]
    kind: str
    created_at: float = field(default_factory=time.time)
    delivered_at: float | None = None


class FutureStore:
    """Maps request ids to engine futures.

    A delivered result is kept for ``delivered_ttl`` seconds (a client whose response
    was lost in transit can ask again) and an undelivered one for ``ttl_seconds``, so
    results of a long training run do not accumulate in memory.
    """

    def __init__(self, ttl_seconds: float = 3600.0, delivered_ttl: float = 120.0) -> None:
        self.ttl_seconds = ttl_seconds
        self.delivered_ttl = delivered_ttl
        self._entries: dict[str, _Entry] = {}

    def add(self, future: Future, encode: Callable[[Any], Any], kind: str) -> str:
        """Register ``future``; ``encode`` turns its result into the response payload."""
        self._expire()
        request_id = f"{kind}:{uuid.uuid4().hex}"
        self._entries[request_id] = _Entry(future, encode, kind)
        return request_id

    def get(self, request_id: str) -> _Entry | None:
        return self._entries.get(request_id)

    def cancel(self, request_id: str) -> None:
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.future.cancel()

    def pending(self) -> int:
        return sum(1 for e in self._entries.values() if not e.future.done())

    @staticmethod
    async def wait(entry: _Entry, poll_seconds: float) -> bool:
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
    def mark_delivered(entry: _Entry) -> None:
        if entry.delivered_at is None:
            entry.delivered_at = time.time()

    def _expire(self) -> None:
        now = time.time()
        stale = [
            k for k, e in self._entries.items()
            if e.future.done()
            and (e.created_at < now - self.ttl_seconds
                 or (e.delivered_at is not None and e.delivered_at < now - self.delivered_ttl))
        ]
        for key in stale:
            del self._entries[key]

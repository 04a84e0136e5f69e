"""Score in worker processes, so a runaway query is killed, not waited for.

The sandbox stops almost everything in-process, deterministically; the pool
is the last line: each worker gets a wall-clock deadline per prediction and
is killed outright when it misses it (or dies), and the prediction it was on
is recorded as a failure. Results come back in input order.

Messages are per chunk, not per prediction: the parent sends a chunk of
predictions (two in flight per worker), the worker sends results back in
batches, and the exact timing goes through shared memory instead, one 64-bit
progress word per worker (see :func:`_worker_main`). Predictions are grouped
by example, so one worker builds each example's database, gold result and
test suite.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import multiprocessing
import multiprocessing.connection
import operator
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from multiprocessing.reduction import ForkingPickler
from typing import Iterable, Sequence

from .backends import Limits
from .example import Example
from .reward import RewardConfig
from .scorer import Score, Scorer, Submission, VerdictMethod
from .suite import SuiteOptions
from .verdict import Verdict

_STARTUP_TIMEOUT_S = 120.0
_SPAWN = multiprocessing.get_context("spawn")
_FLUSH_S = 0.1
"""A worker sends the results it has at least this often, and at the end of each chunk."""
_MAX_CHUNK = 1024
_BLOCK = 1024
"""Predictions read at a time from an iterable that is not a sequence."""
_COUNT_SHIFT = 40
_STAMP_MASK = (1 << _COUNT_SHIFT) - 1
_COUNT_MASK = (1 << (64 - _COUNT_SHIFT)) - 1
_STOP = object()
"""Tells a worker's sender thread to finish."""


@dataclass(frozen=True)
class ScorerSpec:
    """Everything a worker needs to build its own :class:`Scorer` (picklable)."""

    backend: str = "sqlite"
    limits: Limits = field(default_factory=Limits)
    reward: RewardConfig = field(default_factory=RewardConfig)
    strict_gate: bool = False
    memory_limit_mb: int | None = 4096
    verdict: VerdictMethod = "test_suite"
    suite: SuiteOptions = field(default_factory=SuiteOptions)
    suite_cache: str | None = None

    def build(self) -> Scorer:
        return Scorer(self.backend, reward=self.reward, limits=self.limits, strict_gate=self.strict_gate,
                      verdict=self.verdict, suite=self.suite, suite_cache=self.suite_cache)


def _worker_main(spec: ScorerSpec, connection: multiprocessing.connection.Connection, progress: ctypes.c_uint64) -> None:
    """Score chunks until told to stop; results go back in batches, progress through ``progress``.

    Before each prediction the worker stores, in one 64-bit word (one aligned
    store, so the parent never reads half of it), how many predictions it has
    started and when it started this one; after it, the same count with no
    start time. The parent reads the word to time each prediction exactly and,
    after a kill, to name the one the worker was on. Results go back at the
    end of each chunk, and a sender thread sends what has finished every
    :data:`_FLUSH_S` meanwhile, so when a query hangs (SQLite releases the GIL
    while it runs) the results before it are already in the pipe when the
    parent kills the worker, and are kept.

    Once told to stop and its backend is closed, it exits at once, as
    multiprocessing's forked children do: everything it sent is in the pipe,
    and the interpreter's teardown of its caches would only add about a tenth
    of a second to every pool's close.
    """
    if spec.memory_limit_mb:
        import resource

        limit = spec.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with spec.build() as scorer:
        gc.freeze()  # what it has loaded lives as long as it does: collections need not walk it again and again
        outbox = _Outbox(connection)
        threading.Thread(target=outbox.flush_every, args=(_FLUSH_S,), daemon=True).start()
        connection.send("ready")
        started = 0
        while (chunk := connection.recv()) is not None:
            for submission in _unpack(*chunk):
                started = (started + 1) & _COUNT_MASK
                progress.value = (started << _COUNT_SHIFT) | _stamp(time.monotonic())
                try:
                    result = scorer.score_submission(submission)
                except MemoryError:
                    result = _failure(submission, spec, Verdict.RESOURCE_LIMIT, "scoring ran out of memory")
                progress.value = started << _COUNT_SHIFT
                outbox.put(result)
            outbox.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Outbox:
    """Finished results not yet sent; both the scoring thread and the sender thread flush it, in order."""

    def __init__(self, connection: multiprocessing.connection.Connection) -> None:
        self.connection = connection
        self.lock = threading.Lock()
        self.batch: list[Score] = []

    def put(self, result: Score) -> None:
        with self.lock:
            self.batch.append(result)

    def flush(self) -> None:
        with self.lock:
            if self.batch:
                self.connection.send(self.batch)
                self.batch = []

    def flush_every(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            self.flush()


def _stamp(now: float) -> int:
    """A start time for the progress word: whole milliseconds of the monotonic clock, never 0."""
    return max(1, int(now * 1000.0) & _STAMP_MASK)


_EXAMPLE_FIELDS = operator.attrgetter(*(each.name for each in fields(Example)))


def _pack(submissions: Iterable[Submission]) -> bytes:
    """A chunk as a worker gets it: each example's fields once, then (example, prediction, dialect) per prediction.

    Pickle takes each dataclass apart and builds it again through copyreg;
    plain tuples cost a third of that both ways, about 0.15 s of CPU over
    20,000 predictions.
    """
    numbers: dict[Example, int] = {}
    rows = [(numbers.setdefault(item.example, len(numbers)), item.prediction, item.dialect) for item in submissions]
    return ForkingPickler.dumps(([_EXAMPLE_FIELDS(example) for example in numbers], rows))


def _unpack(examples: list[tuple], rows: list[tuple[int, str, str]]) -> list[Submission]:
    """The submissions of a :func:`_pack`-ed chunk."""
    built = [Example(*values) for values in examples]
    return [Submission(built[number], prediction, dialect) for number, prediction, dialect in rows]


def _failure(submission: Submission, spec: ScorerSpec, verdict: Verdict, message: str) -> Score:
    return Score(submission.example.id, verdict, spec.reward.floor, message)


class _Worker:
    """One scoring process, seen from the parent: what it was sent and has not answered yet."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.progress = _SPAWN.RawValue(ctypes.c_uint64, 0)
        self.connection, child = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=_worker_main, args=(spec, child, self.progress), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.started_at = time.monotonic()
        self.queue: deque[tuple[int, Submission]] = deque()
        """Predictions sent and not yet answered, in the order the worker scores them."""
        self.chunks: deque[int] = deque()
        """Sizes of the chunks sent and not yet wholly answered: the next one waits in the pipe."""
        # Chunks go out from a thread, so a worker that stops reading never blocks the parent.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, daemon=True)
        self._sender.start()
        self.answered = 0
        """Results received over this worker's life, modulo the progress word's count."""
        self.word = 0
        self.word_seen_at = self.started_at
        """The progress word last read, and when it was first seen (or work last arrived or came back)."""

    def wait_ready(self) -> None:
        try:
            ready = self.connection.poll(_STARTUP_TIMEOUT_S) and self.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.fail_start()
        self.ready = True

    def fail_start(self) -> None:
        self.kill()
        raise RuntimeError(f"scoring worker failed to start (exit code {self.process.exitcode}); see its error above")

    def assign(self, chunk: list[tuple[int, Submission]]) -> None:
        if not self.chunks:
            self.word_seen_at = time.monotonic()
        # Pickled here, so what cannot be pickled fails the map as before; the thread only writes.
        payload = _pack(submission for _, submission in chunk)
        self.queue.extend(chunk)
        self.chunks.append(len(chunk))
        self._outbox.put(payload)

    def _send_all(self) -> None:
        while (payload := self._outbox.get()) is not _STOP:
            try:
                self.connection.send_bytes(payload)
            except (OSError, ValueError):
                return  # it died or was killed: its connection reads as closed, and the pool replaces it

    def stop(self) -> None:
        """Ask it to exit once it has scored what it was sent."""
        self._outbox.put(ForkingPickler.dumps(None))
        self._outbox.put(_STOP)

    def accept(self, batch: list[Score], results: list[Score | None]) -> None:
        """File a batch of results: they answer the oldest predictions sent."""
        for result in batch:
            index, _ = self.queue.popleft()
            results[index] = result
        self.answered = (self.answered + len(batch)) & _COUNT_MASK
        count = len(batch)
        while count and self.chunks:
            done = min(count, self.chunks[0])
            count -= done
            if done == self.chunks[0]:
                self.chunks.popleft()
            else:
                self.chunks[0] -= done
        self.word_seen_at = time.monotonic()

    def expiry(self, deadline_s: float, now: float) -> float:
        """When the work it is on now runs out of time: the prediction it started, or the wait for one."""
        word = self.progress.value
        if word != self.word:
            self.word, self.word_seen_at = word, now
        stamp = word & _STAMP_MASK
        if stamp:
            return (stamp + 1) / 1000.0 + deadline_s  # +1 ms: the stamp is rounded down
        return self.word_seen_at + deadline_s

    def current(self) -> int | None:
        """Position in :attr:`queue` of the prediction that progress word :attr:`word` says it was on, if still there."""
        if not self.word & _STAMP_MASK:
            return None
        position = ((self.word >> _COUNT_SHIFT) - 1 - self.answered) & _COUNT_MASK
        return position if position < len(self.queue) else None

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.close_connection()

    def close_connection(self) -> None:
        """Once the process is gone: stop the sender thread (its writes fail now), then close."""
        self._outbox.put(_STOP)
        self._sender.join()
        self.connection.close()


class ScoringPool:
    """A fixed set of scoring processes; reuse one across batches to skip start-up.

    :meth:`map` groups the predictions by example (schema, then gold) and
    sends each example's predictions to one worker, so each example's
    database, gold result and test suite are built by one worker only;
    results come back in input order. Work goes out in chunks and comes back
    in batches, while a shared progress word per worker (see
    :func:`_worker_main`) lets the parent kill a worker the moment one
    prediction has run ``deadline_s``: that prediction is recorded as a
    timeout (a worker that dies: a resource-limit failure), the results the
    worker had sent are kept, and the rest of its work goes to its
    replacement.
    """

    def __init__(
        self, spec: ScorerSpec | None = None, workers: int = 2, deadline_s: float | None = None, *, wait: bool = True
    ) -> None:
        """Start ``workers`` processes; ``wait=False`` returns while they start (the first map waits for them)."""
        if workers < 1:
            raise ValueError("a scoring pool needs at least one worker")
        self.spec = spec or ScorerSpec()
        self.deadline_s = deadline_s or self.spec.limits.timeout_s + 1.0
        self._workers = [_Worker(self.spec) for _ in range(workers)]
        if wait:
            try:
                for worker in self._workers:
                    worker.wait_ready()
            except BaseException:  # one failed to start: the others must not outlive the error
                for worker in self._workers:
                    worker.kill()
                raise

    def map(self, submissions: Iterable[Submission]) -> list[Score]:
        """Score every submission; the result list follows the input order.

        A list (any sequence) is grouped as a whole. Any other iterable is
        read in blocks of :data:`_BLOCK` while the workers score the blocks
        before it, and each example keeps to the worker that got its first
        prediction: a generator that parses its input overlaps with scoring.
        """
        streamed = not isinstance(submissions, Sequence)
        items = iter(submissions) if streamed else None
        size = _MAX_CHUNK if streamed else max(1, min(_MAX_CHUNK, len(submissions) // (4 * len(self._workers))))
        batch = _Batch(self, size)
        try:
            if items is None:
                batch.route(list(submissions))
            else:
                while block := list(itertools.islice(items, _BLOCK)):
                    batch.route(block)
                    batch.service(wait=False)
            batch.end_of_input()
            while batch.remaining:
                batch.service(wait=True)
        except BaseException:
            # Whatever was in flight would answer the next map: start those workers afresh.
            for slot, worker in enumerate(self._workers):
                if worker.queue or not worker.ready:
                    worker.kill()
                    self._workers[slot] = _Worker(self.spec)
            raise
        return batch.results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.close_connection()
        self._workers = []

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Batch:
    """One :meth:`ScoringPool.map`: where each prediction goes, what came back, and the kill rules.

    Workers are named by slot (a replacement takes its predecessor's slot).
    Each example has a home slot, the least loaded when its first prediction
    arrives; its predictions queue there in chunks. A worker with nothing
    queued takes a chunk queued for the busiest other slot rather than idle.
    """

    def __init__(self, pool: ScoringPool, chunk_size: int) -> None:
        slots = len(pool._workers)
        self.pool = pool
        self.chunk_size = chunk_size
        self.results: list[Score | None] = []
        self.remaining = 0
        self.pending: list[deque[list[tuple[int, Submission]]]] = [deque() for _ in range(slots)]
        self.filling: list[list[tuple[int, Submission]]] = [[] for _ in range(slots)]
        self.load = [0] * slots
        self.home: dict[tuple, int] = {}
        self.idle_deaths: set[int] = set()

    def route(self, block: list[Submission]) -> None:
        """Give each of ``block``'s predictions its index, and queue them by example on their home slots."""
        start = len(self.results)
        self.results.extend([None] * len(block))
        self.remaining += len(block)
        groups: dict[tuple, dict[str, list[int]]] = {}
        for index, submission in enumerate(block, start):
            example = submission.example
            by_gold = groups.setdefault((example.database, example.dialect, example.schema), {})
            by_gold.setdefault(example.gold, []).append(index)
        share = max(self.chunk_size, -(-len(block) // len(self.load)))
        for schema, by_gold in groups.items():
            for gold, indices in by_gold.items():
                key = (schema, gold)
                # An example bigger than one worker's share of the block is spread, so the others do not idle.
                pieces = [indices[i : i + share] for i in range(0, len(indices), share)]
                for piece in pieces:
                    slot = self.home.get(key) if len(pieces) == 1 else None
                    if slot is None:
                        slot = self.home[key] = min(range(len(self.load)), key=self.load.__getitem__)
                    self.load[slot] += len(piece)
                    filling = self.filling[slot]
                    filling.extend((index, block[index - start]) for index in piece)
                    if len(filling) >= self.chunk_size:
                        self.pending[slot].append(filling)
                        self.filling[slot] = []

    def end_of_input(self) -> None:
        for slot, filling in enumerate(self.filling):
            if filling:
                self.pending[slot].append(filling)
                self.filling[slot] = []

    def _next_chunk(self, slot: int, idle: bool) -> list[tuple[int, Submission]] | None:
        """Its own next chunk; when ``idle``, a part-filled one, or else the last queued for the busiest slot."""
        if self.pending[slot]:
            return self.pending[slot].popleft()
        if not idle:
            return None
        if self.filling[slot]:
            chunk, self.filling[slot] = self.filling[slot], []
            return chunk
        busiest = max(range(len(self.pending)), key=lambda other: len(self.pending[other]))
        return self.pending[busiest].pop() if self.pending[busiest] else None

    def service(self, *, wait: bool) -> None:
        """Hand out chunks, take in results, kill what is stuck or dead; ``wait`` blocks until something happens."""
        workers = self.pool._workers
        for slot, worker in enumerate(workers):
            # Two chunks in flight: the next waits in the pipe while the worker scores this one.
            if worker.ready and len(worker.chunks) < 2 and (chunk := self._next_chunk(slot, idle=not worker.chunks)):
                worker.assign(chunk)
        watched = [worker for worker in workers if worker.queue or not worker.ready]
        if not watched:
            return
        now = time.monotonic()
        timeout = 0.0
        if wait:
            nearest = min(
                worker.expiry(self.pool.deadline_s, now) if worker.ready else worker.started_at + _STARTUP_TIMEOUT_S
                for worker in watched
            )
            timeout = max(0.0, nearest - now)
        by_connection = {worker.connection: worker for worker in watched}
        for ready in multiprocessing.connection.wait(list(by_connection), timeout=timeout):
            worker = by_connection[ready]
            if not worker.ready:
                worker.wait_ready()
                continue
            try:
                self._accept(worker, ready.recv())
                while ready.poll():
                    self._accept(worker, ready.recv())
            except (EOFError, OSError):
                self._drain(worker, reread=True)
                message = f"scoring worker died (exit code {worker.process.exitcode})"
                self._replace(worker, Verdict.RESOURCE_LIMIT, message)
        now = time.monotonic()
        for worker in watched:
            if worker not in workers:
                continue  # replaced above
            if not worker.ready:
                if now > worker.started_at + _STARTUP_TIMEOUT_S:
                    worker.fail_start()
            elif worker.queue and now > worker.expiry(self.pool.deadline_s, now):
                self._drain(worker, reread=False)
                self._replace(worker, Verdict.TIMEOUT, f"query killed after {self.pool.deadline_s:.1f}s of wall time")

    def _accept(self, worker: _Worker, batch: list[Score]) -> None:
        worker.accept(batch, self.results)
        self.remaining -= len(batch)

    def _drain(self, worker: _Worker, *, reread: bool) -> None:
        """Kill it, then keep every result batch it sent before it died (they stay readable in the pipe).

        ``reread`` takes the progress word it left (a worker that died on its
        own); otherwise its word stays the one the kill was decided on.
        """
        worker.process.kill()
        worker.process.join()
        if reread:
            worker.word = worker.progress.value
        try:
            while worker.connection.poll():
                self._accept(worker, worker.connection.recv())
        except (EOFError, OSError):
            pass
        worker.close_connection()

    def _replace(self, worker: _Worker, verdict: Verdict, message: str) -> None:
        """After a kill or a death: fail the prediction it was on, requeue the rest, start a replacement.

        A worker that stopped between predictions is blamed on nothing the
        first time; if the same next prediction is there again, it is failed,
        so a prediction that kills every worker cannot loop forever.
        """
        position = worker.current()
        if position is None and worker.queue:
            first = worker.queue[0][0]
            if first in self.idle_deaths:
                position = 0
            self.idle_deaths.add(first)
        rest = list(worker.queue)
        worker.queue.clear()
        if position is not None:
            index, submission = rest.pop(position)
            self.results[index] = _failure(submission, self.pool.spec, verdict, message)
            self.remaining -= 1
        slot = self.pool._workers.index(worker)
        if rest:
            self.pending[slot].appendleft(rest)
        self.pool._workers[slot] = _Worker(self.pool.spec)


def score_batch(
    submissions: Iterable[Submission],
    *,
    workers: int = 0,
    backend: str = "sqlite",
    reward: RewardConfig | None = None,
    limits: Limits | None = None,
    strict_gate: bool = False,
    verdict: VerdictMethod = "test_suite",
    suite: SuiteOptions | None = None,
    suite_cache: str | None = None,
) -> list[Score]:
    """Score many predictions, in input order.

    ``workers=0`` scores in this process (fastest for small batches, with
    every sandbox limit but no hard kill); ``workers>=1`` scores in that many
    processes with a per-prediction wall-clock kill. ``verdict``, ``suite``
    and ``suite_cache`` are :class:`Scorer`'s.
    """
    spec = ScorerSpec(backend, limits or Limits(), reward or RewardConfig(), strict_gate,
                      verdict=verdict, suite=suite or SuiteOptions(), suite_cache=suite_cache)
    if workers == 0:
        with spec.build() as scorer:
            return [scorer.score_submission(submission) for submission in submissions]
    with ScoringPool(spec, workers, wait=False) as pool:  # the workers start while ``submissions`` is read
        return pool.map(submissions)

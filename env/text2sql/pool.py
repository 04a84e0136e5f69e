"""Score in worker processes, so a runaway query is killed, not waited for.

The sandbox stops almost everything in-process, deterministically; the pool
is the last line: each worker gets a wall-clock deadline per prediction and
is killed outright when it misses it (or dies), and the prediction it was on
is recorded as a failure. Results come back in input order.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .backends import Limits
from .reward import RewardConfig
from .scorer import Score, Scorer, Submission
from .verdict import Verdict

_STARTUP_TIMEOUT_S = 120.0
_SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class ScorerSpec:
    """Everything a worker needs to build its own :class:`Scorer` (picklable)."""

    backend: str = "sqlite"
    limits: Limits = field(default_factory=Limits)
    reward: RewardConfig = field(default_factory=RewardConfig)
    strict_gate: bool = False
    memory_limit_mb: int | None = 4096

    def build(self) -> Scorer:
        return Scorer(self.backend, reward=self.reward, limits=self.limits, strict_gate=self.strict_gate)


def _worker_main(spec: ScorerSpec, connection: multiprocessing.connection.Connection) -> None:
    """Score chunks until told to stop; one message back per prediction."""
    if spec.memory_limit_mb:
        import resource

        limit = spec.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with spec.build() as scorer:
        connection.send("ready")
        while (chunk := connection.recv()) is not None:
            for index, submission in chunk:
                try:
                    result = scorer.score_submission(submission)
                except MemoryError:
                    result = _failure(submission, spec, Verdict.RESOURCE_LIMIT, "scoring ran out of memory")
                connection.send((index, result))


def _failure(submission: Submission, spec: ScorerSpec, verdict: Verdict, message: str) -> Score:
    return Score(submission.example.id, verdict, spec.reward.floor, message)


class _Worker:
    def __init__(self, spec: ScorerSpec) -> None:
        self.connection, child = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=_worker_main, args=(spec, child), daemon=True)
        self.process.start()
        child.close()
        self.queue: deque[tuple[int, Submission]] = deque()
        self.since = 0.0

    def wait_ready(self) -> None:
        try:
            ready = self.connection.poll(_STARTUP_TIMEOUT_S) and self.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"scoring worker failed to start (exit code {self.process.exitcode}); see its error above")

    def assign(self, chunk: list[tuple[int, Submission]]) -> None:
        self.queue.extend(chunk)
        self.since = time.monotonic()
        self.connection.send(chunk)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class ScoringPool:
    """A fixed set of scoring processes; reuse one across batches to skip start-up."""

    def __init__(self, spec: ScorerSpec | None = None, workers: int = 2, deadline_s: float | None = None) -> None:
        if workers < 1:
            raise ValueError("a scoring pool needs at least one worker")
        self.spec = spec or ScorerSpec()
        self.deadline_s = deadline_s or self.spec.limits.timeout_s + 1.0
        self._workers = [_Worker(self.spec) for _ in range(workers)]
        for worker in self._workers:
            worker.wait_ready()

    def map(self, submissions: Iterable[Submission]) -> list[Score]:
        """Score every submission; the result list follows the input order."""
        items = list(enumerate(submissions))
        results: list[Score | None] = [None] * len(items)
        chunk_size = max(1, min(256, len(items) // (4 * len(self._workers)) or 1))
        todo = deque(items[i : i + chunk_size] for i in range(0, len(items), chunk_size))
        for worker in self._workers:
            if todo:
                worker.assign(todo.popleft())
        while any(worker.queue for worker in self._workers):
            busy = {worker.connection: worker for worker in self._workers if worker.queue}
            nearest = min(worker.since for worker in busy.values()) + self.deadline_s
            for ready in multiprocessing.connection.wait(list(busy), timeout=max(0.0, nearest - time.monotonic())):
                worker = busy[ready]
                try:
                    index, score = ready.recv()
                except (EOFError, OSError):
                    code = worker.process.exitcode
                    self._replace(worker, results, todo, Verdict.RESOURCE_LIMIT, f"scoring worker died (exit code {code})")
                    continue
                results[index] = score
                worker.queue.popleft()
                worker.since = time.monotonic()
                if not worker.queue and todo:
                    worker.assign(todo.popleft())
            now = time.monotonic()
            for worker in busy.values():
                if worker.queue and now - worker.since > self.deadline_s:
                    message = f"query killed after {self.deadline_s:.1f}s of wall time"
                    self._replace(worker, results, todo, Verdict.TIMEOUT, message)
        return [score for score in results if score is not None]

    def _replace(self, worker: _Worker, results: list[Score | None], todo: deque, verdict: Verdict, message: str) -> None:
        """Kill a stuck or dead worker, fail the prediction it was on, and requeue the rest."""
        index, submission = worker.queue.popleft()
        results[index] = _failure(submission, self.spec, verdict, message)
        rest = list(worker.queue)
        worker.queue.clear()
        worker.kill()
        replacement = _Worker(self.spec)
        replacement.wait_ready()
        self._workers[self._workers.index(worker)] = replacement
        if rest:
            replacement.assign(rest)
        elif todo:
            replacement.assign(todo.popleft())

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.connection.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
        self._workers = []

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def score_batch(
    submissions: Sequence[Submission],
    *,
    workers: int = 0,
    backend: str = "sqlite",
    reward: RewardConfig | None = None,
    limits: Limits | None = None,
    strict_gate: bool = False,
) -> list[Score]:
    """Score many predictions, in input order.

    ``workers=0`` scores in this process (fastest for small batches, with
    every sandbox limit but no hard kill); ``workers>=1`` scores in that many
    processes with a per-prediction wall-clock kill.
    """
    spec = ScorerSpec(backend, limits or Limits(), reward or RewardConfig(), strict_gate)
    if workers == 0:
        with spec.build() as scorer:
            return [scorer.score_submission(submission) for submission in submissions]
    with ScoringPool(spec, workers) as pool:
        return pool.map(submissions)

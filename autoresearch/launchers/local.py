"""Run each trial attempt in its own local process, forked from a preloaded fork server.

A separate process per trial means a crash, an out-of-memory kill or a hang
takes down that trial only. Starting ``python -m autoresearch trial`` for
every trial costs about a second of imports (optuna, SQLAlchemy, the reward
environment) before any work; a multiprocessing fork server imports them once
and forks a clean child per trial, which runs the same ``run_worker`` as that
command. Each child starts its own session, so Ctrl-C in the terminal reaches
the controller alone, which stops the workers and records why, and a kill
reaches everything the trial started.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import optuna

    from ..spec import StudySpec

# Optuna imports SQLAlchemy, Alembic and its RDB models lazily, on the first RDBStorage: name them so that the
# fork server pays for them once instead of every worker (about 1.5 s each on a small machine).
PRELOAD = ["autoresearch.worker", "sqlalchemy.orm", "alembic.migration", "alembic.script", "optuna.storages._rdb.models",
           "psycopg"]


@dataclass
class LocalWorker:
    """One running worker process and the trial it runs."""

    trial_id: int
    number: int
    proc: BaseProcess
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def exit_code(self) -> int | None:
        """None while running; negative for a signal, like ``subprocess``."""
        return self.proc.exitcode

    def kill(self, grace_s: float = 5.0) -> None:
        """SIGTERM the worker's process group, then SIGKILL it after ``grace_s``; reap it."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            self.proc.join(wait)
            if self.proc.exitcode is not None:
                break


def _worker_main(study_file: str, number: int, trainer_url: str | None, log_path: str) -> None:
    """The child: own session, output to the trial's log, then exactly what ``autoresearch trial`` does."""
    os.setsid()
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    from ..spec import load_spec
    from ..worker import run_worker

    sys.exit(run_worker(load_spec(study_file), number, trainer_url))


class LocalLauncher:
    """Forks trial workers from one fork server that has the worker code and the objective's module imported."""

    def __init__(self, spec: "StudySpec") -> None:
        self._spec = spec
        self._context: ForkServerContext = multiprocessing.get_context("forkserver")
        objective_module = spec.objective.partition(":")[0]
        importlib.import_module(objective_module)  # fail here, once, rather than in every worker
        self._context.set_forkserver_preload(PRELOAD + [objective_module])

    def launch(self, number: int, trial_id: int, trainer_url: str | None) -> LocalWorker:
        """Start the worker for trial ``number``; its stdout and stderr go to the trial folder's ``worker.log``."""
        log_path = self._spec.trial_dir(number) / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = self._context.Process(target=_worker_main, args=(str(self._spec.path), number, trainer_url, str(log_path)),
                                     name=f"trial-{number}", daemon=False)
        proc.start()
        return LocalWorker(trial_id, number, proc)

    def adopt(self, study: "optuna.Study") -> dict[int, LocalWorker]:
        """A local worker left by a killed controller is not our child: its trial is reaped through heartbeats."""
        return {}

    def wait_any(self, workers: Iterable[LocalWorker], timeout: float) -> None:
        """Block until some worker exits or ``timeout`` seconds pass, so the controller reacts at once to a finish."""
        sentinels = [worker.proc.sentinel for worker in workers]
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    def close(self) -> None:
        """The fork server exits on its own with the controller."""

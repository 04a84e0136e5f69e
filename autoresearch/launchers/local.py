"""Run each trial attempt in its own local process, forked from a preloaded fork server.

A separate process per trial means a crash, an out-of-memory kill or a hang
takes down that trial only. Starting ``python -m autoresearch trial`` for
every trial costs about a second of imports (optuna, SQLAlchemy, the reward
environment) before any work; a multiprocessing fork server imports them once
and forks a clean child per trial, which runs the same ``run_worker`` as that
command. While the controller waits, it forks spare children (as many as the
study runs in parallel) that open the study and wait for a trial number, so
a trial starts with no fork and no connection on the controller's path.

Each child starts its own session, so Ctrl-C in the terminal reaches the
controller alone, which stops the workers and records why, and a kill reaches
everything the trial started.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Iterable

from . import EXIT_CONFIG_ERROR

if TYPE_CHECKING:
    import optuna

    from ..spec import StudySpec

KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL when a worker is stopped
# Optuna imports SQLAlchemy, Alembic and its RDB models lazily, on the first RDBStorage: name them so that the
# fork server pays for them once instead of every worker (about 1.5 s each on a small machine). The models'
# module is private, and kept: no public module holds them (see worker.py).
PRELOAD = ["autoresearch.worker", "sqlalchemy.orm", "alembic.migration", "alembic.script", "optuna.storages._rdb.models",
           "psycopg"]


@dataclass
class LocalWorker:
    """One running worker process and the trial it runs."""

    trial_id: int
    number: int
    proc: BaseProcess
    started: float = field(default_factory=time.monotonic)
    reason: str | None = None  # the exit code says it all for a process
    _ended: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def exit_code(self) -> int | None:
        """None while running; negative for a signal, like ``subprocess``.

        Once the worker has exited, whatever it started and left behind (a
        crashed objective's children) is killed with it.
        """
        if self.proc.exitcode is not None and not self._ended:
            self._end()
        return self.proc.exitcode

    def kill(self) -> None:
        """SIGTERM the worker's process group, SIGKILL what is left of it after ``KILL_GRACE_S``; reap the worker."""
        self._signal_group(signal.SIGTERM)
        self.proc.join(KILL_GRACE_S)
        self._end()

    def _end(self) -> None:
        """SIGKILL the worker's group (a child that traps SIGTERM, or one a crashed worker left) and reap it."""
        self._signal_group(signal.SIGKILL)
        if self.proc.exitcode is None:  # not in its own group yet (forked, before setsid)
            self.proc.kill()
        self.proc.join()
        self._ended = True

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _die_with_controller(lifeline: Connection) -> None:
    """SIGKILL this worker once the controller is gone, however it went.

    Only the controller holds the lifeline's write end and never writes, so a
    read returns (EOF) when the controller exits. The worker's parent is the fork
    server, which outlives the controller while workers run, so a parent-death
    signal would not fire.
    """

    def watch() -> None:
        try:
            lifeline.recv_bytes()
        except EOFError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _worker_main(study_file: str, orders: Connection, lifeline: Connection | None) -> None:
    """The child: own session, the study opened, then (once told its trial) output to the trial's log and exactly
    what ``autoresearch trial`` does. A child the controller never needs reads EOF and exits."""
    os.setsid()
    if lifeline is not None:
        _die_with_controller(lifeline)
    from ..spec import SpecError, load_spec
    from ..worker import open_worker_study, run_worker

    try:  # the study file may have been edited since the controller read it
        spec, problem = load_spec(study_file), None
    except SpecError as error:
        spec, problem = None, str(error)
    try:
        opened = open_worker_study(spec) if spec else None
    except Exception:  # noqa: BLE001 - opened again once the trial is known, where the trial's log records the error
        opened = None
    try:
        number, trainer_url, log_path = orders.recv()
    except EOFError:
        return
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if spec is None:  # like ``autoresearch trial``: one line, and the code that fails the trial without a retry
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    sys.exit(run_worker(spec, number, trainer_url, opened))


@dataclass
class _Spare:
    """A forked child waiting for its trial on ``orders``."""

    proc: BaseProcess
    orders: Connection


class LocalLauncher:
    """Forks trial workers from one fork server that has the worker code and the objective's module imported."""

    def __init__(self, spec: "StudySpec") -> None:
        self._spec = spec
        self._context: ForkServerContext = multiprocessing.get_context("forkserver")
        objective_module = spec.objective.partition(":")[0]
        importlib.import_module(objective_module)  # fail here, once, rather than in every worker
        self._context.set_forkserver_preload(PRELOAD + [objective_module])
        # Workers of a study that trains on the controller's own service must not outlive it (see the module doc).
        self._lifeline = self._context.Pipe(duplex=False) if spec.training.api == "local" else None
        self._spares: list[_Spare] = []

    def _fork(self) -> _Spare:
        receive, send = self._context.Pipe(duplex=False)
        proc = self._context.Process(target=_worker_main, daemon=False,
                                     args=(str(self._spec.path), receive, self._lifeline[0] if self._lifeline else None))
        proc.start()
        receive.close()  # the child's copy stays open; ours would keep it from ever reading EOF
        return _Spare(proc, send)

    def launch(self, number: int, trial_id: int, trainer_url: str | None) -> LocalWorker:
        """Start the worker for trial ``number``; its stdout and stderr go to the trial folder's ``worker.log``."""
        log_path = self._spec.trial_dir(number) / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            spare = self._spares.pop() if self._spares else self._fork()
            try:
                spare.orders.send((number, trainer_url, str(log_path)))
                break
            except OSError:  # this spare died while it waited (killed from outside): take another
                spare.orders.close()
        spare.orders.close()
        return LocalWorker(trial_id, number, spare.proc)

    def adopt(self, study: "optuna.Study") -> dict[int, LocalWorker]:
        """A local worker left by a killed controller is not our child: its trial is reaped through heartbeats."""
        return {}

    def wait_any(self, workers: Iterable[LocalWorker], timeout: float) -> None:
        """Block until some worker exits or ``timeout`` seconds pass, so the controller reacts at once to a finish.

        First fork the spares the next launches take, one at a time while no worker has exited.
        """
        sentinels = [worker.proc.sentinel for worker in workers]
        while len(self._spares) < self._spec.budget.parallel:
            if sentinels and multiprocessing.connection.wait(sentinels, 0):
                return
            self._spares.append(self._fork())
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    def close(self) -> None:
        """Let the spares go (they read EOF and exit); the fork server exits on its own with the controller."""
        for spare in self._spares:
            spare.orders.close()
        for spare in self._spares:
            spare.proc.join(5)
            if spare.proc.exitcode is None:  # still stuck opening the storage
                spare.proc.kill()
                spare.proc.join()
        self._spares = []

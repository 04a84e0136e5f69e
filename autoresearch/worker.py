"""The worker: run one asked trial in its own process and tell the study how it ended.

A worker is started by a launcher with a trial number the controller already
asked for. It heartbeats while the objective runs, so that a controller can
tell a live worker from a lost one, copies the objective's latest step into
the storage for the controller's progress display, and records the trial's
outcome itself; if it dies before telling, the controller fails and retries
the trial.

A launcher may open the study before it knows the trial (:func:`open_worker_study`),
so that this part of a worker's start-up is off the controller's path.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping

import optuna
# Private, and kept: Optuna imports its ORM models only inside the first RDBStorage, and no public module holds
# them; importing them here lets configure_mappers below (and the fork server's preload) cover them.
import optuna.storages._rdb.models  # noqa: F401
import sqlalchemy.orm
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from .hacking import METRICS_FILE, hacking_evidence, read_curves
from .params import TrialParams, split_params
from .preflight import study_file_sha256
from .spec import StudySpec
from .study import STUDY_FILE_ATTR, make_storage, open_study

# Configured here, once, rather than by the first query of every worker (about 30 ms each): a fork server that
# imports this module hands configured ORM mappers to each worker it forks.
sqlalchemy.orm.configure_mappers()


class Periodic:
    """Call ``action`` every ``interval`` seconds on a daemon thread, from entering the block to leaving it.

    One failed call (a locked SQLite file) is printed and does not end the thread: the next may succeed.
    """

    def __init__(self, name: str, action: Callable[[], None], interval: float) -> None:
        self._action, self._interval = action, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _run(self) -> None:
        while True:
            self._call()
            if self._stop.wait(self._interval):
                self._call()  # once more on leaving, so what it records is the block's end, not up to an interval old
                return

    def _call(self) -> None:
        try:
            self._action()
        except SQLAlchemyError as error:
            print(f"{self._thread.name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Periodic":
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


def heartbeat(storage: RDBStorage, trial_id: int, interval: float) -> Periodic:
    """Record the trial's heartbeat every ``interval`` seconds while the block runs."""
    return Periodic("heartbeat", lambda: storage.record_heartbeat(trial_id), interval)


PROGRESS_ATTR = "progress"
"""The trial's latest training step (see :func:`step_progress`), for the controller's live progress display."""
PROGRESS_S = 1.0
"""How often a worker copies its trial's progress into the storage: an SFT step of the tiny study takes 0.3 s."""


def step_progress(point: dict[str, Any], sft_steps: int, rl_steps: int) -> dict[str, Any]:
    """Where a ``metrics.jsonl`` point leaves the trial: its phase (``sft`` or ``rl``), the steps of that phase
    done and planned (``step``, ``of``), and of the whole trial (``done``, ``total``).

    An evaluation point counts towards the training phase it follows: ``untrained`` is step 0 of the first,
    ``sft_eval`` step 0 of RL, an ``eval`` point the RL step it ran after.
    """
    phase, step = point["phase"], int(point["step"])
    if phase in ("sft", "rl"):  # a training point's step counts from 0
        step += 1
    elif phase == "untrained":
        phase, step = ("sft" if sft_steps else "rl"), 0
    else:  # sft_eval, eval
        phase = "rl"
    done = step if phase == "sft" else sft_steps + step
    return {"phase": phase, "step": step, "of": sft_steps if phase == "sft" else rl_steps,
            "done": done, "total": sft_steps + rl_steps}


class ProgressMirror:
    """Copies the latest point of the trial's ``metrics.jsonl`` into its ``progress`` user attr when it changed.

    The worker runs where the objective writes the file (a trial pod, on a cluster), and the storage is what
    the controller reads, so progress reaches it from wherever the trial runs. Only the lines added since the
    last look are read; a file that shrank (a new attempt of the same trial rewrote it) is read from the start.
    """

    def __init__(self, storage: RDBStorage, trial_id: int, path: Path, params: Mapping[str, Any]) -> None:
        defaults = TrialParams()
        self._steps = int(params.get("sft_steps", defaults.sft_steps)), int(params.get("rl_steps", defaults.rl_steps))
        self._storage, self._trial_id, self._path = storage, trial_id, path
        self._offset = 0
        self._last: dict[str, Any] | None = None

    def copy(self) -> None:
        try:
            with open(self._path, "rb") as metrics:
                if metrics.seek(0, 2) < self._offset:
                    self._offset = 0
                metrics.seek(self._offset)
                chunk = metrics.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self._offset += len(complete)
        points = [json.loads(line) for line in complete.splitlines() if line.strip()]
        if not points:
            return
        progress = step_progress(points[-1], *self._steps)
        if progress != self._last:
            self._storage.set_trial_user_attr(self._trial_id, PROGRESS_ATTR, progress)
            self._last = progress


def objective_value(result: float | Mapping[str, Any]) -> float:
    """An objective returns the held-out accuracy, or a metrics dict that holds it under ``objective``."""
    return float(result["objective"] if isinstance(result, Mapping) else result)


@dataclass(frozen=True)
class OpenedStudy:
    """A worker's storage and study, which need no trial number."""

    storage: RDBStorage
    study: optuna.Study


def open_worker_study(spec: StudySpec) -> OpenedStudy:
    storage = make_storage(spec, schema_checked=True)
    return OpenedStudy(storage, open_study(spec, storage))


def run_worker(spec: StudySpec, number: int, trainer_url: str | None = None, opened: OpenedStudy | None = None) -> int:
    """Run trial ``number`` of the spec's study; return the process exit code (0 unless the objective failed)."""
    opened = opened or open_worker_study(spec)
    storage, study = opened.storage, opened.study
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(spec.name), number)
    trial = optuna.Trial(study, trial_id)
    frozen = storage.get_trial(trial_id)
    params = {**spec.fixed, **frozen.params}
    reward = split_params(params)[1]
    run_dir = spec.trial_dir(number)
    run_dir.mkdir(parents=True, exist_ok=True)
    for key, value in {
        # A trial the controller enqueued from a proposal already names its proposer.
        "proposer": frozen.user_attrs.get("proposer", "sampler"),
        "reward_config": reward.to_dict(),
        "fixed_params": spec.fixed,
        "retry_count": len(RetryHeartbeatStaleTrialCallback.retry_history(frozen)),
        "failure_reason": None,
        "run_dir": str(run_dir),
        # The file this worker loaded (a trial pod's is the image's copy): ``status`` flags trials run under another.
        STUDY_FILE_ATTR: study_file_sha256(spec),
    }.items():
        trial.set_user_attr(key, value)
    objective = spec.load_objective()
    started = time.monotonic()
    mirror = ProgressMirror(storage, trial_id, run_dir / METRICS_FILE, params)
    with heartbeat(storage, trial_id, spec.heartbeat.interval_s):
        # The mirror stops with the objective, before the trial is told: a finished trial takes no more attrs.
        with Periodic("progress", mirror.copy, PROGRESS_S):
            try:
                result = objective(
                    params, trainer_url=trainer_url, api_key=spec.training.api_key,
                    base_model=None if spec.training.api == "local" else spec.training.base_model,
                    dataset=spec.dataset, run_dir=run_dir, optuna_trial=trial, artifact_dir=spec.artifact_dir,
                )
                value, state = objective_value(result), TrialState.COMPLETE
            except optuna.TrialPruned:
                value, state = None, TrialState.PRUNED
            except Exception as error:  # noqa: BLE001 - any objective failure becomes a FAIL with its reason
                (run_dir / "error.txt").write_text(traceback.format_exc())
                trial.set_user_attr("failure_reason", f"{type(error).__name__}: {error}")
                value, state = None, TrialState.FAIL
        trial.set_user_attr("wall_seconds", round(time.monotonic() - started, 3))
        if state != TrialState.FAIL:  # the evidence, or None: shown in optuna-dashboard and the report
            trial.set_user_attr("reward_hacking", hacking_evidence(read_curves(run_dir)))
        study.tell(number, value, state=state)
    return 1 if state == TrialState.FAIL else 0

"""The worker: run one asked trial in its own process and tell the study how it ended.

A worker is started by a launcher with a trial number the controller already
asked for. It heartbeats while the objective runs, so that a controller can
tell a live worker from a lost one, copies what the objective writes in the
trial folder into the study's storage (its progress and curves as it goes, its
wrong predictions and files at the end: recording.py), and records the trial's
outcome itself; if it dies before telling, the controller fails and retries
the trial.

A launcher may open the study before it knows the trial (:func:`open_worker_study`),
so that this part of a worker's start-up is off the controller's path.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass
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

from .hacking import curves_of, hacking_evidence
from .params import split_params
from .preflight import study_file_sha256
from .recording import ERROR, METRICS, OUTPUT_ATTRS, PROGRESS_S, MetricsMirror, keep_outputs
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
        # Relative to the run folder: the trial's files are its own folder's wherever the folder is (and in the
        # study's artifact store); nothing reads them through this path.
        "trial_dir": run_dir.relative_to(spec.run_folder).as_posix(),
        # The file this worker loaded (a trial pod's is the image's copy): ``status`` flags trials run under another.
        STUDY_FILE_ATTR: study_file_sha256(spec),
        **{key: None for key in OUTPUT_ATTRS if key in frozen.user_attrs},
    }.items():
        trial.set_user_attr(key, value)
    objective = spec.load_objective()
    started = time.monotonic()
    mirror = MetricsMirror(storage, trial_id, run_dir / METRICS, params)
    with heartbeat(storage, trial_id, spec.heartbeat.interval_s):
        # The mirror stops with the objective, before the trial is told: a finished trial takes no more attrs.
        with Periodic("progress", mirror.copy, PROGRESS_S):
            try:
                result = objective(
                    params, trainer_url=trainer_url, api_key=spec.training.api_key,
                    base_model=None if spec.training.api == "local" else spec.training.base_model,
                    dataset=spec.dataset, run_dir=run_dir, optuna_trial=trial,
                )
                value, state = objective_value(result), TrialState.COMPLETE
            except optuna.TrialPruned:
                value, state = None, TrialState.PRUNED
            except Exception as error:  # noqa: BLE001 - any objective failure becomes a FAIL with its reason
                (run_dir / ERROR).write_text(traceback.format_exc())
                trial.set_user_attr("failure_reason", f"{type(error).__name__}: {error}")
                value, state = None, TrialState.FAIL
        trial.set_user_attr("wall_seconds", round(time.monotonic() - started, 3))
        keep_outputs(trial, spec, run_dir)
        if state != TrialState.FAIL:  # the evidence, or None: shown in optuna-dashboard and the report
            trial.set_user_attr("reward_hacking", hacking_evidence(curves_of(mirror.points)))
        study.tell(number, value, state=state)
    return 1 if state == TrialState.FAIL else 0

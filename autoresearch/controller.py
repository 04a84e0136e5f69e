"""The controller: the one process that owns a study's budget, asks for trials and reaps lost ones.

Only the controller asks (and, through retries, enqueues) trials, so the
budget cannot be overrun by racing workers. Workers tell. The budget counts
settled trials (COMPLETE, PRUNED, and FAIL with no retry after it) plus those
in flight, all read back from storage, so running the controller again after
a crash or Ctrl-C continues the same study without repeating or losing trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from typing import Any, Iterator

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from .launchers import EXIT_CONFIG_ERROR, EXIT_TIMEOUT, TrialWorker, make_launcher
from .params import distributions
from .proposers import make_scheduler
from .reaping import adopt_running, fail_trial, reap_stale
from .review import record_study_context, write_trial_note
from .spec import StudySpec
from .study import Tally, make_storage, open_study, record_study_file, retry_failed_trials, tally
from .trainer_service import TrainerService, start_trainer
from .recording import PROGRESS_ATTR

PROGRESS_S = 1.0
"""How often the controller reads its running trials' progress (the workers copy it about this often)."""


class RunObserver:
    """What the controller tells while it runs a study; this one hears it and says nothing (a study run from
    code), ``autoresearch run`` prints it (console.py)."""

    def tally(self, state: Tally, budget: int) -> None:
        """Where the study stands, after each look at the storage."""

    def started(self, trial: FrozenTrial) -> None:
        """A trial was asked and its worker is being launched; ``trial`` has its params and proposer attrs."""

    def progress(self, number: int, progress: dict[str, Any]) -> None:
        """A running trial's latest step, as its worker recorded it (``recording.step_progress``)."""

    def ended(self, trial: FrozenTrial) -> None:
        """A trial's worker is gone and the trial settled: COMPLETE, PRUNED or FAIL with ``failure_reason``."""

    def notify(self, message: str) -> None:
        """A one-line warning: the study file changed, nothing is left to run."""


@contextlib.contextmanager
def _trainer(spec: StudySpec) -> Iterator[str | None]:
    """The training API URL the workers use: started here for ``local``, given, or none."""
    if spec.training.api == "none":
        yield None
    elif spec.training.api != "local":
        from .trial.service_routes import check_service

        # Once, before any trial is asked: a dead URL or a refused key would fail every trial and spend the budget.
        check_service(spec.training.api, spec.training.api_key, fix="start it or fix [training] api in the study file")
        yield spec.training.api
    else:
        service: TrainerService = start_trainer(spec)
        try:
            yield service.url
        finally:
            service.stop()


class ControllerBusy(RuntimeError):
    """Another controller already runs this study from this run folder."""


@contextlib.contextmanager
def _sole_controller(spec: StudySpec) -> Iterator[None]:
    """Hold an exclusive lock on the run folder: two controllers would both ask trials and overrun the budget.

    The kernel drops the lock when the process dies, however it dies, so a
    killed controller never blocks the next ``autoresearch run``.
    """
    spec.run_folder.mkdir(parents=True, exist_ok=True)
    with open(spec.run_folder / "controller.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ControllerBusy(f"another controller (pid {lock.read().strip() or '?'}) is running study "
                                 f"{spec.name!r} from {spec.run_folder}") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_study(spec: StudySpec, *, n_trials: int | None = None, observer: RunObserver | None = None, poll_s: float = 0.5,
              retry_failed: bool = False) -> Tally:
    """Run trials until ``n_trials`` (default: the spec's budget) are settled; return the final tally.

    SIGTERM is handled like Ctrl-C: workers are stopped and their trials fail
    with reason ``interrupted`` and are queued again for the next run.
    ``retry_failed`` first queues every failed trial (one no retry follows) again
    with its parameters, so that it no longer counts towards the budget.
    ``observer`` hears of every trial that starts, progresses and ends, and
    gets one-line warnings: the study file changed since earlier trials ran,
    nothing is left to run. When nothing is left to run (no trial waiting or
    running, the budget spent), no training service is started.
    """
    with _sole_controller(spec):
        return _run(spec, n_trials or spec.budget.n_trials, observer or RunObserver(), poll_s, retry_failed)


def _run(spec: StudySpec, budget: int, observer: RunObserver, poll_s: float, retry_failed: bool) -> Tally:
    storage = make_storage(spec)
    study = open_study(spec, storage, create=True)
    space = distributions(spec)
    record_study_context(study, spec, space)
    changed = record_study_file(study, spec)
    if changed:
        observer.notify(changed)
    if retry_failed:
        retried = retry_failed_trials(study)
        observer.notify(f"queued {len(retried)} failed trial(s) again: {', '.join(f'#{n}' for n in retried)}"
                        if retried else "--retry-failed: no failed trial to queue again")
    state = tally(study)
    if state.waiting == 0 and state.running == 0 and state.settled >= budget:
        observer.tally(state, budget)
        observer.notify(f"nothing left to run: {state.settled} of {budget} trials settled")
        return state
    scheduler = make_scheduler(spec, study, space)
    study_id = storage.get_study_id_from_name(spec.name)
    launcher = make_launcher(spec)
    workers: dict[int, TrialWorker] = {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        workers.update(launcher.adopt(study))
        adopt_running(study, study_id, storage)
        with _trainer(spec) as trainer_url:
            state, last_look, last_reap, last_progress = None, 0.0, 0.0, 0.0
            while True:
                exited = _reap_finished(study, storage, spec, workers, observer)
                if time.monotonic() - last_progress > PROGRESS_S:
                    _show_progress(storage, workers, observer)
                    last_progress = time.monotonic()
                # Reading the trials back is the controller's main cost: do it when one of our workers ended, after
                # a launch, or once per heartbeat interval; reap trials of other controllers only once per interval.
                if state is None or exited or time.monotonic() - last_look > spec.heartbeat.interval_s:
                    if time.monotonic() - last_reap > spec.heartbeat.interval_s:
                        reap_stale(study, study_id, storage, spec, owned=set(workers))
                        last_reap = time.monotonic()
                    state, last_look = tally(study), time.monotonic()
                    observer.tally(state, budget)
                    free = min(spec.budget.parallel - state.running, budget - state.settled - state.running)
                    # Wait for our workers to be gone too: a Job can complete a moment after its trial told.
                    if free <= 0 and state.running == 0 and not workers:
                        return state
                    for _ in range(max(free, 0)):
                        number = scheduler.ask()
                        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
                        # A first heartbeat now: should this controller die before the worker beats, the trial still goes stale.
                        storage.record_heartbeat(trial_id)
                        observer.started(write_trial_note(study, storage, trial_id))
                        workers[trial_id] = launcher.launch(number, trial_id, trainer_url)
                        state = None
                launcher.wait_any(workers.values(), poll_s)
    except KeyboardInterrupt:
        for worker in workers.values():
            worker.kill()
            fail_trial(study, storage, spec, worker.trial_id, "interrupted", retry=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        launcher.close()


def _show_progress(storage: RDBStorage, workers: dict[int, TrialWorker], observer: RunObserver) -> None:
    """Hand the observer each running trial's latest step, which its worker copies into the storage."""
    for trial_id, worker in workers.items():
        progress = storage.get_trial(trial_id).user_attrs.get(PROGRESS_ATTR)
        if progress:
            observer.progress(worker.number, progress)


def _reap_finished(study: optuna.Study, storage: RDBStorage, spec: StudySpec, workers: dict[int, TrialWorker],
                   observer: RunObserver) -> bool:
    """Forget workers that exited, failing their trial if they did not tell; kill those past the timeout.

    Returns whether any worker went away; the observer hears how each one's trial ended.
    """
    before = len(workers)
    for trial_id, worker in list(workers.items()):
        code = worker.exit_code()
        if code is None and worker.elapsed() > spec.budget.timeout_s:
            worker.kill()
            fail_trial(study, storage, spec, trial_id, f"timeout: killed after {spec.budget.timeout_s:g} s", retry=False)
        elif code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if worker.reason:
                how += f" ({worker.reason})"
            # A configuration error or a deadline would end every attempt the same way: fail the trial for good.
            final = {EXIT_CONFIG_ERROR: "a configuration error", EXIT_TIMEOUT: "past its deadline"}.get(code)
            fail_trial(study, storage, spec, trial_id, f"worker {how} before finishing its trial"
                       + (f"; {final}, not retried" if final else ""), retry=final is None)
        else:
            continue
        del workers[trial_id]
        observer.ended(storage.get_trial(trial_id))
    return len(workers) < before

"""Fail trials whose worker is gone, with a reason, and queue a retry.

Optuna's own heartbeat reaping only runs inside ``Study.optimize``; our
controller asks and workers tell, so the controller reaps: immediately when
one of its worker processes exits without finishing its trial, and through
the heartbeat table for trials whose worker it does not know (one left behind
by a controller that was killed).
"""

from __future__ import annotations

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from .spec import StudySpec
from .study import retry_callback


def fail_trial(study: optuna.Study, storage: RDBStorage, spec: StudySpec, trial_id: int, reason: str, *, retry: bool) -> bool:
    """Mark a RUNNING trial FAIL with ``failure_reason``; enqueue its params again when ``retry``.

    Returns False when the trial had already finished (its worker told first).
    The retry goes through Optuna's RetryHeartbeatStaleTrialCallback, so the chain
    (``failed_trial``, ``retry_history``) and the retry limit are Optuna's.
    """
    before = storage.get_trial(trial_id)
    if before.state != TrialState.RUNNING:
        return False
    try:
        storage.set_trial_user_attr(trial_id, "failure_reason", reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if retry:
        retry_callback(spec)(study, before)
    return True


def reap_stale(study: optuna.Study, study_id: int, storage: RDBStorage, spec: StudySpec, owned: set[int]) -> list[int]:
    """Fail and retry RUNNING trials, not run by this controller, whose heartbeat is older than the grace period."""
    # Private, and kept: RDBStorage has no public "stale trials" query. The public optuna.storages.fail_stale_trials
    # (which runs this same query) would also fail the trials of our own workers, whose liveness this controller
    # knows better than their heartbeat (a Job waiting in a Kueue queue has not beaten yet), and records no reason.
    stale = [i for i in storage._get_stale_trial_ids(study_id) if i not in owned]
    reason = f"worker lost: no heartbeat for {spec.heartbeat.grace_s} s"
    return [i for i in stale if fail_trial(study, storage, spec, i, reason, retry=True)]


def adopt_running(study: optuna.Study, study_id: int, storage: RDBStorage) -> None:
    """Beat once for every RUNNING trial an earlier controller left behind.

    A controller killed between asking a trial and recording its first
    heartbeat leaves a RUNNING trial with no heartbeat at all, which Optuna
    never counts as stale. After this beat it goes stale like any lost trial;
    a live orphaned worker keeps beating and finishes its trial undisturbed.
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))

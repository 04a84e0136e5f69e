"""Open a spec's Optuna study, and the bookkeeping every command shares: budget and tallies.

The controller, the workers and the read-only commands (status, report, best)
all open the study through :func:`open_study`, so they agree on storage,
heartbeat, sampler and pruner.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

from .spec import StudySpec

# Heartbeats and the retry callback are marked experimental, and Optuna warns that heartbeats are meant for
# Study.optimize: our controller reaps for itself (see reaping.py), so these warnings say nothing to a user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(spec: StudySpec, *, schema_checked: bool = False) -> RDBStorage:
    """RDB storage with heartbeats on, so a lost worker's trial can be found and retried.

    ``schema_checked``: the controller already created and version-checked the
    tables, so a worker skips that (it costs a worker more than its bookkeeping).
    """
    url = spec.storage_url
    sqlite = url.startswith("sqlite")
    if sqlite:
        spec.run_folder.mkdir(parents=True, exist_ok=True)
    # Several worker processes write to one SQLite file: wait for the lock instead of failing.
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    storage = RDBStorage(
        url,
        engine_kwargs=kwargs,
        heartbeat_interval=spec.heartbeat.interval_s,
        grace_period=spec.heartbeat.grace_s,
        heartbeat_stale_trial_callback=retry_callback(spec),
        skip_compatibility_check=schema_checked,
        skip_table_creation=schema_checked,
    )
    if sqlite:
        event.listen(storage.engine, "connect", _sqlite_for_many_writers)
        storage.engine.dispose()
    return storage


def _sqlite_for_many_writers(connection: Any, record: Any) -> None:
    """WAL lets the controller read while workers write; with NORMAL sync a killed process loses nothing
    (only a power cut can drop the last commits, never corrupt the file)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def retry_callback(spec: StudySpec) -> RetryHeartbeatStaleTrialCallback:
    return RetryHeartbeatStaleTrialCallback(max_retry=spec.budget.max_retries)


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The sampler, pinned (seed and TPE flags explicit) so studies stay comparable across Optuna versions."""
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler.seed)
    return optuna.samplers.TPESampler(
        seed=spec.sampler.seed, multivariate=True, constant_liar=True, n_startup_trials=spec.sampler.n_startup_trials
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if p.type == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(n_startup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, storage: RDBStorage | None = None, *, create: bool = False) -> optuna.Study:
    """Load the study (creating it when ``create``); raise KeyError if it does not exist."""
    storage = storage or make_storage(spec)
    if create:
        return optuna.create_study(
            study_name=spec.name, storage=storage, direction=spec.direction,
            sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True,
        )
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec))


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


@dataclass(frozen=True)
class Tally:
    """Where a study stands; ``settled`` is what the budget counts."""

    waiting: int
    running: int
    complete: int
    pruned: int
    failed: int
    failed_final: int
    best: float | None

    @property
    def settled(self) -> int:
        return self.complete + self.pruned + self.failed_final


def tally(study: optuna.Study) -> Tally:
    """Count trials by state; a FAIL counts towards the budget only once no retry follows it."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = by_state[TrialState.COMPLETE]
    return Tally(
        waiting=len(by_state[TrialState.WAITING]),
        running=len(by_state[TrialState.RUNNING]),
        complete=len(complete),
        pruned=len(by_state[TrialState.PRUNED]),
        failed=len(by_state[TrialState.FAIL]),
        failed_final=sum(t.number not in retried for t in by_state[TrialState.FAIL]),
        best=max((t.value for t in complete if t.value is not None), default=None),
    )


STUDY_FILE_ATTR = "study_file_sha256"
"""The study's user attr (and each trial's) holding the SHA-256 of the study file it ran under."""
STUDY_FILE_HISTORY_ATTR = "study_file_history"
"""Every version of the study file the study ran under: ``{"sha256", "first_trial", "path"}``, oldest first."""


def record_study_file(study: optuna.Study, spec: StudySpec) -> str | None:
    """Record the study file's hash on the study; a warning line when it differs from the one earlier trials ran under.

    An edited study file is reported, not refused: fixing a typo and continuing must stay possible. Trials
    settled before the edit are not rerun; each trial records the hash it ran under (see the worker), so
    ``status`` tells which ran under an earlier version.
    """
    from .preflight import study_file_sha256

    digest = study_file_sha256(spec)
    history = list(study.user_attrs.get(STUDY_FILE_HISTORY_ATTR, []))
    previous = study.user_attrs.get(STUDY_FILE_ATTR)
    if previous == digest:
        return None
    n_trials = len(study.get_trials(deepcopy=False))
    since = history[-1]["first_trial"] if history else 0
    history.append({"sha256": digest, "first_trial": n_trials, "path": str(spec.path)})
    study.set_user_attr(STUDY_FILE_ATTR, digest)
    study.set_user_attr(STUDY_FILE_HISTORY_ATTR, history)
    if previous is None or n_trials <= since:
        return None
    return (f"{spec.path} changed since trials {since}-{n_trials - 1} of study {spec.name!r} ran (sha256 {previous[:12]} then, "
            f"{digest[:12]} now): those trials are kept as they are, and compare with new ones only if the edit "
            "left the search, dataset and training alone")


def retry_failed_trials(study: optuna.Study) -> list[int]:
    """Queue every failed trial that no retry follows again, with its parameters; the numbers queued.

    The new trial names the failed one as Optuna's retry callbacks do (``failed_trial``, ``retry_history``),
    so the failed trial stops counting towards the budget; its history starts afresh, so the new trial gets
    ``budget.max_retries`` retries of its own should its worker be lost.
    """
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    queued = []
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried:
            continue
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={k: v for k, v in trial.user_attrs.items() if k in ("proposer", "proposer_model", "rationale")},
            system_attrs={"failed_trial": trial.number, "retry_history": [trial.number]},
        ))
        queued.append(trial.number)
    return queued

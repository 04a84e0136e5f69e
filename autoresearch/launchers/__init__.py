"""Launchers start one worker per trial attempt: a local process now, a Kubernetes Job with ``launcher = "kubernetes"``.

The controller sees only these two protocols, so it schedules, times out and
reaps trials the same way whatever runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol

if TYPE_CHECKING:
    import optuna

    from ..spec import StudySpec


# ``autoresearch trial`` exits 2 for a bad study file or bad arguments (the CLI's usage code): another attempt
# would fail the same way, so such a trial is failed without a retry.
EXIT_CONFIG_ERROR = 2
# An attempt that ran past its deadline (the code of timeout(1)) is failed for good, like the controller's own
# per-trial timeout: another attempt would take as long.
EXIT_TIMEOUT = 124


class TrialWorker(Protocol):
    """One running attempt of one trial."""

    trial_id: int
    number: int
    reason: str | None  # why it ended, when the launcher knows more than the exit code (a Job's condition)

    def elapsed(self) -> float:
        """Seconds since the attempt was launched (the per-trial timeout counts these)."""

    def exit_code(self) -> int | None:
        """None while running; 0 when the worker ended normally; non-zero (negative for a signal) otherwise."""

    def kill(self) -> None:
        """Stop the attempt and everything it started; return once it is gone."""


class Launcher(Protocol):
    def launch(self, number: int, trial_id: int, trainer_url: str | None) -> TrialWorker:
        """Start the worker for trial ``number`` (already asked by the controller)."""

    def adopt(self, study: "optuna.Study") -> dict[int, TrialWorker]:
        """Workers of RUNNING trials that an earlier controller launched and that still run, by trial id.

        A launcher that cannot find such workers again returns none: their trials
        then go stale and are retried through the heartbeat table.
        """

    def wait_any(self, workers: Iterable[TrialWorker], timeout: float) -> None:
        """Block until some worker may have ended, or ``timeout`` seconds pass."""

    def close(self) -> None:
        """Release what the launcher holds (connections, servers); running workers are not touched."""


def make_launcher(spec: "StudySpec") -> Launcher:
    """The launcher the study file names."""
    if spec.launcher == "kubernetes":
        from .kubernetes import KubernetesLauncher

        return KubernetesLauncher(spec)
    from .local import LocalLauncher

    return LocalLauncher(spec)

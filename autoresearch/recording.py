"""What a worker copies from its trial's folder into the study's storage, so that nothing is only in the folder.

The worker runs where the objective writes its files (a trial pod, on a
cluster), and the study's storage is what the controller, the report, the
proposer and the dashboard read. So, from the folder's ``metrics.jsonl``, it
keeps the trial's live ``progress`` and its ``curves`` (the training reward
and held-out accuracy that the reward-hacking check and the LLM read) in user
attrs while the trial runs; when the objective ends it records a few of the
held-out examples the trial got wrong (``wrong_predictions``, for the LLM) and
uploads the folder's files to the study's artifact store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.storages import RDBStorage

from .artifacts import open_artifact_store, upload_files
from .hacking import CURVES_ATTR, curves_attr, curves_of
from .params import TrialParams
from .spec import StudySpec

METRICS, PREDICTIONS, LEARNING_CURVE, ERROR = "metrics.jsonl", "predictions.jsonl", "learning_curve.png", "error.txt"
"""The files of a trial's folder: its points, its latest evaluation's predictions (one JSON row per held-out
example), its plot (trial/outputs.py writes all three) and a failed objective's traceback (the worker's)."""
TRIAL_FILES = (METRICS, PREDICTIONS, LEARNING_CURVE, ERROR)
PROGRESS_ATTR = "progress"
"""The trial's latest training step (see :func:`step_progress`), for the controller's live progress display."""
PROGRESS_S = 1.0
"""How often a worker copies its trial's progress into the storage: an SFT step of the tiny study takes 0.3 s."""
WRONG_PREDICTIONS_ATTR = "wrong_predictions"
WRONG_PREDICTIONS = 3
PREDICTION_CHARS = 2000
"""How many wrong held-out answers a trial keeps in the storage, each field cut to this many characters: the LLM
is shown at most ``quote_chars`` of each, and a user attr is no place for a whole predictions file."""
ARTIFACTS_ERROR_ATTR = "artifacts_error"
OUTPUT_ATTRS = (CURVES_ATTR, WRONG_PREDICTIONS_ATTR, ARTIFACTS_ERROR_ATTR)
"""What the worker records of a trial's outputs: a retry inherits its trial's user attrs, and its worker clears
these first, so that what it shows is its own."""


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


class MetricsMirror:
    """Copies the trial's ``metrics.jsonl`` into its ``progress`` (the latest point) and ``curves`` user attrs
    when they changed.

    Only the lines added since the last look are read; a file that shrank (a new attempt of the same trial
    rewrote it) is read from the start. Being in the storage as the trial goes, the curves of a worker that
    dies are kept up to its last look.
    """

    def __init__(self, storage: RDBStorage, trial_id: int, path: Path, params: Mapping[str, Any]) -> None:
        defaults = TrialParams()
        self._steps = int(params.get("sft_steps", defaults.sft_steps)), int(params.get("rl_steps", defaults.rl_steps))
        self._storage, self._trial_id, self._path = storage, trial_id, path
        self._offset = 0
        self.points: list[dict[str, Any]] = []
        self._recorded: dict[str, Any] = {}

    def copy(self) -> None:
        try:
            with open(self._path, "rb") as metrics:
                if metrics.seek(0, 2) < self._offset:
                    self._offset, self.points = 0, []
                metrics.seek(self._offset)
                chunk = metrics.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self._offset += len(complete)
        self.points += [point for point in map(_point, complete.splitlines()) if point is not None]
        if self.points:
            self._record(PROGRESS_ATTR, step_progress(self.points[-1], *self._steps))
            self._record(CURVES_ATTR, curves_attr(curves_of(self.points)))

    def _record(self, key: str, value: Any) -> None:
        if self._recorded.get(key) != value:
            self._storage.set_trial_user_attr(self._trial_id, key, value)
            self._recorded[key] = value


def _point(line: bytes) -> dict[str, Any] | None:
    """A metrics line's point; None for a blank or unreadable line, which must not stop the mirror's thread
    (the objective writes the file, and whatever it writes, the curves before and after it count)."""
    try:
        point = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return point if isinstance(point, dict) and "phase" in point and "step" in point else None


def wrong_predictions(path: Path) -> list[dict[str, str]]:
    """The first held-out examples the predictions file shows wrong (a broken gold is no mistake of the model)."""
    rows: list[dict[str, str]] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed trial
        if row.get("verdict") not in ("match", "gold_error"):
            rows.append({key: str(row.get(key, ""))[:PREDICTION_CHARS] for key in ("question", "prediction", "verdict")})
        if len(rows) == WRONG_PREDICTIONS:
            break
    return rows


def keep_outputs(trial: optuna.Trial, spec: StudySpec, run_dir: Path) -> None:
    """Record the trial's wrong predictions and upload its folder's files to the study's artifact store, while
    the trial still runs (Optuna takes neither once it is told). A store that fails does not fail the trial,
    whose result is in the storage already; the reason is printed and kept as ``artifacts_error``."""
    wrong = wrong_predictions(run_dir / PREDICTIONS)
    if wrong:
        trial.set_user_attr(WRONG_PREDICTIONS_ATTR, wrong)
    try:
        upload_files(open_artifact_store(spec), [run_dir / name for name in TRIAL_FILES], trial)
    except Exception as error:  # noqa: BLE001 - a bucket's SDK raises its own errors (permissions, network)
        reason = f"{type(error).__name__}: {error}"
        print(f"trial {trial.number}: its files did not reach the artifact store: {reason}", file=sys.stderr, flush=True)
        trial.set_user_attr(ARTIFACTS_ERROR_ATTR, reason)

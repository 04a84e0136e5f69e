"""What a trial leaves in its folder (``metrics.jsonl``, ``predictions.jsonl``, ``learning_curve.png``) and
uploads to the study's artifact store for optuna-dashboard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from ..plots import pyplot

METRICS, PREDICTIONS, LEARNING_CURVE = "metrics.jsonl", "predictions.jsonl", "learning_curve.png"


class MetricsLog:
    """The trial's points, each appended to ``metrics.jsonl`` and flushed as it is recorded, so that a killed
    trial's curves are still there to read (``hacking.read_curves`` reads them)."""

    def __init__(self, run_dir: Path, started: float) -> None:
        """``started``: the trial's ``time.monotonic()`` start, from which each point's ``seconds`` count."""
        self.points: list[dict[str, Any]] = []
        self._started = started
        self._file = open(run_dir / METRICS, "w")

    def record(self, point: dict[str, Any]) -> None:
        point["seconds"] = round(time.monotonic() - self._started, 3)
        self.points.append(point)
        self._file.write(json.dumps(point) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_predictions(run_dir: Path, rows: Iterable[dict[str, Any]]) -> None:
    """The latest evaluation's predictions, one JSON row per held-out example."""
    with open(run_dir / PREDICTIONS, "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)


def learning_curve(points: list[dict[str, Any]], path: Path) -> None:
    """Training reward per RL step and held-out accuracy (after the warm-up, then during RL) on one plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rl = [p for p in points if p["phase"] == "rl"]
    if rl:
        ax.plot([p["step"] for p in rl], [p["reward_mean"] for p in rl], label="train reward (mean)")
    evals = [p for p in points if "eval_execution_accuracy" in p]
    ax.plot([p["step"] for p in evals], [p["eval_execution_accuracy"] for p in evals], marker="o", label="held-out accuracy")
    ax.set(xlabel="RL step", title="Learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def upload(trial: optuna.Trial, artifact_dir: Path, run_dir: Path) -> None:
    """Attach the trial's outputs to it in the study's artifact store, so optuna-dashboard shows them."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(artifact_dir)
    for name in (METRICS, LEARNING_CURVE, PREDICTIONS):
        if (run_dir / name).exists():
            upload_artifact(artifact_store=store, file_path=str(run_dir / name), study_or_trial=trial)

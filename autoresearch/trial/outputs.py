"""What a trial leaves in its folder: ``metrics.jsonl``, ``predictions.jsonl`` and ``learning_curve.png``.

In a study, the worker copies them into the study's storage and artifact store (autoresearch/recording.py),
so the folder may be a trial pod's, gone with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterable

from ..plots import integer_ticks, pyplot
from ..recording import LEARNING_CURVE, METRICS, PREDICTIONS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["LEARNING_CURVE", "METRICS", "PREDICTIONS", "MetricsLog", "draw_learning_curve", "learning_curve",
           "write_predictions"]


class MetricsLog:
    """The trial's points, each appended to ``metrics.jsonl`` and flushed as it is recorded, so that a killed
    trial's points are still there (the worker mirrors them into the storage as they come)."""

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


def draw_learning_curve(points: list[dict[str, Any]]) -> "Axes":
    """Training reward per RL step and held-out accuracy (after the warm-up, then during RL) on one plot."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    rl = [p for p in points if p["phase"] == "rl"]
    if rl:
        ax.plot([p["step"] for p in rl], [p["reward_mean"] for p in rl], label="train reward (mean)")
    evals = [p for p in points if "eval_execution_accuracy" in p]
    ax.plot([p["step"] for p in evals], [p["eval_execution_accuracy"] for p in evals], marker="o", label="held-out accuracy")
    ax.set(xlabel="RL step", title="Learning curve")
    integer_ticks(ax.xaxis)  # steps are whole numbers, also when there are only a few of them
    ax.legend()
    fig.tight_layout()
    return ax


def learning_curve(points: list[dict[str, Any]], path: Path) -> None:
    """Write the trial's learning curve (:func:`draw_learning_curve`) as a PNG."""
    fig = draw_learning_curve(points).figure
    fig.savefig(path, dpi=100)
    pyplot().close(fig)

"""``autoresearch run``'s output on stderr: a line per trial started and ended, and live progress bars.

On a terminal, rich draws one bar for the study (trials settled of the
budget) and one per running trial (its SFT and RL steps) below the lines.
Anywhere else (a CI log, a file) nothing is redrawn: each change of the
study's tally is one line, and a running trial gets a line when it enters a
phase and at most once every ``PLAIN_PROGRESS_S`` seconds within one.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from .controller import RunObserver
from .review import proposed_by, short
from .study import Tally
from .summary import estimate

PLAIN_PROGRESS_S = 60.0
PHASES = {"sft": "SFT", "rl": "RL"}


def started_line(trial: FrozenTrial) -> str:
    """``trial 3 started (sampler): learning_rate=0.0003, lora_rank=8``."""
    params = ", ".join(f"{name}={short(value)}" for name, value in trial.params.items())
    return f"trial {trial.number} started ({proposed_by(trial)}): {params}"


def ended_line(trial: FrozenTrial) -> str:
    """``trial 3 complete: 0.2100 [0.1400, 0.3000], n=100, 430 s``, or the state and the failure reason."""
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        line = f"trial {trial.number} complete: {estimate(trial.value, attrs.get('eval_execution_accuracy_ci'))}"
        if attrs.get("n_eval") is not None:
            line += f", n={attrs['n_eval']}"
    elif trial.state == TrialState.PRUNED:
        steps = sorted(trial.intermediate_values)
        line = f"trial {trial.number} pruned" + (f" at step {steps[-1]}" if steps else "")
    else:
        line = f"trial {trial.number} failed: {attrs.get('failure_reason') or 'no reason recorded'}"
    if attrs.get("wall_seconds") is not None:
        line += f", {attrs['wall_seconds']:.0f} s"
    return line


def tally_line(name: str, state: Tally, budget: int) -> str:
    best = "-" if state.best is None else f"{state.best:.4f}"
    return (f"[{name}] running {state.running}  done {state.settled}/{budget}  complete {state.complete}  "
            f"pruned {state.pruned}  failed {state.failed}  best {best}")


def progress_text(number: int, progress: dict[str, Any]) -> str:
    """``trial 3 SFT 12/40``: the phase a trial is in and its steps done of that phase's."""
    return f"trial {number} {PHASES.get(progress['phase'], progress['phase'])} {progress['step']}/{progress['of']}"


class RunConsole(RunObserver):
    """The controller's observer for ``autoresearch run``; use it as a context manager around the run."""

    def __init__(self, name: str, console: Console | None = None) -> None:
        # soft_wrap: a line stays one line in a log however long its parameters; no markup or highlighting
        # either: parameters and failure reasons are printed as they are.
        self.console = console or Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
        self._name = name
        self._live = self.console.is_terminal
        self._bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=self.console, disable=not self._live)
        self._study = self._bars.add_task(f"[{name}]", total=None)
        self._trials: dict[int, TaskID] = {}
        self._last_tally = ""
        self._last_plain: dict[int, tuple[str, str, float]] = {}  # per trial: phase, text, when printed

    def __enter__(self) -> "RunConsole":
        self._bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._bars.stop()

    def _line(self, text: str) -> None:
        self.console.print(text)

    def tally(self, state: Tally, budget: int) -> None:
        line = tally_line(self._name, state, budget)
        self._bars.update(self._study, description=line, total=budget, completed=state.settled)
        if not self._live and line != self._last_tally:
            self._line(line)
        self._last_tally = line

    def started(self, trial: FrozenTrial) -> None:
        self._line(started_line(trial))
        self._trials[trial.number] = self._bars.add_task(f"trial {trial.number}", total=None)

    def progress(self, number: int, progress: dict[str, Any]) -> None:
        text = progress_text(number, progress)
        if number in self._trials:
            self._bars.update(self._trials[number], description=text, total=progress["total"], completed=progress["done"])
        if self._live:
            return
        phase, last, at = self._last_plain.get(number, ("", "", 0.0))
        if text != last and (progress["phase"] != phase or time.monotonic() - at > PLAIN_PROGRESS_S):
            self._line(text)
            self._last_plain[number] = progress["phase"], text, time.monotonic()

    def ended(self, trial: FrozenTrial) -> None:
        self._line(ended_line(trial))
        task = self._trials.pop(trial.number, None)
        if task is not None:
            self._bars.remove_task(task)
        self._last_plain.pop(trial.number, None)

    def notify(self, message: str) -> None:
        self._line(f"warning: {message}")

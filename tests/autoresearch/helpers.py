"""Helpers for tests that drive the controller as a separate process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna

from autoresearch.spec import load_spec
from autoresearch.study import open_study

REPO = Path(__file__).resolve().parents[2]


def start_controller(path: Path, *args: str) -> subprocess.Popen:
    """``python -m autoresearch run`` as its own process, so a test can kill it or its workers."""
    return subprocess.Popen([sys.executable, "-m", "autoresearch", "run", str(path), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible)


def _interruptible() -> None:
    """Give the controller SIGINT's default, as a terminal's Ctrl-C finds it.

    A test run started in the background (``cmd &`` in a script) ignores SIGINT, its children inherit
    that, and Python then installs no KeyboardInterrupt handler: the interrupt test saw the controller
    finish its study instead of stopping.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def trials(path: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read from its storage (empty before the controller created it)."""
    try:
        return open_study(load_spec(path)).get_trials()
    except KeyError:
        return []

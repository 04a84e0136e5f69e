"""The study controller: study files, launchers, trials and the CLI.

``run_trial`` is importable from here so that any trial can be re-run as a
plain Python call; it is loaded lazily because it needs the tinker SDK, which
the read-only commands do not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_trial"]


def __getattr__(name: str) -> Any:
    if name == "run_trial":
        from .trial import run_trial

        return run_trial
    raise AttributeError(name)

"""The study controller: study files, launchers, trials and the CLI.

The public API:

- ``run_trial(params, trainer_url=..., dataset=..., ...)``: any trial as a plain Python call; with what
  ``autoresearch best STUDY --export F`` wrote, ``run_trial(**json.load(open(F))["run_trial"], trainer_url=...)``
  re-runs a study's trial on the study's dataset. It raises ``TrainingServiceError`` (one line) when the
  training service does not answer or refuses the key.
- ``load_spec(path)``: read and validate a study file into a ``StudySpec`` (``SpecError`` names the file and
  the field of a mistake); ``spec.dataset`` is what ``run_trial`` takes as ``dataset``.

``run_trial`` and ``TrainingServiceError`` are loaded lazily because the trial needs the tinker SDK, which
the read-only commands do not.
"""

from __future__ import annotations

from typing import Any

from .spec import SpecError, StudySpec, load_spec

__all__ = ["SpecError", "StudySpec", "TrainingServiceError", "load_spec", "run_trial"]


def __getattr__(name: str) -> Any:
    if name in ("run_trial", "TrainingServiceError"):
        from . import trial

        return getattr(trial, name)
    raise AttributeError(name)

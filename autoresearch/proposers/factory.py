"""Build the proposer a study file names, wrapped for record or replay, with paths relative to the study file."""

from __future__ import annotations

from pathlib import Path

from ..spec import StudySpec
from .base import Proposer, ProposerError


def _resolve(spec: StudySpec, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else spec.path.parent / path


def notes_path(spec: StudySpec) -> Path | None:
    return _resolve(spec, spec.proposer.notes) if spec.proposer.notes else None


def cassette_path(spec: StudySpec) -> Path:
    """The record/replay cassette: ``cassette`` relative to the study file, else ``<run folder>/llm-cassette.jsonl``."""
    return _resolve(spec, spec.proposer.cassette) if spec.proposer.cassette else spec.run_folder / "llm-cassette.jsonl"


def make_proposer(spec: StudySpec) -> Proposer | None:
    """The backend the study file names, wrapped for record or replay; None for ``type = "none"``."""
    from .replay import Cassette, Recorder, Replayer

    config = spec.proposer
    if config.type == "none":
        return None
    cassette = Cassette(cassette_path(spec)) if config.mode != "live" else None
    if cassette is not None and config.mode == "replay":
        if not cassette.path.is_file():
            raise ProposerError(f"replay mode needs the cassette {cassette.path}, which does not exist")
        return Replayer(config.model or "", cassette)
    if config.type == "gemini":
        from .gemini import GeminiProposer

        backend: Proposer = GeminiProposer(config)
    else:
        from .openai_compat import OpenAICompatibleProposer

        backend = OpenAICompatibleProposer(config)
    return Recorder(backend, cassette) if cassette is not None else backend

"""Checks a study passes before anything trains: the dataset, the objective, the proposer and the storage URL.

``autoresearch run`` makes the quick checks (:func:`check_study`) before it
starts a controller, so that a typo fails once, in one line, instead of in
every trial; ``--dry-run`` adds the slow ones (:func:`dry_run_checks`): it
loads the examples and builds the proposer, and says what it could not check.
Each failure is a :class:`~autoresearch.spec.SpecError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .spec import DEFAULT_OBJECTIVE, ENV_PREFIX, DatasetSpec, SpecError, StudySpec

FILE_SUFFIXES = (".jsonl", ".parquet", ".json")


def study_file_sha256(spec: StudySpec) -> str:
    """The SHA-256 of the study file's bytes (comments included): what ``run`` compares to detect an edited file."""
    return hashlib.sha256(spec.path.read_bytes()).hexdigest()


def _looks_like_a_path(source: str) -> bool:
    """A source the study means as a file or folder: it has a data file's suffix or starts like a path.
    Anything else (``owner/name``) may be a Hugging Face id, which only loading can check."""
    return source.endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def check_dataset(spec: StudySpec) -> None:
    """The dataset section without loading it: present (for ``run_trial``), known domains, existing files."""
    where = f"{spec.path}: dataset"
    # Without the table a trial silently trains and evaluates on DatasetSpec's defaults (every synthetic domain).
    if spec.objective == DEFAULT_OBJECTIVE and "dataset" not in spec.model_fields_set:
        raise SpecError(f"{spec.path}: no [dataset] table: say what the trials train and are evaluated on "
                        f"(e.g. [dataset] source = \"synthetic:retail\", n_train, n_eval, seed)")
    for key in ("source", "eval_source"):
        source = getattr(spec.dataset, key)
        if source is None:
            continue
        if key == "source" and source.startswith("synthetic"):
            _check_domains(source, f"{where}.source")
        elif _looks_like_a_path(source) and not Path(source).expanduser().exists():
            raise SpecError(f"{where}.{key}: {source} does not exist (paths are relative to the study file)")


def _check_domains(source: str, where: str) -> None:
    from env.text2sql.data import DOMAINS

    _, _, names = source.partition(":")
    if not names:
        if source != "synthetic":
            raise SpecError(f"{where}: {source!r} names no domain; choose from {', '.join(DOMAINS)}")
        return
    domains = [name.strip() for name in names.split(",")]
    unknown = [name for name in domains if name not in DOMAINS]
    if unknown or not all(domains):
        raise SpecError(f"{where}: unknown domain(s) {', '.join(map(repr, unknown or ['']))} in {source!r}; "
                        f"choose from {', '.join(DOMAINS)}")


def check_study(spec: StudySpec) -> None:
    """What ``run`` checks before it starts: the objective imports and the dataset section is usable."""
    spec.load_objective()
    check_dataset(spec)


def load_dataset(dataset: DatasetSpec, where: str) -> tuple[int, int]:
    """Load the splits as a trial would; their sizes, or a SpecError with the loader's reason."""
    from .trial.data import load_examples

    try:
        train, held_out = load_examples(dataset)
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise SpecError(f"{where}: cannot load the examples: {type(error).__name__}: {error}") from None
    if not train or not held_out:
        raise SpecError(f"{where}: the dataset gives {len(train)} training and {len(held_out)} held-out examples; "
                        "a trial needs both")
    return len(train), len(held_out)


@dataclass(frozen=True)
class DryRun:
    """What the dry run found: lines for the summary, and whether the storage answered (then the Jobs are
    numbered from the study's next trial)."""

    lines: list[str]
    storage_answers: bool


def dry_run_checks(spec: StudySpec) -> DryRun:
    """Every check that needs no training; the findings, or a SpecError for the first that fails.

    Beyond :func:`check_study`: the examples are loaded (synthetic ones and local files; a Hugging Face id is
    left to the trial, which downloads it), the proposer is built (its SDK, its key's variable, its cassette),
    and the storage URL is parsed and its driver imported. Storage that does not answer, or an ``env:`` value
    unset here, is only noted: a cluster's database is rarely reachable from the laptop that checks the file.
    """
    check_study(spec)
    lines = []
    if spec.objective == DEFAULT_OBJECTIVE:
        sources = [s for s in (spec.dataset.source, spec.dataset.eval_source) if s]
        if all(s.startswith("synthetic") or Path(s).exists() for s in sources):
            n_train, n_eval = load_dataset(spec.dataset, f"{spec.path}: dataset")
            lines.append(f"dataset {spec.dataset.source}: {n_train} training and {n_eval} held-out examples")
        else:
            lines.append(f"dataset {spec.dataset.source}: not loaded here (the trial loads it)")
    lines.append(_check_proposer(spec))
    storage, answers = _check_storage(spec)
    return DryRun([*lines, storage], answers)


def _check_proposer(spec: StudySpec) -> str:
    config = spec.proposer
    if config.type == "none":
        return "proposer none: every trial from the sampler"
    from .proposers.factory import make_proposer, notes_path

    notes = notes_path(spec)
    if notes is not None and not notes.is_file():
        raise SpecError(f"{spec.path}: proposer.notes: {notes} does not exist")
    try:
        make_proposer(spec)
    except Exception as error:  # noqa: BLE001 - any SDK's refusal (no key, bad option) is the one line to show
        raise SpecError(f"{spec.path}: proposer: {type(error).__name__}: {error}") from None
    return f"proposer {config.type} {config.model} ({config.mode}, share {config.share:g})"


def _check_storage(spec: StudySpec) -> tuple[str, bool]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        url = spec.storage_url
    except SpecError:
        if spec.storage and spec.storage.startswith(ENV_PREFIX):
            return f"storage {spec.storage}: not checked (the variable is not set here)", False
        raise
    if url.startswith("sqlite:///"):
        return f"storage {url}", Path(url.removeprefix("sqlite:///")).exists()
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3} if url.startswith(("postgresql", "mysql")) else {})
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise SpecError(f"{spec.path}: storage: not a usable SQLAlchemy URL ({type(error).__name__}: {error})") from None
    shown = spec.storage if (spec.storage or "").startswith(ENV_PREFIX) else engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        first = str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"storage {shown}: does not answer from here ({first})", False
    finally:
        engine.dispose()
    return f"storage {shown}: answers", True

"""The study's artifact store: where trial files (metrics, predictions, learning curve, pod logs) and the study
file go, so that the controller, every trial pod and optuna-dashboard see the same files wherever each runs.

The study file's ``artifact_store`` picks it: a folder (Optuna's ``FileSystemArtifactStore``; by default
``<run folder>/artifacts``, next to the SQLite file), ``gs://BUCKET`` (``GCSArtifactStore``, the ``gcs`` extra;
credentials from the environment, e.g. GKE Workload Identity) or ``s3://BUCKET`` (``Boto3ArtifactStore``, the
``s3`` extra; credentials, region and endpoint from boto3's usual environment variables). The storage records
each artifact under its file's name alone, never a path, so nothing depends on where a trial's folder was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, GCSArtifactStore, upload_artifact
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from .spec import SpecError, StudySpec

ArtifactStore = Union[FileSystemArtifactStore, GCSArtifactStore, Boto3ArtifactStore]
BUCKET_STORES = {"gs": ("gcs", GCSArtifactStore), "s3": ("s3", Boto3ArtifactStore)}
"""Each bucket URL scheme: the extra that installs its SDK, and Optuna's store for it."""


def open_artifact_store(spec: StudySpec) -> ArtifactStore:
    """The store the study file names; a folder is created, a bucket's SDK client is made (SpecError if its extra
    is missing or it has no credentials)."""
    folder = spec.artifact_dir
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(folder)
    url = spec.artifact_store
    scheme, _, bucket = (url or "").partition("://")
    extra, store = BUCKET_STORES[scheme]
    try:
        return store(bucket)
    except ImportError:
        raise SpecError(f"{spec.path}: artifact_store {url}: its SDK is not installed "
                        f"(pip install 'autoresearch[{extra}]')") from None
    except Exception as error:  # noqa: BLE001 - each SDK raises its own errors for missing credentials or region
        raise SpecError(f"{spec.path}: artifact_store {url}: cannot open it: {type(error).__name__}: {error}") from None


def upload_files(store: ArtifactStore, paths: Iterable[Path], owner: optuna.Trial | FrozenTrial | optuna.Study,
                 storage: BaseStorage | None = None) -> list[str]:
    """Upload the files among ``paths`` that exist as artifacts of ``owner`` (a running trial, or the study);
    return their names. ``storage`` is needed for a FrozenTrial only."""
    uploaded = []
    for path in paths:
        if path.is_file():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=owner, storage=storage,
                            mimetype="text/plain" if path.suffix in (".log", ".txt", ".jsonl", ".toml") else None)
            uploaded.append(path.name)
    return uploaded

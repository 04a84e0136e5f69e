"""Adapter and optimizer checkpoints, addressed by tinker:// paths.

The root is a local directory or any fsspec URL (``gs://bucket/prefix`` with gcsfs
installed, ``memory://`` in tests). Layout under it: ``<model_id>/run.json`` (the
training run: base model, LoRA config, metadata) and ``<model_id>/<kind>/<name>/``
with ``adapter.safetensors``, ``meta.json`` and, for training checkpoints,
``optimizer.pt``; ``external_weights`` checkpoints are standard PEFT adapter
directories. Everything needed to rebuild a tenant lives there, so checkpoints
survive a service restart. ``meta.json`` is written last and a checkpoint exists
only when it does, so a crash (or an object store without atomic renames) never
leaves a half-written checkpoint that looks complete. A checkpoint with a TTL is
deleted lazily, the next time anything looks at it after it expired.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

KINDS: dict[str, str] = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
"""Path segment -> the SDK's checkpoint_type."""
TRAINABLE_KINDS = ("weights", "sampler_weights")
"""Kinds stored in this service's own format (loadable into an adapter)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CheckpointError(ValueError):
    """A checkpoint path or name the caller got wrong."""


class CheckpointNotFound(CheckpointError):
    """The path is well formed but nothing is stored there."""


@dataclass(frozen=True)
class CheckpointRef:
    """A parsed ``tinker://<model_id>/<kind>/<name>`` path."""

    model_id: str
    kind: str
    name: str

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a checkpoint holds: adapter tensors, its metadata, and optimizer state if saved."""

    adapter: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None


def parse_path(path: str) -> CheckpointRef:
    """Parse a tinker:// checkpoint path, rejecting anything that could escape the root."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise CheckpointError(f"checkpoint path must look like tinker://<run>/weights/<name>, got {path!r}")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3:
        raise CheckpointError(f"checkpoint path must look like tinker://<run>/<kind>/<name>, got {path!r}")
    return checkpoint_ref(*parts)


def checkpoint_ref(model_id: str, kind: str, name: str) -> CheckpointRef:
    """A validated reference: a known kind, a safe name and a run id that stays inside the root."""
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint kind must be one of {sorted(KINDS)}, got {kind!r}")
    return CheckpointRef(check_run_id(model_id), kind, check_name(name))


def check_run_id(model_id: str) -> str:
    """Run ids become directory names too; they must not climb out of the root."""
    if not model_id or model_id in (".", "..") or "/" in model_id or "\\" in model_id:
        raise CheckpointError(f"invalid training run id {model_id!r}")
    return model_id


def check_name(name: str) -> str:
    """Checkpoint names become directory names, so only a safe character set is allowed."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CheckpointError(
            f"checkpoint name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-'"
        )
    return name


def iso(ts: float) -> str:
    """An epoch timestamp as the ISO 8601 string the SDK's datetime fields parse."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


class CheckpointStore:
    """Reads and writes checkpoints and training-run records under one root (a path or fsspec URL)."""

    def __init__(self, root: str | Path) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def _run_dir(self, model_id: str) -> str:
        return f"{self.root}/{check_run_id(model_id)}"

    def _dir(self, ref: CheckpointRef) -> str:
        return f"{self._run_dir(ref.model_id)}/{ref.kind}/{ref.name}"

    def _write_json(self, path: str, value: dict[str, Any]) -> None:
        with self.fs.open(path, "w") as f:
            f.write(json.dumps(value, default=list))

    def _read_json(self, path: str) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(path))

    def write_run(self, model_id: str, record: dict[str, Any]) -> None:
        """Record (or update) a training run so it can be listed after a restart."""
        self.fs.makedirs(self._run_dir(model_id), exist_ok=True)
        self._write_json(f"{self._run_dir(model_id)}/run.json", record)

    def read_run(self, model_id: str) -> dict[str, Any] | None:
        path = f"{self._run_dir(model_id)}/run.json"
        return self._read_json(path) if self.fs.exists(path) else None

    def list_runs(self) -> list[dict[str, Any]]:
        runs = [self._read_json(path) for path in self.fs.glob(f"{self.root}/*/run.json")]
        return sorted(runs, key=lambda r: r.get("created_at", 0))

    def usage(self) -> tuple[int, int]:
        """Number of live checkpoints and their total size in bytes, over all runs."""
        checkpoints = [c for run in self.list_runs() for c in self.list(run["training_run_id"])]
        return len(checkpoints), sum(c["size_bytes"] for c in checkpoints)

    def save(
        self,
        ref: CheckpointRef,
        adapter: dict[str, torch.Tensor],
        meta: dict[str, Any],
        optimizer: dict[str, Any] | None,
        overwrite: bool = False,
        ttl_seconds: int | None = None,
    ) -> str:
        """Write an adapter (and optimizer state) checkpoint; return its tinker:// path."""
        files = {"adapter.safetensors": _safetensors_bytes(adapter)}
        if optimizer is not None:
            buffer = io.BytesIO()
            torch.save(optimizer, buffer)
            files["optimizer.pt"] = buffer.getvalue()
        return self._write(ref, files, meta, overwrite, ttl_seconds)

    def save_external(
        self, ref: CheckpointRef, adapter: dict[str, torch.Tensor], adapter_config: dict[str, Any], meta: dict[str, Any],
        ttl_seconds: int | None = None,
    ) -> str:
        """Write a standard PEFT adapter directory (``PeftModel.from_pretrained`` loads it)."""
        files = {
            "adapter_model.safetensors": _safetensors_bytes(adapter),
            "adapter_config.json": json.dumps(adapter_config, indent=2, default=list).encode(),
        }
        return self._write(ref, files, meta, overwrite=False, ttl_seconds=ttl_seconds)

    def _write(
        self, ref: CheckpointRef, files: dict[str, bytes], meta: dict[str, Any], overwrite: bool, ttl_seconds: int | None
    ) -> str:
        directory = self._dir(ref)
        if self._live_meta(ref) is not None and not overwrite:
            raise CheckpointError(f"checkpoint {ref.tinker_path} already exists (pass overwrite=True)")
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)
        self.fs.makedirs(directory, exist_ok=True)
        for name, data in files.items():
            self.fs.pipe_file(f"{directory}/{name}", data)
        now = time.time()
        expires_at = now + ttl_seconds if ttl_seconds else None
        self._write_json(f"{directory}/meta.json", {**meta, "created_at": now, "expires_at": expires_at})
        return ref.tinker_path

    def _live_meta(self, ref: CheckpointRef) -> dict[str, Any] | None:
        """The checkpoint's metadata, or None if it is missing; an expired one is deleted here."""
        meta_path = f"{self._dir(ref)}/meta.json"
        if not self.fs.exists(meta_path):
            return None
        meta = self._read_json(meta_path)
        if meta.get("expires_at") is not None and meta["expires_at"] < time.time():
            self.fs.rm(self._dir(ref), recursive=True)
            return None
        return meta

    def _existing_meta(self, ref: CheckpointRef) -> dict[str, Any]:
        meta = self._live_meta(ref)
        if meta is None:
            raise CheckpointNotFound(f"checkpoint {ref.tinker_path} does not exist (or has expired)")
        return meta

    def load(self, ref: CheckpointRef, with_optimizer: bool) -> LoadedCheckpoint:
        meta = self._existing_meta(ref)
        if ref.kind not in TRAINABLE_KINDS:
            raise CheckpointError(f"{ref.tinker_path} is an export; load a weights/ or sampler_weights/ checkpoint")
        directory = self._dir(ref)
        optimizer = None
        if with_optimizer:
            if not self.fs.exists(f"{directory}/optimizer.pt"):
                raise CheckpointError(f"checkpoint {ref.tinker_path} has no optimizer state")
            optimizer = torch.load(io.BytesIO(self.fs.cat_file(f"{directory}/optimizer.pt")), weights_only=True)
        adapter = load_safetensors(self.fs.cat_file(f"{directory}/adapter.safetensors"))
        return LoadedCheckpoint(adapter=adapter, meta=meta, optimizer=optimizer)

    def files(self, ref: CheckpointRef) -> dict[str, str]:
        """URLs of the checkpoint's payload files by relative name (its metadata file excluded)."""
        self._existing_meta(ref)
        out = {}
        for path in sorted(self.fs.ls(self._dir(ref), detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name != "meta.json":
                url = self.fs.unstrip_protocol(path)
                out[name] = Path(path).as_uri() if url.startswith("file://") else url
        return out

    def size(self, ref: CheckpointRef) -> int:
        return sum(info["size"] for info in self.fs.ls(self._dir(ref), detail=True) if info["type"] == "file")

    def set_ttl(self, ref: CheckpointRef, ttl_seconds: int | None) -> None:
        """Expire the checkpoint ``ttl_seconds`` from now (None: never)."""
        meta = self._existing_meta(ref)
        meta["expires_at"] = time.time() + ttl_seconds if ttl_seconds else None
        self._write_json(f"{self._dir(ref)}/meta.json", meta)

    def list(self, model_id: str) -> list[dict[str, Any]]:
        """Live checkpoints of one run in the SDK's Checkpoint shape, oldest first."""
        out = []
        for kind, checkpoint_type in KINDS.items():
            for meta_path in self.fs.glob(f"{self._run_dir(model_id)}/{kind}/*/meta.json"):
                ref = CheckpointRef(model_id, kind, meta_path.rstrip("/").split("/")[-2])
                meta = self._live_meta(ref)
                if meta is None:
                    continue
                out.append(
                    {
                        "checkpoint_id": ref.checkpoint_id,
                        "checkpoint_type": checkpoint_type,
                        "time": iso(meta["created_at"]),
                        "tinker_path": ref.tinker_path,
                        "size_bytes": self.size(ref),
                        "public": False,
                        "user_metadata": meta.get("user_metadata"),
                        "expires_at": iso(meta["expires_at"]) if meta.get("expires_at") else None,
                    }
                )
        return sorted(out, key=lambda c: c["time"])

    def delete(self, ref: CheckpointRef) -> None:
        self._existing_meta(ref)
        self.fs.rm(self._dir(ref), recursive=True)


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})

"""Adapter and optimizer checkpoints, addressed by tinker:// paths.

The root is a local directory or any fsspec URL (``gs://bucket/prefix`` with gcsfs
installed, ``memory://`` in tests). Layout under it: ``<model_id>/run.json`` (the
training run: base model, LoRA config, metadata) and ``<model_id>/<kind>/<name>/``
with ``adapter.safetensors``, ``meta.json`` and, for training checkpoints,
``optimizer.pt``; ``external_weights`` checkpoints are standard PEFT adapter
directories (or, encrypted to the client's age recipients, their files as
``<file>.age``); ``<model_id>/owner.json`` names the tenant (an API key's fingerprint)
that the run and all its checkpoints belong to. Everything needed to rebuild a
tenant lives there, so checkpoints survive a service restart.

Storage safety (local roots):

- A checkpoint is written, files fsynced and ``meta.json`` last, into a hidden
  ``<kind>/.partial-<name>-<tag>`` sibling and renamed into place. An overwrite swaps
  the new directory with the old one in one ``renameat2(RENAME_EXCHANGE)`` and only
  then deletes the old copy; where the exchange is not available the old copy is
  renamed aside (``.old-<name>-<tag>``), the new one renamed in, and the old one
  deleted. At every instant the old or the new checkpoint is loadable (after
  :meth:`CheckpointStore.recover`, which puts an aside copy back).
- Metadata files (``meta.json``, ``run.json``, ``owner.json``) are replaced atomically
  (temporary file, fsync, ``os.replace``). An entry whose metadata cannot be read is
  skipped (and logged) by the listings and answers a 400 of its own.
- :meth:`CheckpointStore.recover` (run by the service at start-up) removes what
  interrupted saves, deletes and metadata writes left behind. One service per root.
- Nothing below the root is reached through a symlink: every path is walked from the
  root with ``O_NOFOLLOW``; a symlink is neither read through, listed nor deleted through.
- A per-owner quota (:class:`StorageQuota`) bounds the number and bytes of live checkpoints.

On object stores (``gs://``) there is no atomic rename: ``meta.json`` is written last
and a checkpoint exists only when it does, but an overwrite is not atomic there. A
checkpoint with a TTL is deleted lazily, the next time anything looks at it after it expired.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pyrage
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .exceptions import TooLarge

log = logging.getLogger("trainer_api.checkpoints")

KINDS: dict[str, str] = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
"""Path segment -> the SDK's checkpoint_type."""
TRAINABLE_KINDS = ("weights", "sampler_weights")
"""Kinds stored in this service's own format (loadable into an adapter)."""

AGE_SUFFIX = ".age"
"""An age-encrypted export stores each file as ``<file>.age`` (what tinker-cookbook's ``weights.download`` decrypts)."""
MAX_AGE_RECIPIENTS = 10
"""The SDK documents at most 10 recipients for ``save_weights_external``."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HIDDEN_RE = re.compile(r"^\.(partial|old|deleting|tmp)-(.*)-([0-9a-f]{32})$")
"""Work in progress: ``.<what>-<name>-<tag>``; checkpoint names never start with a dot."""

_fault_hook: Callable[[str], None] | None = None
"""Tests only: called at each step of a save (``partial-written``, ``old-aside``, ``new-in-place``)."""


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


class CheckpointError(ValueError):
    """A checkpoint path or name the caller got wrong."""


class CheckpointNotFound(CheckpointError):
    """The path is well formed but nothing is stored there (or it is another tenant's)."""

    @classmethod
    def at(cls, ref: CheckpointRef) -> CheckpointNotFound:
        """The one message for a missing checkpoint, so another tenant's reads exactly like a missing one."""
        return cls(f"checkpoint {ref.tinker_path} does not exist (or has expired)")


class DamagedCheckpoint(CheckpointError):
    """The checkpoint's files cannot be read back; only this checkpoint is affected."""


class QuotaExceeded(TooLarge):
    """A save would take the owner past its checkpoint quota (413, category user: the SDK does not retry)."""


@dataclass(frozen=True)
class StorageQuota:
    """Per-owner (API key) bounds on live checkpoints; ``None`` or 0 means unlimited.

    Every checkpoint on disk counts (training, sampler and exported weights); unnamed
    sampler snapshots live in memory only and do not. Expired checkpoints do not count.
    """

    max_checkpoints: int | None = 1000
    max_bytes: int | None = 20 * 2**30


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
    """Run ids become directory names too; they must not climb out of the root (nor be hidden work files)."""
    if (not isinstance(model_id, str) or not model_id or model_id.startswith(".") or "/" in model_id
            or "\\" in model_id or "\0" in model_id):
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
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_LAST_TIMESTAMP = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def _is_timestamp(value: Any) -> bool:
    """An epoch time :func:`iso` can write: a TTL of 2**70 seconds, stored before TTLs were capped, is not one."""
    return _is_number(value) and 0 <= value <= _LAST_TIMESTAMP


def valid_run_record(record: dict[str, Any]) -> bool:
    """Whether a run record has what a TrainingRun answer is built from (else it is damaged)."""
    lora = record.get("lora")
    return (isinstance(record.get("base_model"), str) and isinstance(lora, dict) and isinstance(lora.get("rank"), int)
            and _is_timestamp(record.get("created_at")))


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def age_recipients(recipients: list[str]) -> list[Any]:
    """Parse the SDK's ``age_encryption_recipients`` (``age1...`` X25519 keys or SSH public keys).

    Parsed on the request, so that a malformed key is a 400 naming it before anything is queued or written.
    """
    if len(recipients) > MAX_AGE_RECIPIENTS:
        raise CheckpointError(f"at most {MAX_AGE_RECIPIENTS} age_encryption_recipients, got {len(recipients)}")
    parsed = []
    for recipient in recipients:
        kind = pyrage.ssh if recipient.startswith("ssh-") else pyrage.x25519
        try:
            parsed.append(kind.Recipient.from_str(recipient))
        except pyrage.RecipientError as exc:
            shown = recipient if len(recipient) <= 80 else recipient[:77] + "..."
            raise CheckpointError(
                f"age_encryption_recipients: {shown!r} is not an age recipient (an age1... key or an SSH public key): {exc}"
            ) from None
    return parsed


# ---------------------------------------------------------------- atomic directory exchange (Linux)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_exchange_supported: bool | None = None
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # not glibc >= 2.28, or not Linux
    _renameat2 = None
    _exchange_supported = False


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False when the system or filesystem cannot."""
    global _exchange_supported
    if _renameat2 is None or _exchange_supported is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        _exchange_supported = True
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        _exchange_supported = False
        return False
    raise OSError(err, os.strerror(err), a)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Unsafe(Exception):
    """A path below the root runs through a symlink (or something that is not a file or directory)."""


class CheckpointStore:
    """Reads and writes checkpoints and training-run records under one root (a path or fsspec URL)."""

    def __init__(self, root: str | Path, quota: StorageQuota = StorageQuota()) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.quota = quota
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            self.root = os.path.realpath(self.root)  # the root itself may be a symlink; nothing below it may
        else:
            self.root = self.root.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
        self._owners: dict[str, str] = {}
        self._lock = threading.RLock()
        """Held by whatever moves or deletes checkpoint directories (saves, deletes, expiry, TTLs, recovery);
        readers need none, since every change they can see is one rename."""

    # ------------------------------------------------------------ paths
    def _run_dir(self, model_id: str) -> str:
        return f"{self.root}/{check_run_id(model_id)}"

    def _kind_dir(self, model_id: str, kind: str) -> str:
        return f"{self._run_dir(model_id)}/{kind}"

    def _dir(self, ref: CheckpointRef) -> str:
        return f"{self._run_dir(ref.model_id)}/{ref.kind}/{ref.name}"

    def _parts(self, path: str) -> list[str]:
        rel = path[len(self.root) :].strip("/")
        return [p for p in rel.split("/") if p] if rel else []

    # ------------------------------------------------------------ primitives that never follow a symlink
    @contextmanager
    def _dir_fd(self, parts: list[str]) -> Iterator[int]:
        """An fd of root/parts..., each component opened with O_NOFOLLOW below the one before."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Unsafe(part) from exc
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def _kind(self, path: str) -> str | None:
        """'file', 'dir', None (missing); raises _Unsafe for a symlink on the way or at the end."""
        if not self.local:
            if not self.fs.exists(path):
                return None
            return "dir" if self.fs.isdir(path) else "file"
        parts = self._parts(path)
        if not parts:
            return "dir"
        try:
            with self._dir_fd(parts[:-1]) as fd:
                st = os.lstat(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise _Unsafe(parts[-1])
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        if stat.S_ISREG(st.st_mode):
            return "file"
        raise _Unsafe(parts[-1])

    def _safe_kind(self, path: str) -> str | None:
        """Like :meth:`_kind`, but a symlink reads as missing (and is logged)."""
        try:
            return self._kind(path)
        except _Unsafe:
            log.warning("symlink in the checkpoint root not followed", extra={"path": path})
            return None

    def _read_bytes(self, path: str) -> bytes:
        """The file's bytes; FileNotFoundError if it is missing or reached through a symlink."""
        if not self.local:
            return self.fs.cat_file(path)
        parts = self._parts(path)
        try:
            with self._dir_fd(parts[:-1]) as dfd:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except _Unsafe as exc:
            log.warning("symlink in the checkpoint root not followed", extra={"path": path})
            raise FileNotFoundError(path) from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                log.warning("symlink in the checkpoint root not followed", extra={"path": path})
                raise FileNotFoundError(path) from exc
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise FileNotFoundError(path)
            return f.read()

    def _makedirs(self, path: str) -> None:
        """Create the directories down to ``path``, refusing to go through a symlink."""
        if not self.local:
            self.fs.makedirs(path, exist_ok=True)
            return
        parts = self._parts(path)
        for i in range(1, len(parts) + 1):
            sub = f"{self.root}/{'/'.join(parts[:i])}"
            try:
                kind = self._kind(sub)
            except _Unsafe as exc:
                raise CheckpointError(f"refusing to write through a symlink in the checkpoint root ({parts[i - 1]!r})") from exc
            if kind is None:
                try:
                    os.mkdir(sub)
                except FileExistsError:
                    pass
            elif kind != "dir":
                raise CheckpointError(f"{parts[i - 1]!r} in the checkpoint root is not a directory")

    def _write_file(self, path: str, data: bytes) -> None:
        """A new file (it must not exist), synced to disk."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _replace_file(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically: a temporary sibling, fsync, ``os.replace``, fsync of the directory."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        parent, name = path.rsplit("/", 1)
        self._makedirs(parent)
        tmp = f"{parent}/.tmp-{name}-{uuid.uuid4().hex}"
        try:
            self._write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise
        _fsync_dir(parent)

    def _entries(self, path: str) -> list[tuple[str, str]]:
        """(name, 'file'|'dir') of a directory's entries; symlinks and other oddities are skipped (logged)."""
        if not self.local:
            if not self.fs.isdir(path):
                return []
            out = []
            for info in self.fs.ls(path, detail=True):
                name = info["name"].rstrip("/").rsplit("/", 1)[-1]
                out.append((name, "dir" if info["type"] == "directory" else "file"))
            return out
        try:
            with self._dir_fd(self._parts(path)) as fd:
                names = os.listdir(fd)
                out = []
                for name in names:
                    st = os.lstat(name, dir_fd=fd)
                    if stat.S_ISDIR(st.st_mode):
                        out.append((name, "dir"))
                    elif stat.S_ISREG(st.st_mode):
                        out.append((name, "file"))
                    else:
                        log.warning("symlink in the checkpoint root not followed", extra={"path": f"{path}/{name}"})
                return out
        except _Unsafe:
            log.warning("symlink in the checkpoint root not followed", extra={"path": path})
            return []
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _rmtree(self, path: str) -> None:
        """Delete a directory that is really below the root (never through a symlink)."""
        if not self.local:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
            return
        kind = self._kind(path)  # raises _Unsafe for a symlink
        if kind == "dir":
            shutil.rmtree(path)  # the fd-based rmtree unlinks symlinks inside, never follows them
        elif kind == "file":
            os.unlink(path)

    def _rename(self, src: str, dst: str) -> None:
        if self.local:
            os.rename(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)

    def _remove_aside(self, path: str) -> None:
        """Delete a checkpoint directory: renamed to a hidden name first, so no half-deleted one is ever seen."""
        parent, name = path.rsplit("/", 1)
        doomed = f"{parent}/.deleting-{name}-{uuid.uuid4().hex}"
        self._rename(path, doomed)
        self._rmtree(doomed)

    def _size_of(self, path: str) -> int:
        if not self.local:
            return sum(info["size"] for info in self.fs.ls(path, detail=True) if info["type"] == "file")
        with self._dir_fd(self._parts(path)) as fd:
            total = 0
            for name in os.listdir(fd):
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
            return total

    # ------------------------------------------------------------ JSON records
    def _write_json(self, path: str, value: dict[str, Any]) -> None:
        self._replace_file(path, json.dumps(value, default=list).encode())

    def _read_json(self, path: str) -> dict[str, Any] | None:
        """A JSON object file: None when missing; DamagedCheckpoint when unreadable or not an object."""
        try:
            raw = self._read_bytes(path)
        except FileNotFoundError:
            return None
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedCheckpoint(f"{path.rsplit('/', 1)[-1]} is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise DamagedCheckpoint(f"{path.rsplit('/', 1)[-1]} is not a JSON object")
        return value

    def write_run(self, model_id: str, record: dict[str, Any]) -> None:
        """Record (or update) a training run so it can be listed after a restart."""
        self._makedirs(self._run_dir(model_id))
        self._write_json(f"{self._run_dir(model_id)}/run.json", record)

    def read_run(self, model_id: str) -> dict[str, Any] | None:
        """The run record, or None when missing or damaged (a damaged one is logged)."""
        try:
            record = self._read_json(f"{self._run_dir(model_id)}/run.json")
            if record is not None and record.get("training_run_id") != model_id:
                raise DamagedCheckpoint("run.json does not name its run")
            return record
        except DamagedCheckpoint as exc:
            log.warning("damaged run record skipped", extra={"model_id": model_id, "error": str(exc)})
            return None

    def write_owner(self, model_id: str, tenant_id: str) -> None:
        """Record which tenant a run belongs to; written when the run is created, read after a restart."""
        self._makedirs(self._run_dir(model_id))
        self._write_json(f"{self._run_dir(model_id)}/owner.json", {"tenant": tenant_id})
        self._owners[model_id] = tenant_id

    def read_owner(self, model_id: str) -> str | None:
        """The tenant id that owns the run, or None for an unknown run (or one recorded before runs had owners,
        or whose owner record is damaged: logged, and then the run is no one's)."""
        if model_id in self._owners:
            return self._owners[model_id]
        try:
            record = self._read_json(f"{self._run_dir(model_id)}/owner.json")
            owner = None if record is None else record.get("tenant")
            if record is not None and not isinstance(owner, str):
                raise DamagedCheckpoint("owner.json names no tenant")
        except DamagedCheckpoint as exc:
            log.warning("damaged owner record: the run is no one's", extra={"model_id": model_id, "error": str(exc)})
            return None
        if owner is not None:
            self._owners[model_id] = owner
        return owner

    def _run_ids(self) -> list[str]:
        return sorted(name for name, kind in self._entries(self.root) if kind == "dir" and not name.startswith("."))

    def list_runs(self) -> list[dict[str, Any]]:
        """Every readable run record, oldest first; damaged ones are skipped (and logged)."""
        runs = [r for r in map(self.read_run, self._run_ids()) if r is not None]
        return sorted(runs, key=lambda r: r["created_at"] if _is_number(r.get("created_at")) else 0)

    # ------------------------------------------------------------ saving
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
        return self._write(ref, peft_files(adapter, adapter_config), meta, overwrite=False, ttl_seconds=ttl_seconds)

    def _write(
        self, ref: CheckpointRef, files: dict[str, bytes], meta: dict[str, Any], overwrite: bool, ttl_seconds: int | None
    ) -> str:
        with self._lock:
            return self._write_locked(ref, files, meta, overwrite, ttl_seconds)

    def _write_locked(
        self, ref: CheckpointRef, files: dict[str, bytes], meta: dict[str, Any], overwrite: bool, ttl_seconds: int | None
    ) -> str:
        directory = self._dir(ref)
        replaced = self._replaced_size(ref)
        if replaced is not None and not overwrite:
            raise CheckpointError(f"checkpoint {ref.tinker_path} already exists (pass overwrite=True)")
        now = time.time()
        expires_at = now + ttl_seconds if ttl_seconds else None
        files = {**files, "meta.json": json.dumps({**meta, "created_at": now, "expires_at": expires_at}, default=list).encode()}
        self._check_quota(ref, sum(map(len, files.values())), replaced)

        kind_dir = self._kind_dir(ref.model_id, ref.kind)
        self._makedirs(kind_dir)
        tag = uuid.uuid4().hex
        partial = f"{kind_dir}/.partial-{ref.name}-{tag}"
        if self.local:
            os.mkdir(partial)
        try:
            for name, data in files.items():  # meta.json last: a directory without it is no checkpoint
                self._write_file(f"{partial}/{name}", data)
            if self.local:
                _fsync_dir(partial)
            _fault("partial-written")
            try:
                present = self._kind(directory)
            except _Unsafe as exc:
                raise CheckpointError(f"refusing to replace a symlink in the checkpoint root at {ref.tinker_path}") from exc
            if present is None:
                self._rename(partial, directory)
                _fault("new-in-place")
            elif self.local and _exchange(partial, directory):
                _fault("new-in-place")  # the old copy is now at ``partial``
                self._rmtree(partial)
            else:
                aside = f"{kind_dir}/.old-{ref.name}-{tag}"
                self._rename(directory, aside)
                _fault("old-aside")
                try:
                    self._rename(partial, directory)
                except BaseException:
                    self._rename(aside, directory)  # put the old copy back
                    raise
                _fault("new-in-place")
                with _suppress_oserror():
                    self._rmtree(aside)  # else recover() deletes it
        except BaseException:
            with _suppress_oserror():
                self._rmtree(partial)
            raise
        if self.local:
            _fsync_dir(kind_dir)
        return ref.tinker_path

    def encrypt_export(self, ref: CheckpointRef, recipients: list[Any]) -> int:
        """Replace an export's files by their age ciphertext, ``<file>.age``; return the export's new size.

        The engine writes an export plain; one asked for encrypted is replaced here, on the worker, before
        its request resolves. Training checkpoints on the same disk are plain anyway: age protects the
        copies that leave the service. If this fails, the export is deleted, so it is never left plain
        under the name the client asked for. Its TTL is kept.
        """
        directory = self._dir(ref)
        with self._lock:
            try:
                meta = self._existing_meta(ref)
                files = {
                    f"{name}{AGE_SUFFIX}": pyrage.encrypt(self._read_bytes(f"{directory}/{name}"), recipients)
                    for name, what in sorted(self._entries(directory))
                    if what == "file" and name != "meta.json"
                }
                expires_at = meta.get("expires_at")
                ttl = max(1, math.ceil(expires_at - time.time())) if expires_at is not None else None
                self._write_locked(ref, files, meta, overwrite=True, ttl_seconds=ttl)
            except BaseException:
                with _suppress_oserror():
                    self._remove_aside(directory)
                raise
            return self._size_of(directory)

    # ------------------------------------------------------------ quota
    def check_quota(self, ref: CheckpointRef, min_bytes: int, overwrite: bool) -> None:
        """Refuse, before a save is queued, one that cannot fit: ``min_bytes`` is a lower bound on its size.

        This lets the save request itself answer 413 instead of a future that fails later. The write checks
        again with the exact size, since other saves may land in between; it also answers a name taken
        without ``overwrite``, as it always has.
        """
        if not self.quota.max_checkpoints and not self.quota.max_bytes:
            return
        replaced = self._replaced_size(ref)
        if replaced is None or overwrite:
            self._check_quota(ref, min_bytes, replaced, at_least=True)

    def _replaced_size(self, ref: CheckpointRef) -> int | None:
        """Bytes of the live checkpoint at ``ref``: None if there is none, or if it is damaged (then a save
        replaces it without counting it)."""
        try:
            old = self._live_meta(ref)
        except DamagedCheckpoint:
            return None
        return None if old is None else self._size_of(self._dir(ref))

    def usage(self, owner: str | None) -> tuple[int, int]:
        """Live checkpoints of ``owner``'s runs: their number and bytes (expired ones are deleted here)."""
        count = size = 0
        for model_id in self._run_ids():
            if self.read_owner(model_id) != owner:
                continue
            for kind in KINDS:
                for name in self._checkpoint_names(model_id, kind):
                    ref = CheckpointRef(model_id, kind, name)
                    try:
                        if self._live_meta(ref) is None:
                            continue
                        size += self._size_of(self._dir(ref))
                    except (DamagedCheckpoint, _Unsafe, OSError):
                        continue
                    count += 1
        return count, size

    def _check_quota(self, ref: CheckpointRef, new_bytes: int, replaced_bytes: int | None, at_least: bool = False) -> None:
        most, most_bytes = self.quota.max_checkpoints, self.quota.max_bytes
        if not most and not most_bytes:
            return
        count, used = self.usage(self.read_owner(ref.model_id))
        after_count = count + (0 if replaced_bytes is not None else 1)
        after_bytes = used - (replaced_bytes or 0) + new_bytes
        over = []
        if most and after_count > most:
            over.append(f"{most} checkpoints")
        if most_bytes and after_bytes > most_bytes:
            over.append(_fmt_bytes(most_bytes))
        if over:
            bound = "at least " if at_least else ""
            raise QuotaExceeded(
                f"checkpoint storage quota exceeded: this API key may keep {' and '.join(over)}; it has "
                f"{count} checkpoints ({_fmt_bytes(used)}) and saving {ref.tinker_path} ({bound}{_fmt_bytes(new_bytes)}) "
                f"would make {after_count} ({bound}{_fmt_bytes(after_bytes)}). Free space by deleting checkpoints you no "
                "longer need (RestClient.delete_checkpoint_from_tinker_path, or DELETE "
                "/api/v1/training_runs/<run>/checkpoints/<kind>/<name>) or by giving them a TTL (ttl_seconds when "
                "saving, or RestClient.set_checkpoint_ttl_from_tinker_path); expired checkpoints do not count"
            )

    # ------------------------------------------------------------ reading
    def _checkpoint_names(self, model_id: str, kind: str) -> list[str]:
        entries = self._entries(self._kind_dir(model_id, kind))
        return sorted(name for name, what in entries if what == "dir" and _NAME_RE.match(name))

    def _live_meta(self, ref: CheckpointRef) -> dict[str, Any] | None:
        """The checkpoint's metadata, or None if it is missing; an expired one is deleted here.

        Raises DamagedCheckpoint when the metadata cannot be read.
        """
        meta_path = f"{self._dir(ref)}/meta.json"
        try:
            meta = self._read_json(meta_path)
        except DamagedCheckpoint as exc:
            raise DamagedCheckpoint(
                f"checkpoint {ref.tinker_path} is damaged ({exc}); delete it and save it again"
            ) from exc
        if meta is None:
            return None
        expires_at = meta.get("expires_at")
        if not _is_timestamp(meta.get("created_at")) or not (expires_at is None or _is_timestamp(expires_at)):
            raise DamagedCheckpoint(f"checkpoint {ref.tinker_path} is damaged (meta.json lacks valid times); delete it")
        if expires_at is not None and expires_at < time.time():
            with self._lock:
                try:  # read again under the lock: a save or a new TTL may have replaced it meanwhile
                    again = self._read_json(meta_path)
                except DamagedCheckpoint:
                    again = None
                if again is not None and again.get("expires_at") == expires_at:
                    with _suppress_oserror():
                        self._remove_aside(self._dir(ref))
                    return None
            return self._live_meta(ref)
        return meta

    def _existing_meta(self, ref: CheckpointRef) -> dict[str, Any]:
        meta = self._live_meta(ref)
        if meta is None:
            raise CheckpointNotFound.at(ref)
        return meta

    def load(self, ref: CheckpointRef, with_optimizer: bool) -> LoadedCheckpoint:
        meta = self._existing_meta(ref)
        if ref.kind not in TRAINABLE_KINDS:
            raise CheckpointError(f"{ref.tinker_path} is an export; load a weights/ or sampler_weights/ checkpoint")
        directory = self._dir(ref)
        optimizer = None
        try:
            if with_optimizer:
                try:
                    raw = self._read_bytes(f"{directory}/optimizer.pt")
                except FileNotFoundError:
                    raise CheckpointError(f"checkpoint {ref.tinker_path} has no optimizer state") from None
                optimizer = torch.load(io.BytesIO(raw), weights_only=True)
            adapter = load_safetensors(self._read_bytes(f"{directory}/adapter.safetensors"))
        except CheckpointError:
            raise
        except Exception as exc:  # a truncated or foreign file: this checkpoint only
            raise DamagedCheckpoint(
                f"checkpoint {ref.tinker_path} is damaged ({type(exc).__name__}: {exc}); delete it and save it again"
            ) from exc
        return LoadedCheckpoint(adapter=adapter, meta=meta, optimizer=optimizer)

    def files(self, ref: CheckpointRef) -> dict[str, str]:
        """URLs of the checkpoint's payload files by relative name (its metadata file excluded)."""
        self._existing_meta(ref)
        out = {}
        directory = self._dir(ref)
        for name, what in sorted(self._entries(directory)):
            if what == "file" and name != "meta.json":
                path = f"{directory}/{name}"
                url = self.fs.unstrip_protocol(path)
                out[name] = Path(path).as_uri() if url.startswith("file://") else url
        return out

    def size(self, ref: CheckpointRef) -> int:
        return self._size_of(self._dir(ref))

    def set_ttl(self, ref: CheckpointRef, ttl_seconds: int | None) -> None:
        """Expire the checkpoint ``ttl_seconds`` from now (None: never)."""
        with self._lock:
            meta = self._existing_meta(ref)
            meta["expires_at"] = time.time() + ttl_seconds if ttl_seconds else None
            self._write_json(f"{self._dir(ref)}/meta.json", meta)

    def list(self, model_id: str) -> list[dict[str, Any]]:
        """Live checkpoints of one run in the SDK's Checkpoint shape, oldest first; damaged ones are skipped."""
        out = []
        for kind, checkpoint_type in KINDS.items():
            for name in self._checkpoint_names(model_id, kind):
                ref = CheckpointRef(model_id, kind, name)
                try:
                    meta = self._live_meta(ref)
                    if meta is None:
                        continue
                    size = self.size(ref)
                except (DamagedCheckpoint, _Unsafe, OSError) as exc:
                    log.warning("damaged checkpoint skipped", extra={"path": ref.tinker_path, "error": str(exc)})
                    continue
                out.append(
                    {
                        "checkpoint_id": ref.checkpoint_id,
                        "checkpoint_type": checkpoint_type,
                        "time": iso(meta["created_at"]),
                        "tinker_path": ref.tinker_path,
                        "size_bytes": size,
                        "public": False,
                        "user_metadata": meta.get("user_metadata"),
                        "expires_at": iso(meta["expires_at"]) if meta.get("expires_at") else None,
                    }
                )
        return sorted(out, key=lambda c: c["time"])

    def delete(self, ref: CheckpointRef) -> None:
        """Delete a checkpoint (a damaged one too); a symlink at its place is not deleted through."""
        with self._lock:
            try:
                self._existing_meta(ref)
            except DamagedCheckpoint:
                pass
            if self._safe_kind(self._dir(ref)) != "dir":
                raise CheckpointNotFound.at(ref)
            self._remove_aside(self._dir(ref))

    # ------------------------------------------------------------ start-up
    def recover(self) -> dict[str, int]:
        """Finish or undo what an interrupted save, delete or metadata write left behind (run at start-up).

        An old copy left aside by an interrupted overwrite goes back in place if nothing replaced it (else it
        is deleted); partial saves, half-deleted checkpoints, temporary metadata files and checkpoint
        directories without ``meta.json`` are deleted. Returns counts of what was done, and logs them.
        """
        with self._lock:
            return self._recover_locked()

    def _recover_locked(self) -> dict[str, int]:
        done = {"restored": 0, "removed": 0}

        def remove(path: str) -> None:
            try:
                self._rmtree(path)
                done["removed"] += 1
            except (_Unsafe, OSError) as exc:
                log.warning("could not remove leftover", extra={"path": path, "error": str(exc)})

        for name, what in self._entries(self.root):
            if _HIDDEN_RE.match(name):
                remove(f"{self.root}/{name}")
        for model_id in self._run_ids():
            run_dir = self._run_dir(model_id)
            for name, what in self._entries(run_dir):
                if _HIDDEN_RE.match(name):
                    remove(f"{run_dir}/{name}")
            for kind in KINDS:
                kind_dir = f"{run_dir}/{kind}"
                entries = self._entries(kind_dir)
                names = {n for n, w in entries if w == "dir"}
                for name, what in sorted(entries):
                    hidden = _HIDDEN_RE.match(name)
                    if hidden and hidden.group(1) == "old" and what == "dir" and _NAME_RE.match(hidden.group(2)) \
                            and hidden.group(2) not in names:
                        self._rename(f"{kind_dir}/{name}", f"{kind_dir}/{hidden.group(2)}")
                        names.add(hidden.group(2))
                        done["restored"] += 1
                    elif hidden:
                        remove(f"{kind_dir}/{name}")
                for name in sorted(names):
                    if not _NAME_RE.match(name):
                        continue
                    directory = f"{kind_dir}/{name}"
                    for inner, _ in self._entries(directory):
                        if _HIDDEN_RE.match(inner):
                            remove(f"{directory}/{inner}")
                    if self._safe_kind(f"{directory}/meta.json") != "file":
                        remove(directory)  # a save from before atomic renames, interrupted
        if any(done.values()):
            log.warning("cleaned up interrupted saves", extra={"root": self.root, **done})
        return done


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except (OSError, _Unsafe):
        pass


def peft_files(adapter: dict[str, torch.Tensor], adapter_config: dict[str, Any]) -> dict[str, bytes]:
    """The files of a standard PEFT adapter directory, by name."""
    return {
        "adapter_model.safetensors": _safetensors_bytes(adapter),
        "adapter_config.json": json.dumps(adapter_config, indent=2, default=list).encode(),
    }


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})

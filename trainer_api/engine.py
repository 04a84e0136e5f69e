"""The training engine: one base model, one LoRA adapter and one AdamW optimizer per tenant.

All tensor work runs on a single worker thread that owns the model, so the math of
any one adapter is strictly serial (in arrival order, which the SDK makes equal to
its seq_id order) and no locking is needed around the model. Callers submit jobs
to a bounded queue and get a ``concurrent.futures.Future`` back; a full queue is
refused at once (backpressure) instead of growing without limit. The worker
drains whatever is queued, groups it per adapter and merges consecutive
forward_backward requests of one adapter into a single forward pass (and
sample requests for the same frozen weights into one generation batch), so many
small requests from concurrent callers keep the device busy.

Each adapter's parameters are distinct tensors, so gradients of one tenant can
never reach another; switching the active adapter is a pointer change in peft.
"""

from __future__ import annotations

import itertools
import logging
import queue
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch

from . import losses
from .checkpoints import CheckpointRef, CheckpointStore, LoadedCheckpoint, checkpoint_ref, parse_path, peft_files
from .exceptions import Busy, NotFound, ServiceError, TooLarge, UserError
from .numeric import all_finite
from .optim import AdamStep, adam_step, new_optimizer
from .sampling import SampleTask, SamplingSpec, generate
from .vllm_sampler import VllmOptions, VllmSampler
from .wire import ForwardBackwardIn, ForwardBackwardOut, SampleOut

log = logging.getLogger("trainer_api.engine")
T = TypeVar("T")

_ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
LORA_ALPHA = 32
TOKEN_WINDOW_S = 60.0  # the window of the tokens-per-second gauge
"""Fixed LoRA alpha, so that a learning rate means the same thing at every rank."""


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA shape of a tenant; stored with checkpoints to rebuild it.

    The unembedding is never a LoRA target, so ``train_unembed`` is always recorded False
    (registering a tenant turns the SDK's default True into False). vLLM cannot serve LoRA
    on ``lm_head``, and Gemma ties it to the input embedding, where peft cannot merge it
    (tinker-cookbook's ``build_hf_model``).
    """

    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def target_modules(self) -> list[str]:
        return (_ATTN_MODULES if self.train_attn else []) + (_MLP_MODULES if self.train_mlp else [])

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=self.target_modules()
        )

    def peft_json(self, base_model: str) -> dict[str, Any]:
        """``adapter_config.json`` of a PEFT directory holding this adapter (exports, vLLM's adapters)."""
        config = self.peft_config().to_dict()
        config["base_model_name_or_path"] = base_model
        return config

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "seed": self.seed,
            "train_mlp": self.train_mlp,
            "train_attn": self.train_attn,
            "train_unembed": self.train_unembed,
        }


BASE_SNAPSHOT = "base"
"""Snapshot key of the base model without any adapter."""


@dataclass(frozen=True)
class Snapshot:
    """Frozen weights a sampler serves: a copy taken at save time, or the base model (adapter None)."""

    snapshot_id: str
    lora: LoraSpec | None
    adapter: dict[str, torch.Tensor] | None
    owner: str | None = None
    """The training run whose weights these are: its device seconds pay for sampling them."""


@dataclass(frozen=True)
class _Spilled:
    """An unnamed snapshot evicted from memory: its adapter in a file of the spill directory."""

    path: Path
    snapshot_id: str
    lora: LoraSpec
    owner: str | None
    size: int


@dataclass
class Tenant:
    """One training run: its adapter, optimizer and counters."""

    model_id: str
    session_id: str
    lora: LoraSpec
    user_metadata: dict[str, Any]
    adapter: str
    created_at: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)
    optimizer: torch.optim.AdamW | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    unloading: bool = False


@dataclass
class _Job:
    """Work for the worker: a callable, a forward_backward request, or a sample request."""

    key: str
    future: Future
    fn: Callable[[], Any] | None = None
    fwd: ForwardBackwardIn | None = None
    tokens: int = 0
    sample: tuple[Snapshot, SampleTask] | None = None


@dataclass(frozen=True)
class EngineLimits:
    """Bounds that keep one caller from exhausting the service."""

    max_queue: int = 1024
    max_seq_len: int = 2048
    max_batch_datums: int = 512
    max_batch_tokens: int = 65536
    max_sample_tokens: int = 1024
    max_num_samples: int = 64
    max_lora_rank: int = 64
    max_snapshots: int = 64
    """Sampler snapshots kept in memory, all keys together (``--resident-snapshots``); the least recently
    used beyond it are written to a spill directory (named ones are on disk already) and read back on demand."""
    max_spill_bytes: int = 16 * 2**30
    """Disk the spilled unnamed snapshots may take (``--snapshot-spill-gib``); the oldest beyond it are
    deleted, and their samplers answer 404 saying so."""
    max_sampler_slots: int = 4
    """Torch sampler only: sampling adapters resident in the model, one per LoRA shape, least recently
    used replaced (each is a full adapter in device memory)."""
    max_stop_sequences: int = 16
    """Stop strings (and, separately, stop token ids) per sample request: each one is searched for at every step."""
    max_stop_chars: int = 256


def _accumulated_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients ``params`` would hold once ``loss`` is added to what they have accumulated.

    Computed out of place, so that a request refused for non-finite gradients leaves the
    accumulated ones (and a merged batch rerun one request at a time) untouched.
    """
    summed: list[torch.Tensor | None] = []
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
        summed.append(p.grad if g is None else g if p.grad is None else p.grad + g)
    return summed


class Engine:
    """Owns the model and the worker thread; every public method is safe to call from any thread."""

    def __init__(
        self,
        base_model: str,
        store: CheckpointStore,
        limits: EngineLimits = EngineLimits(),
        device: str | None = None,
        dtype: str | None = None,
        model_name: str | None = None,
        vllm: VllmOptions | None = None,
    ) -> None:
        """``vllm``: serve every sample request with a vLLM engine (options given), else with the torch sampler."""
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_model = base_model
        self.model_name = model_name or base_model
        """The name clients use (e.g. a hub id while weights load from a local directory)."""
        self.store = store
        self.limits = limits
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype).to(self.device)
        model.eval()
        self.arch = type(model).__name__
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_seq_len = min(limits.max_seq_len, int(getattr(model.config, "max_position_embeddings", limits.max_seq_len)))
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        with warnings.catch_warnings():
            # LoRA on a tied lm_head only changes the output projection; the warning is about merging.
            warnings.simplefilter("ignore")
            self.peft = get_peft_model(model, LoraSpec(rank=1, train_mlp=False, train_unembed=False).peft_config(), adapter_name="placeholder")
        self.peft.eval()
        self._tenants: dict[str, Tenant] = {}
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._spilling: dict[str, Snapshot] = {}
        """Evicted unnamed snapshots while their spill file is written (still served from memory meanwhile)."""
        self._spilled: OrderedDict[str, _Spilled] = OrderedDict()
        self._spill_dir = Path(tempfile.mkdtemp(prefix="trainer-api-snapshots-"))
        self._slots: OrderedDict[tuple, str] = OrderedDict()
        self._slot_owner: dict[str, str] = {}
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=limits.max_queue)
        self.tokens_total = 0
        self.forward_passes = 0
        self.forward_requests = 0
        self.sample_batches = 0
        self.sample_requests = 0
        self._token_window: deque[tuple[float, int]] = deque()
        self._device_seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="trainer-engine", daemon=True)
        self._worker.start()
        self.sampler = "torch" if vllm is None else "vllm"
        self._vllm = None if vllm is None else VllmSampler(
            base_model, vllm, max_seq_len=self.max_seq_len, max_lora_rank=limits.max_lora_rank,
            dtype=str(torch_dtype).removeprefix("torch."), device_type=self.device.type,
            adapter_files=lambda snap: peft_files(snap.adapter, snap.lora.peft_json(self.model_name)),
            account=self._account_vllm, max_adapters=limits.max_snapshots,
        )

    # ----------------------------------------------------------------- submit side
    def _submit(self, job: _Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the training queue is full ({self.limits.max_queue} requests); retry later") from None
        return job.future

    def _call(self, key: str, fn: Callable[[], Any]) -> Future:
        return self._submit(_Job(key=key, future=Future(), fn=fn))

    def tenant(self, model_id: str) -> Tenant:
        """The live tenant for ``model_id`` or a 404 that names it."""
        with self._lock:
            tenant = self._tenants.get(model_id)
        if tenant is None or tenant.unloading:
            raise NotFound(f"unknown model_id {model_id!r}: it was never created on this service or was unloaded")
        tenant.last_request_time = time.time()
        return tenant

    def tenants(self) -> list[Tenant]:
        with self._lock:
            return list(self._tenants.values())

    def check_base_model(self, base_model: str | None) -> None:
        if base_model is not None and base_model not in (self.model_name, self.base_model):
            raise UserError(f"this service serves base model {self.model_name!r}, not {base_model!r}")

    def check_lora(self, lora: LoraSpec) -> None:
        if not 1 <= lora.rank <= self.limits.max_lora_rank:
            raise UserError(f"LoRA rank must be between 1 and {self.limits.max_lora_rank}, got {lora.rank}")
        if not lora.target_modules():
            raise UserError("at least one of train_mlp and train_attn must be true (the unembedding is not trained)")

    def create_model(self, model_id: str, session_id: str, lora: LoraSpec, user_metadata: dict[str, Any]) -> Future:
        """Register a tenant now (so later requests queue behind it) and build its adapter on the worker."""
        tenant = self._register(model_id, session_id, lora, user_metadata)
        return self._build_then(tenant, lambda: model_id)

    def _register(self, model_id: str, session_id: str, lora: LoraSpec, user_metadata: dict[str, Any]) -> Tenant:
        lora = replace(lora, train_unembed=False)  # see LoraSpec
        self.check_lora(lora)
        with self._lock:
            if model_id in self._tenants:
                raise UserError(f"model {model_id!r} already exists")
            tenant = Tenant(model_id, session_id, lora, dict(user_metadata or {}), adapter=f"tenant{next(self._names)}")
            self._tenants[model_id] = tenant
        return tenant

    def _build_then(self, tenant: Tenant, then: Callable[[], Any]) -> Future:
        """Queue building ``tenant``'s adapter and then ``then`` as one job.

        One job, so a full queue or a failure never leaves a registered tenant without an
        adapter (or half loaded): the tenant is forgotten and the request can be retried.
        """

        def run() -> Any:
            try:
                self._build_adapter(tenant)
                result = then()
            except BaseException:
                self._forget(tenant)
                raise
            self._record_run(tenant)
            return result

        try:
            return self._call(tenant.model_id, run)
        except Busy:
            self._forget(tenant)
            raise

    def _forget(self, tenant: Tenant) -> None:
        with self._lock:
            self._tenants.pop(tenant.model_id, None)
        if tenant.adapter in self.peft.peft_config:
            with warnings.catch_warnings():  # peft warns that the active adapter changes; we always set it
                warnings.simplefilter("ignore")
                self.peft.delete_adapter(tenant.adapter)
        tenant.optimizer = None
        tenant.params = []

    def forward_backward(self, req: ForwardBackwardIn) -> Future:
        """Validate a request here (cheap, on the caller's thread) and queue the math."""
        self.tenant(req.model_id)
        tokens = self.validate(req)
        return self._submit(_Job(key=req.model_id, future=Future(), fwd=req, tokens=tokens))

    def validate(self, req: ForwardBackwardIn) -> int:
        """Reject malformed batches with a message that says what is wrong; return the token count."""
        losses.resolve_config(req.loss_fn, req.loss_fn_config)  # an unsupported loss is refused there, saying why
        if not req.data:
            raise UserError("forward_backward needs at least one datum; the batch is empty")
        if len(req.data) > self.limits.max_batch_datums:
            raise TooLarge(f"batch has {len(req.data)} datums; the limit is {self.limits.max_batch_datums}")
        total = 0
        for i, datum in enumerate(req.data):
            n = int(datum.tokens.size)
            if n == 0:
                raise UserError(f"data[{i}].model_input is empty")
            if n > self.max_seq_len:
                raise TooLarge(f"data[{i}] has {n} tokens; the maximum sequence length is {self.max_seq_len}")
            total += n
            if datum.tokens.min() < 0 or datum.tokens.max() >= self.vocab_size:
                raise UserError(f"data[{i}].model_input has token ids outside [0, {self.vocab_size})")
            for name in losses.LOSS_INPUTS[req.loss_fn]:  # other inputs are ignored, as Tinker does
                arr = datum.inputs.get(name)
                if arr is None:
                    if name in losses.OPTIONAL_INPUTS:
                        continue
                    raise UserError(f"data[{i}].loss_fn_inputs lacks {name!r}, which {req.loss_fn} needs")
                if arr.ndim != 1 or arr.size != n:
                    raise UserError(
                        f"data[{i}].loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; "
                        f"expected [{n}] (one value per input token)"
                    )
                if not np.all(np.isfinite(arr)):
                    raise UserError(f"data[{i}].loss_fn_inputs[{name!r}] has non-finite values")
                if name == "sequence_ratio_mask" and not np.any(arr):
                    raise UserError(
                        f"data[{i}].loss_fn_inputs['sequence_ratio_mask'] marks no token: the sequence's importance "
                        "ratio is a mean over the tokens it marks (omit it to use the sampled tokens)"
                    )
            targets = datum.inputs["target_tokens"]
            if targets.min() < 0 or targets.max() >= self.vocab_size:
                raise UserError(f"data[{i}].loss_fn_inputs['target_tokens'] has ids outside [0, {self.vocab_size})")
        if total > self.limits.max_batch_tokens:
            raise TooLarge(f"batch has {total} tokens; the limit is {self.limits.max_batch_tokens}")
        return total

    def optim_step(self, model_id: str, step: AdamStep) -> Future:
        """Validate ``step`` here and queue it; the step is refused, and the adapter kept, if it would overflow."""
        tenant = self.tenant(model_id)
        step.check()
        return self._call(model_id, lambda: self._metered_call(model_id, self._optim_step, tenant, step))

    def save_state(
        self, model_id: str, name: str, overwrite: bool, user_metadata: dict | None, ttl_seconds: int | None = None
    ) -> Future:
        """Save adapter and optimizer state; resolves to the tinker:// path."""
        tenant = self.tenant(model_id)
        ref = checkpoint_ref(model_id, "weights", name)
        return self._call(model_id, lambda: self._save(tenant, ref, True, overwrite, user_metadata, ttl_seconds))

    def save_external(
        self, model_id: str, name: str, ttl_seconds: int | None = None, recipients: Sequence[Any] = ()
    ) -> Future:
        """Export the adapter as a standard PEFT directory, its files encrypted to ``recipients`` (parsed age
        recipients, ``checkpoints.age_recipients``) when there are any; resolves to (tinker:// path, size in bytes).
        Both happen in one job, so the request resolves only once the export is as the client asked."""
        tenant = self.tenant(model_id)
        ref = checkpoint_ref(model_id, "external_weights", name)

        def run() -> tuple[str, int]:
            meta = {"base_model": self.model_name, "lora": tenant.lora.to_json(), "steps": tenant.steps}
            path = self.store.save_external(ref, self._adapter_state(tenant), tenant.lora.peft_json(self.model_name), meta, ttl_seconds)
            return path, self.store.encrypt_export(ref, list(recipients)) if recipients else self.store.size(ref)

        return self._call(model_id, run)

    def save_for_sampler(
        self, model_id: str, name: str | None, user_metadata: dict | None, ttl_seconds: int | None = None
    ) -> Future:
        """Snapshot the adapter now, so later training never changes what a sampler serves.

        A named snapshot is also written to disk. Resolves to the snapshot's key for
        ``snapshot()``: its tinker:// path, or an ephemeral id for an unnamed one.
        """
        tenant = self.tenant(model_id)
        ref = checkpoint_ref(model_id, "sampler_weights", name) if name is not None else None

        def run() -> str:
            adapter = self._adapter_state(tenant)
            path = self._save(tenant, ref, False, True, user_metadata, ttl_seconds, adapter) if ref else None
            snap = Snapshot(uuid.uuid4().hex, tenant.lora, adapter, owner=tenant.model_id)
            key = path or f"ephemeral:{snap.snapshot_id}"
            self._remember(key, snap)
            return key

        return self._call(model_id, run)

    def load_state(self, model_id: str, path: str, with_optimizer: bool, *, create: tuple[str, dict] | None = None) -> Future:
        """Load a checkpoint into a tenant; with ``create`` (session_id, user_metadata) build that tenant first."""
        ref = parse_path(path)
        if ref.kind != "weights" and with_optimizer:
            raise UserError(f"{path} is a sampler checkpoint and has no optimizer state")
        loaded = self._load_checkpoint(path, with_optimizer)
        lora = LoraSpec(**loaded.meta["lora"])
        if create is not None:
            session_id, user_metadata = create
            tenant = self._register(model_id, session_id, lora, user_metadata)
            return self._build_then(tenant, lambda: self._load(tenant, loaded, path))
        tenant = self.tenant(model_id)
        if tenant.lora.rank != lora.rank or tenant.lora.target_modules() != lora.target_modules():
            raise UserError(f"checkpoint {path} has LoRA {lora.to_json()} but model {model_id} has {tenant.lora.to_json()}")
        return self._call(model_id, lambda: self._load(tenant, loaded, path))

    def unload(self, model_id: str) -> Future:
        """Free the tenant's adapter and optimizer once its queued requests are done."""
        tenant = self.tenant(model_id)
        tenant.unloading = True

        def run() -> str:
            self._forget(tenant)
            log.info("model unloaded", extra={"model_id": model_id})
            return model_id

        try:
            return self._call(model_id, run)
        except Busy:
            tenant.unloading = False
            raise

    def snapshot(self, key: str) -> Snapshot:
        """The frozen weights behind ``key``: BASE_SNAPSHOT, a tinker:// sampler path, or an ephemeral id.

        Snapshots live in an LRU of ``max_snapshots`` entries, all tenants together, so that RL
        loops creating a sampler per iteration do not grow memory without bound. One evicted from
        it is read back on demand: a path from its checkpoint, an unnamed snapshot from the spill
        file written when it was evicted. Either way it is the same immutable weights, so a sampling
        client samples exactly what it was created with.
        """
        if key == BASE_SNAPSHOT:
            return Snapshot(BASE_SNAPSHOT, None, None)
        with self._lock:
            snap = self._snapshots.get(key) or self._spilling.get(key)
            if snap is not None:
                self._snapshots[key] = snap
                self._snapshots.move_to_end(key)
                return snap
            spilled = self._spilled.get(key)
            if spilled is not None:
                self._spilled.move_to_end(key)
        if key.startswith("tinker://"):
            loaded = self._load_checkpoint(key, with_optimizer=False)
            snap = Snapshot(uuid.uuid4().hex, LoraSpec(**loaded.meta["lora"]), loaded.adapter, owner=parse_path(key).model_id)
        else:
            snap = self._read_spilled(spilled) if spilled is not None else None
            if snap is None:
                raise NotFound(
                    f"sampler weights {key} were evicted: unnamed snapshots pushed out of memory are kept on disk up "
                    f"to {self.limits.max_spill_bytes / 2**30:g} GiB, least recently used dropped first; "
                    "save_weights_for_sampler(name) keeps them as checkpoints"
                )
        self._remember(key, snap)
        return snap

    @staticmethod
    def _read_spilled(spilled: _Spilled) -> Snapshot | None:
        """The snapshot in a spill file, under its original id (the same weights); None if the file was dropped meanwhile."""
        from safetensors.torch import load_file

        try:
            adapter = load_file(spilled.path)
        except FileNotFoundError:
            return None
        return Snapshot(spilled.snapshot_id, spilled.lora, adapter, owner=spilled.owner)

    def _load_checkpoint(self, path: str, with_optimizer: bool) -> LoadedCheckpoint:
        loaded = self.store.load(parse_path(path), with_optimizer)
        if loaded.meta["base_model"] not in (self.model_name, self.base_model):
            raise UserError(
                f"checkpoint {path} was trained on base model {loaded.meta['base_model']!r}; "
                f"this service serves {self.model_name!r}"
            )
        if loaded.meta["lora"].get("train_unembed"):
            raise UserError(f"checkpoint {path} has a LoRA on the unembedding, which this service no longer trains or serves")
        return loaded

    def _remember(self, key: str, snap: Snapshot) -> None:
        """Keep ``snap`` in memory as the most recently used, spilling unnamed ones pushed out of the LRU.

        The spill file is written outside the lock; meanwhile the snapshot stays reachable in
        ``_spilling``, so no request finds it missing in between.
        """
        evicted: list[tuple[str, Snapshot]] = []
        with self._lock:
            self._snapshots[key] = snap
            self._snapshots.move_to_end(key)
            while len(self._snapshots) > self.limits.max_snapshots:
                old_key, old = self._snapshots.popitem(last=False)
                if not old_key.startswith("tinker://") and old_key not in self._spilled and old_key not in self._spilling:
                    self._spilling[old_key] = old
                    evicted.append((old_key, old))
        for old_key, old in evicted:
            self._spill(old_key, old)

    def _spill(self, key: str, snap: Snapshot) -> None:
        """Write an evicted unnamed snapshot to the spill directory, then drop the oldest beyond the byte cap."""
        from safetensors.torch import save_file

        assert snap.lora is not None and snap.adapter is not None
        path = self._spill_dir / f"{snap.snapshot_id}.safetensors"
        try:
            save_file(snap.adapter, path)
            entry = _Spilled(path, snap.snapshot_id, snap.lora, snap.owner, path.stat().st_size)
        except Exception:  # never fails the request whose snapshot pushed this one out
            log.exception("could not spill a sampler snapshot; it is dropped", extra={"key": key})
            entry = None
        dropped: list[_Spilled] = []
        with self._lock:
            wanted = self._spilling.pop(key, None) is not None  # not forgotten while the file was written
            if entry is not None:
                if wanted:
                    self._spilled[key] = entry
                else:
                    dropped.append(entry)
            total = sum(e.size for e in self._spilled.values())
            while total > self.limits.max_spill_bytes and self._spilled:
                _, gone = self._spilled.popitem(last=False)
                total -= gone.size
                dropped.append(gone)
        for gone in dropped:
            gone.path.unlink(missing_ok=True)

    def forget_snapshots(self, keys: Iterable[str]) -> None:
        """Drop unnamed snapshots that no sampler can reach any more (their sessions were forgotten), from
        memory and from the spill directory, which would otherwise hold them until its byte cap pushed them out.
        Named snapshots are checkpoints: they stay on disk and may still be loaded by path."""
        gone: list[_Spilled] = []
        with self._lock:
            for key in keys:
                if key == BASE_SNAPSHOT or key.startswith("tinker://"):
                    continue
                self._snapshots.pop(key, None)
                self._spilling.pop(key, None)
                spilled = self._spilled.pop(key, None)
                if spilled is not None:
                    gone.append(spilled)
        for entry in gone:
            entry.path.unlink(missing_ok=True)

    def sample(self, snap: Snapshot, task: SampleTask) -> Future:
        """Queue a sample request; queued requests for the same weights are generated as one batch."""
        prompt = task.prompt
        if not prompt:
            raise UserError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise UserError(f"the prompt has token ids outside [0, {self.vocab_size})")
        if not 1 <= task.num_samples <= self.limits.max_num_samples:
            raise UserError(f"num_samples must be between 1 and {self.limits.max_num_samples}")
        if len(prompt) > self.max_seq_len:
            raise TooLarge(f"the prompt has {len(prompt)} tokens; the context, prompt included, is {self.max_seq_len} tokens")
        task.spec.check()
        if len(prompt) + task.spec.max_tokens > self.max_seq_len:
            raise TooLarge(f"prompt ({len(prompt)}) plus max_tokens ({task.spec.max_tokens}) exceeds {self.max_seq_len} tokens")
        self._check_stops(task.spec)
        if self._vllm is not None:
            return self._vllm.submit(snap, task)
        return self._submit(_Job(key=f"sampler:{snap.snapshot_id}", future=Future(), sample=(snap, task)))

    def _check_stops(self, spec: SamplingSpec) -> None:
        """Bound the stop conditions: every stop string is searched for after every sampled token."""
        most, chars = self.limits.max_stop_sequences, self.limits.max_stop_chars
        for what, count in (("stop strings", len(spec.stop_strings)), ("stop token ids", len(spec.stop_token_ids))):
            if count > most:
                raise UserError(f"sampling_params.stop has {count} {what}; at most {most} are accepted")
        longest = max(map(len, spec.stop_strings), default=0)
        if longest > chars:
            raise UserError(f"sampling_params.stop has a {longest}-character stop string; at most {chars} characters are accepted")

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def device_seconds_by_run(self) -> dict[str, float]:
        """Seconds the worker spent computing for each training run (forward-backward, optimizer steps, sampling
        its weights); kept after a model is unloaded, so a trial can read its cost at any time."""
        with self._lock:
            return dict(self._device_seconds)

    def device_seconds(self, model_id: str) -> float:
        """``model_id``'s entry of :meth:`device_seconds_by_run`: 0 for a run that computed nothing yet."""
        seconds = self.device_seconds_by_run().get(model_id)
        if seconds is None and self.store.read_run(model_id) is None:
            raise NotFound(f"unknown training run {model_id!r}")
        return seconds or 0.0

    def _metered_call(self, model_id: str | None, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, its time charged to ``model_id``; on CUDA it waits for the kernels, so the time is theirs."""
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._charge(model_id, time.perf_counter() - started)

    def _charge(self, model_id: str | None, seconds: float) -> None:
        if model_id is not None:
            with self._lock:
                self._device_seconds[model_id] = self._device_seconds.get(model_id, 0.0) + seconds

    def _account_vllm(self, snap: Snapshot, task: SampleTask, out: SampleOut, seconds: float) -> None:
        """Counters for a request vLLM served: its wall time is charged to the weights' owner (vLLM batches
        requests of several tenants together, so this overstates each one's share of the device)."""
        self._charge(snap.owner, seconds)
        self._count_samples([task], [out])

    def _count_samples(self, tasks: list[SampleTask], outs: list[SampleOut]) -> None:
        n = sum(len(s.tokens) for out in outs for s in out.sequences) + sum(len(t.prompt) for t in tasks)
        with self._lock:
            self.sample_batches += 1
            self.sample_requests += len(tasks)
            self._count_tokens(n)

    def _count_tokens(self, n: int) -> None:
        """Count ``n`` processed tokens; call with ``_lock`` held. Entries older than the window are dropped here,
        not only when ``/metrics`` is scraped, so the window stays bounded on a service nobody scrapes."""
        now = time.time()
        self.tokens_total += n
        self._token_window.append((now, n))
        while self._token_window[0][0] < now - TOKEN_WINDOW_S:
            self._token_window.popleft()

    def tokens_per_second(self) -> float:
        now = time.time()
        with self._lock:
            return sum(n for t, n in self._token_window if t >= now - TOKEN_WINDOW_S) / TOKEN_WINDOW_S

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)
        if self._vllm is not None:
            self._vllm.close()
        shutil.rmtree(self._spill_dir, ignore_errors=True)

    # ----------------------------------------------------------------- worker side
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[str, list[_Job]] = {}
            for job in jobs:
                # Skips jobs cancelled while queued (cancel_future); the rest can no longer be cancelled.
                if job.future.set_running_or_notify_cancel():
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                try:
                    self._run_group(group)
                except BaseException:  # the worker must outlive any single bug
                    log.exception("engine worker error")
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(ServiceError("internal error in the training engine"))

    def _run_group(self, jobs: list[_Job]) -> None:
        """Run one adapter's jobs in order, merging runs of compatible forward_backward jobs
        and runs of sample jobs (one key means one set of frozen weights)."""
        i = 0
        while i < len(jobs):
            job = jobs[i]
            if job.sample is not None:
                batch = [job]
                rows = job.sample[1].num_samples
                while (
                    i + len(batch) < len(jobs)
                    and (nxt := jobs[i + len(batch)]).sample is not None
                    and rows + nxt.sample[1].num_samples <= self.limits.max_num_samples
                ):
                    batch.append(nxt)
                    rows += nxt.sample[1].num_samples
                snap = job.sample[0]
                self._settle_batch(
                    batch, lambda jobs: self._metered_call(snap.owner, self._sample, snap, [j.sample[1] for j in jobs])
                )
                i += len(batch)
                continue
            if job.fwd is None:
                self._settle(job.future, job.fn)
                i += 1
                continue
            batch = [job]
            tokens = job.tokens
            while (
                i + len(batch) < len(jobs)
                and (nxt := jobs[i + len(batch)]).fwd is not None
                and (nxt.fwd.loss_fn, nxt.fwd.loss_fn_config, nxt.fwd.forward_only)
                == (job.fwd.loss_fn, job.fwd.loss_fn_config, job.fwd.forward_only)
                and tokens + nxt.tokens <= self.limits.max_batch_tokens
            ):
                batch.append(nxt)
                tokens += nxt.tokens
            model_id = job.fwd.model_id
            self._settle_batch(
                batch, lambda jobs: self._metered_call(model_id, self._forward_backward, [j.fwd for j in jobs])
            )
            i += len(batch)

    @classmethod
    def _settle_batch(cls, batch: list[_Job], run: Callable[[list[_Job]], list[Any]]) -> None:
        """Resolve merged jobs with one result each, never failing the worker.

        A merged batch that fails is run again one job at a time, so that a bad request
        fails alone and the requests merged with it still succeed (they may belong to
        other tenants). ``run`` must therefore leave no state behind when it raises.
        """
        try:
            results = run(batch)
        except BaseException as exc:
            if len(batch) > 1:
                for b in batch:
                    cls._settle_batch([b], run)
                return
            if not isinstance(exc, ServiceError):
                log.exception("batched job failed")
            batch[0].future.set_exception(exc)
        else:
            for b, result in zip(batch, results):
                b.future.set_result(result)

    @staticmethod
    def _settle(future: Future, fn: Callable[[], Any]) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            if not isinstance(exc, ServiceError):
                log.exception("engine job failed")
            future.set_exception(exc)

    def _activate(self, tenant: Tenant) -> None:
        """Make ``tenant``'s adapter the one forward passes use, with gradients on its weights only."""
        self.peft.set_adapter(tenant.adapter)
        for p in tenant.params:
            p.requires_grad_(True)

    def _build_adapter(self, tenant: Tenant) -> None:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(tenant.lora.seed if tenant.lora.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little"))
            self.peft.add_adapter(tenant.adapter, tenant.lora.peft_config())
        marker = f".{tenant.adapter}."
        tenant.params = [p for n, p in self.peft.named_parameters() if marker in n]
        tenant.optimizer = new_optimizer(tenant.params)
        self._activate(tenant)
        log.info("model created", extra={"model_id": tenant.model_id, "rank": tenant.lora.rank})

    def _record_run(self, tenant: Tenant) -> None:
        self.store.write_run(
            tenant.model_id,
            {
                "training_run_id": tenant.model_id,
                "base_model": self.model_name,
                "lora": tenant.lora.to_json(),
                "session_id": tenant.session_id,
                "user_metadata": tenant.user_metadata,
                "created_at": tenant.created_at,
            },
        )

    def _forward_backward(self, reqs: list[ForwardBackwardIn]) -> list[ForwardBackwardOut]:
        tenant = self.tenant(reqs[0].model_id)
        first = reqs[0]
        config = losses.resolve_config(first.loss_fn, first.loss_fn_config)
        datums = [d for r in reqs for d in r.data]
        lengths = [int(d.tokens.size) for d in datums]
        width = max(lengths)
        input_ids = torch.full((len(datums), width), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        targets = torch.zeros((len(datums), width), dtype=torch.long)
        mask = torch.zeros((len(datums), width), dtype=torch.bool)
        for row, (datum, n) in enumerate(zip(datums, lengths)):
            input_ids[row, :n] = torch.from_numpy(datum.tokens)
            targets[row, :n] = torch.from_numpy(datum.inputs["target_tokens"].astype(np.int64))
            mask[row, :n] = True
        names = [k for k in losses.LOSS_INPUTS[first.loss_fn] if k != "target_tokens"]
        flat_inputs = {
            k: torch.from_numpy(
                np.concatenate([
                    (d.inputs[k] if k in d.inputs else losses.default_input(k, d.inputs, n)).astype(np.float32)
                    for d, n in zip(datums, lengths)
                ])
            ).to(self.device)
            for k in names
        }
        flat_inputs[losses.DATUM_INDEX] = torch.repeat_interleave(
            torch.arange(len(datums)), torch.tensor(lengths)
        ).to(self.device)
        self._activate(tenant)
        grad = nullcontext() if not first.forward_only else torch.no_grad()
        with grad:
            logits = self.peft(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device).long()
            ).logits.float()
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.to(self.device)[..., None]).squeeze(-1)
            flat_lp = token_lp[mask.to(self.device)]
            result = losses.compute_loss(first.loss_fn, flat_lp, flat_inputs, config)
            grads = [] if first.forward_only else _accumulated_gradients(tenant.params, result.loss)
        outputs = self._split_outputs(reqs, lengths, flat_lp.detach(), result, flat_inputs)
        metrics = [value for out in outputs for value in out.metrics.values()]
        if not all_finite([result.loss, flat_lp, *(g for g in grads if g is not None), *metrics]):
            raise UserError(
                f"{'forward' if first.forward_only else 'forward_backward'} refused: its loss or gradients are not "
                "finite (are loss_fn_inputs such as weights or advantages too large?); the adapter and its "
                "accumulated gradients are as they were"
            )
        for p, g in zip(tenant.params, grads):
            p.grad = g
        n_tokens = sum(lengths)
        tenant.tokens += n_tokens
        with self._lock:
            self.forward_passes += 1
            self.forward_requests += len(reqs)
            self._count_tokens(n_tokens)
        return outputs

    @staticmethod
    def _split_outputs(
        reqs: list[ForwardBackwardIn],
        lengths: list[int],
        flat_lp: torch.Tensor,
        result: losses.LossResult,
        flat_inputs: dict[str, torch.Tensor],
    ) -> list[ForwardBackwardOut]:
        """Cut the merged pass's flat per-token tensors back into each request's datums and metrics."""
        # One copy to the host for the whole batch, not two per datum.
        host_lp, host_loss = flat_lp.cpu().numpy(), result.elementwise_loss.cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        outputs: list[ForwardBackwardOut] = []
        end = 0
        for req in reqs:
            start, end = end, end + len(req.data)  # this request's datums
            per_datum = [
                {"logprobs": host_lp[bounds[d] : bounds[d + 1]], "elementwise_loss": host_loss[bounds[d] : bounds[d + 1]]}
                for d in range(start, end)
            ]
            piece = slice(int(bounds[start]), int(bounds[end]))
            metrics = losses.loss_metrics(
                reqs[0].loss_fn,
                result.elementwise_loss[piece],
                flat_lp[piece],
                {k: v[piece] for k, v in flat_inputs.items()},
            )
            outputs.append(ForwardBackwardOut(per_datum, metrics))
        return outputs

    def _optim_step(self, tenant: Tenant, step: AdamStep) -> dict[str, float]:
        assert tenant.optimizer is not None
        metrics = adam_step(tenant.params, tenant.optimizer, step)
        tenant.steps += 1
        return metrics

    def _adapter_state(self, tenant: Tenant) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: a LoRA on a tied lm_head must not copy the base embedding.
        state = get_peft_model_state_dict(self.peft, adapter_name=tenant.adapter, save_embedding_layers=False)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _save(
        self,
        tenant: Tenant,
        ref: CheckpointRef,
        with_optimizer: bool,
        overwrite: bool,
        user_metadata: dict | None,
        ttl_seconds: int | None,
        adapter: dict[str, torch.Tensor] | None = None,
    ) -> str:
        meta = {"base_model": self.model_name, "lora": tenant.lora.to_json(), "steps": tenant.steps, "user_metadata": user_metadata}
        optimizer = tenant.optimizer.state_dict() if with_optimizer and tenant.optimizer else None
        return self.store.save(ref, adapter or self._adapter_state(tenant), meta, optimizer, overwrite, ttl_seconds)

    def _load(self, tenant: Tenant, loaded: LoadedCheckpoint, path: str) -> str:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft, {k: v.to(self.device) for k, v in loaded.adapter.items()}, adapter_name=tenant.adapter)
        for p in tenant.params:
            p.grad = None
        tenant.optimizer = new_optimizer(tenant.params)
        if loaded.optimizer is not None:
            tenant.optimizer.load_state_dict(loaded.optimizer)
        tenant.steps = int(loaded.meta.get("steps", 0))
        log.info("checkpoint loaded", extra={"model_id": tenant.model_id, "path": path})
        return path

    def _sampler_adapter(self, snap: Snapshot) -> str:
        """Load ``snap`` into a sampling slot of its LoRA shape (reused while it stays the owner).

        At most ``max_sampler_slots`` slots are resident in the model; the least recently used
        one is deleted to make room, and its snapshot loaded again when it is next sampled.
        """
        from peft import set_peft_model_state_dict

        assert snap.lora is not None and snap.adapter is not None
        key = (snap.lora.rank, tuple(snap.lora.target_modules()))
        slot = self._slots.get(key)
        if slot is None:
            while len(self._slots) >= self.limits.max_sampler_slots:
                _, old = self._slots.popitem(last=False)
                self._slot_owner.pop(old, None)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.peft.delete_adapter(old)
            slot = self._slots[key] = f"sampler{next(self._names)}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.peft.add_adapter(slot, snap.lora.peft_config())
        self._slots.move_to_end(key)
        if self._slot_owner.get(slot) != snap.snapshot_id:
            set_peft_model_state_dict(self.peft, {k: v.to(self.device) for k, v in snap.adapter.items()}, adapter_name=slot)
            self._slot_owner[slot] = snap.snapshot_id
        return slot

    def _sample(self, snap: Snapshot, tasks: list[SampleTask]) -> list[SampleOut]:
        if snap.lora is None:
            context = self.peft.disable_adapter()
        else:
            self.peft.set_adapter(self._sampler_adapter(snap))
            context = nullcontext()
        with context:
            outs = generate(
                self.peft, tasks,
                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
                device=self.device, pad_id=int(self.tokenizer.pad_token_id or 0),
            )
        self._count_samples(tasks, outs)
        return outs

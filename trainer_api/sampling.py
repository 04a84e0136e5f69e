"""Torch sampling backend: autoregressive generation with a KV cache.

Returned log-probabilities are those of the model's own next-token distribution
(``log_softmax`` of the raw logits), not of the temperature/top-k/top-p adjusted
one: that is what a training forward pass computes for the same tokens, so the
importance ratios of the RL losses start at exactly 1 for on-policy data.
"""

from __future__ import annotations

import inspect
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .exceptions import UserError
from .numeric import all_finite, check_int, check_number
from .wire import SampledSeq, SampleOut

SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds are signed 64-bit integers; each sample's hash seed is derived from it modulo 2**64."""


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


_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15
"""splitmix64's increment (2**64 / golden ratio, odd): consecutive counters land far apart before mixing."""


def _signed64(value: int) -> int:
    """``value`` modulo 2**64 as the signed int64 that holds the same bits, the only form a torch tensor takes."""
    value &= _MASK64
    return value - 2**64 if value >= 2**63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: torch shifts signed integers arithmetically, so the sign
    copies shifted in are masked off."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors; torch's int64 multiply wraps modulo 2**64, as the mixer needs."""
    z = (z ^ _shr(z, 30)) * _signed64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def _uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row: the ``step``-th output of a splitmix64 stream keyed by the row's seed.

    A counter-based hash rather than a per-row ``torch.Generator``: all rows draw in one vectorised call, and a
    row's draws depend on its own seed and the step only, not on the rows it is batched with.
    """
    state = _mix64(seeds) + _signed64((step + 1) * _GOLDEN)
    return _shr(_mix64(state), 11).double() * 2.0**-53


@dataclass(frozen=True)
class _RowParams:
    """Every row's sampling parameters as tensors on the logits' device, so one call picks all rows' tokens.

    ``top_k`` is the vocabulary size and ``top_p`` 1 where a row does not filter (greedy rows never do); the
    batch-wide ``max_top_k`` (0: no row cuts) and ``any_top_p`` skip the top-k or the sort when no row needs it.
    """

    greedy: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    all_greedy: bool
    max_top_k: int
    any_top_p: bool


def _row_params(specs: Sequence[SamplingSpec], seeds: Sequence[int], vocab: int, device: torch.device) -> _RowParams:
    """Tensors of each row's parameters; a temperature below float32's smallest normal number is raised to it,
    because dividing the best (zero) score by a temperature that rounds to 0 gives 0 / 0 = NaN."""
    greedy = [s.temperature <= 0.0 for s in specs]
    tiny = torch.finfo(torch.float32).tiny
    top_k = [s.top_k if not g and 0 < s.top_k < vocab else vocab for s, g in zip(specs, greedy)]
    top_p = [1.0 if g else s.top_p for s, g in zip(specs, greedy)]
    return _RowParams(
        greedy=torch.tensor(greedy, device=device),
        temperature=torch.tensor([1.0 if g else max(s.temperature, tiny) for s, g in zip(specs, greedy)], device=device),
        top_k=torch.tensor(top_k, device=device),
        top_p=torch.tensor(top_p, device=device),
        seeds=torch.tensor([_signed64(seed) for seed in seeds], dtype=torch.long, device=device),
        all_greedy=all(greedy),
        max_top_k=max((k for k in top_k if k < vocab), default=0),
        any_top_p=any(p < 1.0 for p in top_p),
    )


def _filter(scores: torch.Tensor, params: _RowParams) -> torch.Tensor:
    """``scores`` with each row's top_k and then top_p cut applied as -inf, the rules of the per-row sampler:
    keep the scores at least the k-th best (ties with it kept), then drop a token when the tokens ranked above
    it already cover top_p. Ties are ranked by token id (a stable sort), so a row's cut depends on it alone."""
    k_on = (params.top_k < scores.shape[-1])[:, None]
    if params.any_top_p:
        ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        kth = ranked.gather(-1, params.top_k[:, None] - 1)
        cut = k_on & (ranked < kth)
        ranked = ranked.masked_fill(cut, float("-inf"))
        probs = torch.softmax(ranked, dim=-1)
        covered = (probs.cumsum(dim=-1) - probs) >= params.top_p[:, None]
        cut |= covered & (params.top_p < 1.0)[:, None]
        return scores.masked_fill(torch.zeros_like(cut).scatter(-1, order, cut), float("-inf"))
    best = torch.topk(scores, params.max_top_k, dim=-1).values
    kth = best.gather(-1, params.top_k.clamp(max=params.max_top_k)[:, None] - 1)
    return scores.masked_fill(k_on & (scores < kth), float("-inf"))


def _choose(logits: torch.Tensor, params: _RowParams, step: int) -> torch.Tensor:
    """Pick one token per row honouring its temperature, top_k and top_p (temperature 0 is greedy), for all rows
    in one call.

    A sampled row inverts the CDF of ``softmax(scores)`` at its uniform: exact sampling, like Gumbel-max, but
    with one hashed number per row rather than one per vocabulary entry, which on a CPU made Gumbel-max noise
    for 64 rows of a 262k vocabulary five times as slow as this whole choice. The CDF is summed in float64, so
    its rounding is far below any probability float32 holds, and the target is kept below its total, so a
    zero-probability token (one cut, or underflowed) is never picked.
    """
    best = logits.argmax(dim=-1)
    if params.all_greedy:
        return best
    # Shifted so the best score is 0: a tiny temperature then gives -inf, not inf - inf = NaN.
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature[:, None]
    if params.max_top_k or params.any_top_p:
        scores = _filter(scores, params)
    cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(_uniforms(params.seeds, step)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # Clamped only for non-finite logits, which the caller refuses after the step's one host copy.
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return torch.where(params.greedy, best, sampled)


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
    seed: int
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str = "length"
    done: bool = False


def _rows(tasks: Sequence[SampleTask]) -> list[_Row]:
    rows = []
    for t, task in enumerate(tasks):
        for i in range(task.num_samples):
            # One seed per sample: sample i depends on (seed, i) only, not on what it is batched with.
            # Reduced modulo 2**64, the hash's seed range, so that no int64 seed overflows it.
            seed = secrets.randbits(64) if task.spec.seed is None else (task.spec.seed * 1_000_003 + i) % 2**64
            rows.append(_Row(t, task.spec, seed, [], [], done=task.spec.max_tokens == 0))
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

    Every row keeps its own sampling parameters, seed and stop conditions, so a request's
    result does not depend on which other requests it was batched with (up to floating-point
    rounding of the padded matmuls). Each step picks all rows' tokens in one call and copies
    them to the host once.
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
    params = _row_params([row.spec for row in rows], [row.seed for row in rows], logits.shape[-1], logits.device)
    cache = _cache_of(out)
    for step in range(max(task.spec.max_tokens for task in tasks)):
        chosen = _choose(logits, params, step)
        chosen_lp = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
        _record(rows, *_to_host(chosen, chosen_lp, logits), decode)
        if all(row.done for row in rows):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=positions,
                    use_cache=True, **{cache_kw: cache})
        logits = out.logits[:, -1, :].float()
        cache = _cache_of(out)
    return [
        SampleOut(
            sequences=[SampledSeq(r.tokens, r.logprobs, r.stop_reason) for r in rows if r.task == t],
            prompt_logprobs=prompt_logprobs.get(t),
        )
        for t in range(len(tasks))
    ]


def _to_host(chosen: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """The step's tokens and log-probabilities in one device-to-host copy, the logits' finiteness riding along.

    Token ids travel as float64, exact below 2**53; float32 log-probabilities widen to float64 exactly.
    """
    finite = torch.isfinite(logits).all().double()[None]
    host = torch.cat([chosen.double(), logprobs.double(), finite]).cpu().tolist()
    if not host[-1]:
        raise UserError(NON_FINITE_SAMPLE)
    n = len(chosen)
    return [int(t) for t in host[:n]], host[n : 2 * n]


def _record(rows: list[_Row], tokens: list[int], logprobs: list[float], decode: Callable[[list[int]], str]) -> None:
    """Append the step's token to every unfinished row and settle its stop reason."""
    for row, tok, lp in zip(rows, tokens, logprobs):
        if row.done:
            continue
        row.tokens.append(tok)
        row.logprobs.append(lp)
        if tok in row.spec.stop_token_ids or _stop_string_appeared(row.spec.stop_strings, row.tokens, decode):
            row.done, row.stop_reason = True, "stop"
        elif len(row.tokens) >= row.spec.max_tokens:
            row.done = True


NON_FINITE_SAMPLE = "sample refused: these weights give non-finite logits (the sampled adapter is not finite)"


def _finite(values: torch.Tensor) -> torch.Tensor:
    """``values`` if all finite: NaN logits cannot be sampled and NaN log-probabilities cannot travel in JSON."""
    if not all_finite([values]):
        raise UserError(NON_FINITE_SAMPLE)
    return values


_SYNC_CHARS = 8
"""Characters at the start of a decoded tail window that may differ from the full decode's text there: a
window starting inside a multi-byte character decodes its orphan bytes as U+FFFD (at most 3 of them), and a
SentencePiece decoder strips one leading space. Past them a decoder resynchronises, so the window's text is
a suffix of the full text."""


def _stop_string_appeared(stops: tuple[str, ...], tokens: list[int], decode: Callable[[list[int]], str]) -> bool:
    """Whether ``decode(tokens)`` contains a stop string, given that ``decode(tokens[:-1])`` did not.

    Only a tail window of tokens is decoded, not the whole sequence each step. A stop string that first
    appears now overlaps the text the newest token changed (which can reach back before it, when it completes
    a multi-byte character), so it starts at most ``len(stop) - 1`` characters before that change. The window
    doubles until that many characters plus the resynchronisation margin precede the change, so it holds about
    the longest stop string's worth of text however few characters its tokens decode to; the text past the
    margin is then searched.
    """
    if not stops:
        return False
    reach = max(map(len, stops)) - 1 + _SYNC_CHARS
    width = reach + 1
    while True:
        window = tokens[-width:]
        text = decode(window)
        if len(window) == len(tokens):
            return any(s in text for s in stops)
        unchanged = len(os.path.commonprefix([decode(window[:-1]), text]))
        if unchanged >= reach:
            return any(s in text[_SYNC_CHARS:] for s in stops)
        width *= 2


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

"""Tinker's built-in losses as pure torch functions over flat per-token tensors.

Every built-in loss is a token-wise *sum* (Tinker reports ``loss:sum``), so a batch
can be flattened into one vector of target-token log-probabilities: merging the
requests of several callers into one forward pass then gives exactly the gradients
the requests would have produced one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from .numeric import check_number

LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask"),
}
"""The loss_fn_inputs each loss reads; those in ``OPTIONAL_INPUTS`` may be omitted.
``target_tokens`` selects the log-probabilities the loss functions receive."""

OPTIONAL_INPUTS = frozenset({"weights", "sequence_ratio_mask"})
"""Inputs a datum may omit; :func:`default_input` gives their value then."""

DATUM_INDEX = "datum_index"
"""Not a loss_fn_input (the engine never reads one by this name from a request): the engine adds it
to the flat inputs, the row of each token's datum in the merged batch, for losses that reduce over
a sequence (``gspo``). Without it every token is taken to belong to one datum."""

LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
"""The loss_fn_config keys each loss accepts, with their defaults (ratio bounds, not epsilons)."""

UNSUPPORTED_LOSSES: dict[str, str] = {
    "stable_reinforce": (
        "it trains on stability information the sampler records per sequence (record_stability_info), whose "
        "definition Tinker does not publish, so this service cannot record it"
    ),
}
"""Losses the SDK names (``LossFnType``) that this service refuses, with the reason the caller is told."""


class LossConfigError(ValueError):
    """A loss name, config key or input that the caller got wrong (a user error)."""


@dataclass(frozen=True)
class LossResult:
    """The scalar to differentiate and the detached per-token loss to report."""

    loss: torch.Tensor
    elementwise_loss: torch.Tensor


def check_supported(loss_fn: str) -> None:
    """Refuse a loss this service does not compute, saying why and which losses it does."""
    if loss_fn not in LOSS_CONFIG_DEFAULTS:
        reason = f": {UNSUPPORTED_LOSSES[loss_fn]}" if loss_fn in UNSUPPORTED_LOSSES else ""
        raise LossConfigError(f"unsupported loss_fn {loss_fn!r}{reason}; supported: {', '.join(sorted(LOSS_CONFIG_DEFAULTS))}")


def sampled_positions(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Where a datum holds a sampled token: its sampler logprob or its advantage is not 0.

    RL data as the SDK sends it has no mask (tinker-cookbook strips its ``mask`` before
    sending): the prompt's positions carry sampler logprob 0 and advantage 0, which no
    sampled token with an advantage has. A sampled token whose probability was exactly 1
    and whose advantage is 0 counts as a prompt position; it carries no policy gradient,
    and the only penalty it escapes would pull it towards the probability 1 it already had.
    """
    return (inputs["logprobs"] != 0) | (inputs["advantages"] != 0)


def default_input(name: str, inputs: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """The value of an optional input a datum of ``n`` tokens omits.

    ``weights``: 1 everywhere. ``sequence_ratio_mask``: the datum's sampled positions, since the
    SDK's RL data carries no mask and GSPO's sequence ratio is a mean over the sampled tokens.
    """
    if name == "sequence_ratio_mask":
        return sampled_positions(inputs).astype(np.float32)
    return np.ones(n, np.float32)


def resolve_config(loss_fn: str, config: Mapping[str, float | str] | None) -> dict[str, float]:
    """Merge ``config`` over the loss's defaults, rejecting unknown names, non-numbers, NaN and infinities."""
    check_supported(loss_fn)
    resolved = dict(LOSS_CONFIG_DEFAULTS[loss_fn])
    for key, value in (config or {}).items():
        if key not in resolved:
            raise LossConfigError(
                f"loss_fn_config key {key!r} is not used by {loss_fn!r}; "
                f"accepted keys: {sorted(resolved) or 'none'}"
            )
        resolved[key] = check_number(f"loss_fn_config[{key!r}]", value, error=LossConfigError)
    if "beta" in resolved:
        check_number("loss_fn_config['beta']", resolved["beta"], ge=0.0, error=LossConfigError)
    if "clip_low_threshold" in resolved and not (
        0.0 <= resolved["clip_low_threshold"] <= 1.0 <= resolved["clip_high_threshold"]
    ):
        raise LossConfigError(
            "clip thresholds are bounds on the probability ratio and need "
            "0 <= clip_low_threshold <= 1 <= clip_high_threshold, got "
            f"{resolved['clip_low_threshold']} and {resolved['clip_high_threshold']}"
        )
    return resolved


def cross_entropy(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """Weighted negative log-likelihood of the target tokens."""
    weights = inputs.get("weights")
    if weights is None:
        weights = torch.ones_like(logprobs)
    return -(weights * logprobs)


def importance_sampling(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """REINFORCE corrected by the ratio between learner and sampler probabilities."""
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -(ratio * inputs["advantages"])


def ppo(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """Clipped surrogate: the more conservative of the clipped and unclipped objectives."""
    ratio = torch.exp(logprobs - inputs["logprobs"])
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -torch.min(ratio * advantages, clipped * advantages)


def cispo(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """Policy gradient weighted by a clipped, stop-gradient importance ratio (CISPO)."""
    ratio = torch.exp(logprobs - inputs["logprobs"]).detach()
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -(clipped * logprobs * inputs["advantages"])


def dro(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """Direct reward optimisation: policy gradient with a quadratic penalty on the log-ratio.

    The penalty applies at sampled positions only: at a prompt position the sampler logprob
    is a 0 placeholder, and penalising the learner's log-probability there would pull every
    prompt token towards probability 1 (a gradient norm of about 8,000 where the other losses
    give 15 to 160, measured with tinker-cookbook on Gemma).
    """
    log_ratio = torch.where(sampled_positions(inputs), logprobs - inputs["logprobs"], 0.0)
    return -(logprobs * inputs["advantages"] - 0.5 * cfg["beta"] * log_ratio**2)


def gspo(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """GSPO (Zheng et al., 2025) in its token-level variant, as Tinker defines it: PPO's clipped
    surrogate on one importance ratio per sequence instead of one per token.

    A sequence's ratio is exp(mean log-ratio over the tokens its ``sequence_ratio_mask`` marks,
    by default its sampled tokens), taken without gradient; every token of the sequence carries
    that value with the gradient of its own log-probability, so per-token advantages still work.
    Clipping the shared value keeps or drops a whole sequence's gradient. A sequence that marks
    no token (a datum of prompt only, advantages 0) gets ratio 1 and contributes nothing.
    """
    marked = inputs.get("sequence_ratio_mask")
    in_ratio = sampled_positions(inputs) if marked is None else marked != 0
    datum = inputs.get(DATUM_INDEX)
    if datum is None:
        datum = torch.zeros(logprobs.shape, dtype=torch.long, device=logprobs.device)
    rows = int(datum.max()) + 1 if datum.numel() else 0
    token_log_ratio = torch.where(in_ratio, logprobs.detach() - inputs["logprobs"], 0.0)
    sums = torch.zeros(rows, dtype=logprobs.dtype, device=logprobs.device).index_add_(0, datum, token_log_ratio)
    counts = torch.zeros(rows, dtype=logprobs.dtype, device=logprobs.device).index_add_(0, datum, in_ratio.to(logprobs.dtype))
    sequence_log_ratio = sums / counts.clamp(min=1.0)
    ratio = torch.exp(sequence_log_ratio[datum] + logprobs - logprobs.detach())
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -torch.min(ratio * advantages, clipped * advantages)


_ELEMENTWISE: dict[str, Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}


def compute_loss(
    loss_fn: str,
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> LossResult:
    """Apply ``loss_fn`` to flat target-token log-probabilities (the sum is what gets differentiated)."""
    missing = [k for k in LOSS_INPUTS[loss_fn] if k not in inputs and k != "target_tokens" and k not in OPTIONAL_INPUTS]
    if missing:
        raise LossConfigError(f"loss_fn {loss_fn!r} needs loss_fn_inputs {missing}")
    elementwise = _ELEMENTWISE[loss_fn](logprobs, inputs, config)
    return LossResult(loss=elementwise.sum(), elementwise_loss=elementwise.detach())


def loss_metrics(
    loss_fn: str,
    elementwise_loss: torch.Tensor,
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Metrics for one request's tokens, keyed ``name:reduction`` as the SDK requires."""
    metrics = {"loss:sum": float(elementwise_loss.sum())}
    if loss_fn != "cross_entropy":
        # Prompt positions (sampler logprob 0 by convention) would drag the ratio towards meaningless values.
        active = sampled_positions(inputs)
        if bool(active.any()):
            ratio = torch.exp(logprobs.detach()[active] - inputs["logprobs"][active])
            metrics["importance_ratio:mean"] = float(ratio.mean())
    return metrics

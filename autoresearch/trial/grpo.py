"""GRPO arithmetic and the training data it sends: plain lists in, plain lists out, no SDK and no service.

A datum follows the training API's next-token layout: the model reads the
sequence without its last token and is scored on the sequence shifted by
one, so every per-position input (weights, sampling logprobs, advantages)
has one entry per target token, and the prompt's positions carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Datum:
    """One training sequence: the input tokens and, per target position, the loss function's inputs."""

    model_input: list[int]
    loss_fn_inputs: dict[str, list[int] | list[float]]


class Completion(Protocol):
    """A sampled completion (tinker's SampledSequence has these fields)."""

    tokens: list[int]
    logprobs: list[float] | None


def sft_datum(prompt: Sequence[int], answer: Sequence[int]) -> Datum:
    """Cross-entropy on ``answer`` given ``prompt``: weight 1 on the answer's tokens, 0 on the prompt's."""
    tokens = [*prompt, *answer]
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights})


def rl_datum(prompt: Sequence[int], completion: Sequence[int], logprobs: Sequence[float], advantage: float) -> Datum:
    """The policy loss on one completion: its sampling logprobs and ``advantage`` on each of its tokens.

    The prompt's positions get logprob 0 and advantage 0, so they add no gradient.
    """
    if len(logprobs) != len(completion):
        raise ValueError(f"{len(logprobs)} sampling logprobs for {len(completion)} completion tokens")
    tokens = [*prompt, *completion]
    pad = [0.0] * (len(prompt) - 1)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "logprobs": pad + list(logprobs),
                               "advantages": pad + [advantage] * len(completion)})


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO: each completion's reward relative to its group's, in group standard deviations (0 if all equal)."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    return [0.0 if std < 1e-8 else (r - mean) / std for r in rewards]


def token_advantage(advantage: float, length: int, completions: int) -> float:
    """The advantage each token of a ``length``-token completion carries, in a step of ``completions`` completions.

    As in GRPO's objective, the loss is a mean over completions of per-token
    means, not a sum over every sampled token. The sum's gradient is hundreds
    of times the SFT warm-up's, and Adam (whose second moments the warm-up
    set) turned it into steps that wrecked a warmed-up model in one RL step
    (measured on the tiny study: held-out accuracy to 0 and degenerate text).
    """
    return advantage / (length * completions)


def rl_data(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Completion]],
            rewards: Sequence[Sequence[float]]) -> list[Datum]:
    """One GRPO step's data: per prompt, its group of completions and their rewards.

    Completions whose advantage is zero (a group that all scored the same)
    carry no gradient and are not sent, nor are empty ones.
    """
    completions = sum(len(group) for group in groups)
    data = []
    for prompt, group, group_rewards in zip(prompts, groups, rewards, strict=True):
        for completion, advantage in zip(group, group_advantages(group_rewards), strict=True):
            if advantage != 0.0 and completion.tokens:
                per_token = token_advantage(advantage, len(completion.tokens), completions)
                data.append(rl_datum(prompt, completion.tokens, completion.logprobs or [], per_token))
    return data

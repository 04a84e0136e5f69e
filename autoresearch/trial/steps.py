"""One training step of each kind: the SFT warm-up's and GRPO's, each an optimizer step on the service."""

from __future__ import annotations

from env.text2sql import Example, ScoringPool, Submission

from .grpo import rl_data, sft_datum
from .policy import Policy


def service_metrics(out: dict[str, float]) -> dict[str, float]:
    """The service's ``name:reduction`` metric keys as plain names (``loss:sum`` becomes ``loss_sum``)."""
    return {key.replace(":", "_"): value for key, value in out.items()}


def sft_step(policy: Policy, batch: list[Example]) -> dict[str, float]:
    """One cross-entropy step on the gold answers, formatted as the model should answer."""
    data = [sft_datum(policy.prompt_tokens(e), policy.answer_tokens(e)) for e in batch]
    return service_metrics(policy.step(data, "cross_entropy", None))


def rl_step(policy: Policy, pool: ScoringPool, batch: list[Example], seed: int) -> dict[str, float]:
    """One GRPO step: a group of samples per prompt, scored by ``pool`` with the trial's reward, the policy loss.

    The outputs are the policy's, so untrusted: the pool scores them in worker
    processes that are killed when a query outlives its deadline.
    """
    hp = policy.hp
    prompts = [policy.prompt_tokens(e) for e in batch]
    groups = policy.sample(policy.sampling_client(), prompts, hp.samples_per_prompt, hp.temperature, seed=seed)
    scores = pool.map([Submission(e, policy.decode(s.tokens)) for e, group in zip(batch, groups) for s in group])
    flat = iter(scores)
    rewards = [[next(flat).reward for _ in group] for group in groups]
    data = rl_data(prompts, groups, rewards)
    out = policy.step(data, hp.loss, hp.loss_config()) if data else {}
    return {"reward_mean": sum(s.reward for s in scores) / len(scores),
            "train_match_rate": sum(s.execution_match for s in scores) / len(scores), "datums": len(data),
            **service_metrics(out)}

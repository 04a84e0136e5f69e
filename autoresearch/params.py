"""Trial parameters: the knobs ``run_trial`` understands, and the study's search space as Optuna distributions.

Reward weights travel as ordinary Optuna parameters prefixed ``reward.`` so
the sampler, the dashboard and parameter importances treat them like any other
hyperparameter; :func:`split_params` turns them back into a RewardConfig.
"""

from __future__ import annotations

from typing import Any, Literal

import optuna.distributions as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from env.text2sql import RewardConfig

from .spec import REWARD_PREFIX, CategoricalParam, FloatParam, IntParam, StudySpec

LOSSES = ("importance_sampling", "ppo", "cispo", "dro")


class TrialParams(BaseModel):
    """Hyperparameters of one GRPO-style trial, with their defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(1e-4, gt=0, le=1)
    lora_rank: int = Field(8, ge=1, le=512)
    samples_per_prompt: int = Field(4, ge=2, le=64)
    prompts_per_step: int = Field(4, ge=1, le=1024)
    temperature: float = Field(1.0, gt=0, le=2)
    loss: Literal["importance_sampling", "ppo", "cispo", "dro"] = "ppo"
    clip_low: float = Field(0.8, gt=0, le=1)
    clip_high: float = Field(1.2, ge=1, le=10)
    dro_beta: float = Field(0.05, gt=0, le=10)
    rl_steps: int = Field(10, ge=0, le=100_000)
    sft_steps: int = Field(0, ge=0, le=100_000)
    sft_batch_size: int = Field(8, ge=1, le=1024)
    max_tokens: int = Field(128, ge=1, le=8192)
    eval_every: int = Field(5, ge=1)
    seed: int = 0

    def loss_config(self) -> dict[str, float] | None:
        """The ``loss_fn_config`` the training API expects for this loss."""
        if self.loss in ("ppo", "cispo"):
            return {"clip_low_threshold": self.clip_low, "clip_high_threshold": self.clip_high}
        if self.loss == "dro":
            return {"beta": self.dro_beta}
        return None


def _problem(error: ValidationError) -> str:
    issue = error.errors()[0]
    return f"{'.'.join(map(str, issue['loc']))}: {issue['msg']}"


def check_trial_params(spec: StudySpec) -> None:
    """Reject parameters ``run_trial`` cannot run: unknown names, values outside TrialParams' or RewardConfig's bounds.

    ``fixed`` may also pin reward weights, as ``"reward.<weight>" = value``.
    """
    hyper = {k: v for k, v in spec.fixed.items() if not k.startswith(REWARD_PREFIX)}
    for section, names in (("space", spec.space), ("fixed", hyper)):
        unknown = [name for name in names if name not in TrialParams.model_fields]
        if unknown:
            raise ValueError(f"{section}.{unknown[0]}: run_trial has no such parameter "
                             f"(known: {', '.join(TrialParams.model_fields)})")
    for name, param in spec.space.items():
        for value in param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]:
            try:
                TrialParams(**{name: value})
            except ValidationError as error:
                raise ValueError(f"space.{_problem(error)}") from None
    try:
        TrialParams(**hyper)
    except ValidationError as error:
        raise ValueError(f"fixed.{_problem(error)}") from None
    pinned = {k: v for k, v in spec.fixed.items() if k.startswith(REWARD_PREFIX)}
    try:
        split_params(pinned)
    except ValueError as error:
        raise ValueError(f"fixed: {error}") from None
    both = {k[len(REWARD_PREFIX):] for k in pinned} & set(spec.reward_space)
    if both:
        raise ValueError(f"reward weight(s) both searched and fixed: {', '.join(sorted(both))}")


def distributions(spec: StudySpec) -> dict[str, dist.BaseDistribution]:
    """The whole search space (hyperparameters and reward weights) as one Optuna distribution dict."""
    space: dict[str, dist.BaseDistribution] = {}
    for name, param in spec.space.items():
        if isinstance(param, FloatParam):
            space[name] = dist.FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, IntParam):
            space[name] = dist.IntDistribution(param.low, param.high, log=param.log, step=param.step)
        else:
            space[name] = dist.CategoricalDistribution(param.choices)
    for name, bounds in spec.reward_space.items():
        if RewardConfig.model_fields[name].annotation is int:
            space[REWARD_PREFIX + name] = dist.IntDistribution(int(bounds.low), int(bounds.high), log=bounds.log)
        else:
            space[REWARD_PREFIX + name] = dist.FloatDistribution(bounds.low, bounds.high, log=bounds.log)
    return space


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], RewardConfig]:
    """Separate hyperparameters from ``reward.*`` weights; unsearched weights keep RewardConfig's defaults."""
    hyper = {k: v for k, v in params.items() if not k.startswith(REWARD_PREFIX)}
    weights = {k[len(REWARD_PREFIX):]: v for k, v in params.items() if k.startswith(REWARD_PREFIX)}
    return hyper, RewardConfig.from_dict(weights)

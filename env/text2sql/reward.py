"""The tunable training reward, kept apart from the fixed held-out metric.

A study may tune these weights (an LLM may propose them too); it can never
change what counts as correct. The held-out metric is always execution
accuracy under :mod:`env.text2sql.verdict` rules, whatever the weights are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .verdict import Verdict


class RewardConfig(BaseModel):
    """Named, bounded weights of the training reward.

    A prediction that executes earns ``executes`` plus ``execution_match``
    when its result matches, plus partial credit in [0, 1] per part times its
    weight, minus ``length_penalty`` times how far the raw output overshoots
    ``length_budget`` characters (capped at one budget's worth). A prediction
    that does not execute (syntax, runtime, forbidden, limits, no SQL) gets
    :attr:`floor`. An example whose gold query fails scores 0 for everyone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    execution_match: float = Field(1.0, ge=0.0, le=10.0)
    executes: float = Field(0.1, ge=0.0, le=1.0)
    error_penalty: float = Field(0.1, ge=0.0, le=1.0)
    result_overlap: float = Field(0.0, ge=0.0, le=1.0)
    schema_link: float = Field(0.0, ge=0.0, le=1.0)
    ast_similarity: float = Field(0.0, ge=0.0, le=1.0)
    length_penalty: float = Field(0.0, ge=0.0, le=1.0)
    length_budget: int = Field(600, ge=16, le=100_000)

    @property
    def needs_ast(self) -> bool:
        """Whether a weighted part needs the prediction parsed."""
        return self.schema_link > 0 or self.ast_similarity > 0

    @property
    def needs_overlap(self) -> bool:
        """Whether result-cell overlap is weighted (it costs a pass over every cell)."""
        return self.result_overlap > 0

    @property
    def floor(self) -> float:
        """The lowest reward any prediction can get: what failures get."""
        return -(self.error_penalty + self.length_penalty)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RewardConfig":
        """Validate a mapping, with an error that names every bad field."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in issue['loc']) or 'reward'}: {issue['msg']}" for issue in error.errors()
            )
            raise ValueError(f"invalid reward config: {problems}") from None


@dataclass(frozen=True)
class Credit:
    """Partial-credit parts in [0, 1], measured for one executed prediction."""

    result_overlap: float = 0.0
    schema_link: float = 0.0
    ast_similarity: float = 0.0


def compute_reward(verdict: Verdict, credit: Credit, text_length: int, config: RewardConfig) -> float:
    """The training reward for one scored prediction."""
    if verdict is Verdict.GOLD_ERROR:
        return 0.0
    if verdict.is_failure:
        return config.floor
    overshoot = min(1.0, max(0, text_length - config.length_budget) / config.length_budget)
    return (
        config.executes
        + config.execution_match * (verdict is Verdict.MATCH)
        + config.result_overlap * credit.result_overlap
        + config.schema_link * credit.schema_link
        + config.ast_similarity * credit.ast_similarity
        - config.length_penalty * overshoot
    )

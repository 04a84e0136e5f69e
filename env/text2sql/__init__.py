"""Text-to-SQL reward environment: sandboxed execution, a fixed verdict, a tunable reward.

Typical use::

    from env.text2sql import Example, score
    result = score(example, model_output)
    result.verdict, result.reward
"""

from __future__ import annotations

from .backends import Backend, Limits, QueryFailed, SQLiteBackend, make_backend
from .example import Example
from .extract import extract_sql
from .pool import ScorerSpec, ScoringPool, score_batch
from .reward import RewardConfig
from .scorer import Score, Scorer, Submission
from .suite import Suite, SuiteOptions, build_suite
from .verdict import Verdict

__all__ = [
    "Backend", "Example", "Limits", "QueryFailed", "RewardConfig", "SQLiteBackend", "Score", "Scorer",
    "ScorerSpec", "ScoringPool", "Submission", "Suite", "SuiteOptions", "Verdict", "build_suite", "extract_sql",
    "make_backend", "score", "score_batch",
]

_default_scorer: Scorer | None = None


def score(example: Example, prediction: str, *, dialect: str = "sqlite", reward: RewardConfig | None = None) -> Score:
    """Score one raw model output on the embedded SQLite backend.

    One process-wide :class:`Scorer` serves these calls, so databases, gold
    results and repeated predictions are cached across them.
    """
    global _default_scorer
    if _default_scorer is None:
        _default_scorer = Scorer()
    return _default_scorer.score(example, prediction, dialect=dialect, reward=reward)

"""Held-out evaluation: greedy predictions, their verdicts, and what a trial records of them.

The objective is execution match under the fixed verdict, so only verdicts
are read here: the pool's reward weights (the trial's) change nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from env.text2sql import Example, ScoringPool, Submission, Verdict

from ..stats import Matches, accuracy, encode_matches
from .policy import Policy


def predict(policy: Policy, sampler: Any, pool: ScoringPool,
            examples: Sequence[Example]) -> tuple[list[bool | None], list[dict[str, Any]]]:
    """Greedy predictions for ``examples``: per example, whether it matches (None: broken gold, excluded), and the
    rows of ``predictions.jsonl``."""
    outputs = policy.sample(sampler, [policy.prompt_tokens(e) for e in examples], 1, temperature=0.0, seed=0)
    texts = [policy.decode(seqs[0].tokens) for seqs in outputs]
    scores = pool.map([Submission(e, t) for e, t in zip(examples, texts)])
    rows = [{"id": e.id, "question": e.question, "gold": e.gold, "prediction": t, "verdict": s.verdict.value}
            for e, t, s in zip(examples, texts, scores)]
    return [None if s.verdict is Verdict.GOLD_ERROR else s.execution_match for s in scores], rows


def summary(prefix: str, matches: Matches) -> dict[str, Any]:
    """An evaluation as a trial records it: ``<prefix>execution_accuracy``, its ``..._ci`` and ``<prefix>matches``."""
    found = accuracy(matches)
    return {f"{prefix}execution_accuracy": found.value, f"{prefix}execution_accuracy_ci": found.ci,
            f"{prefix}matches": encode_matches(matches)}


def examples_digest(examples: Sequence[Example]) -> str:
    """A SHA-256 of the held-out examples (id, question, gold) in order: two trials' match vectors pair up only
    when their digests agree. Ids alone would not do: the generator reuses them across seeds."""
    content = json.dumps([[e.id, e.question, e.gold] for e in examples])
    return hashlib.sha256(content.encode()).hexdigest()

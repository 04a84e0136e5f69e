"""Verdict codes: what happened to one prediction, under the fixed rules."""

from __future__ import annotations

from enum import Enum


class Verdict(str, Enum):
    """The outcome of scoring one prediction against its gold query.

    Every code but ``MATCH`` and ``MISMATCH`` means the prediction did not run
    to completion. ``INVALID`` covers text with no SQL in it (empty, only
    prose or thinking) and text no engine should see (NUL bytes). ``GOLD_ERROR`` means the example itself is broken: it is
    excluded from metrics and never penalises the model.
    """

    MATCH = "match"
    MISMATCH = "mismatch"
    SYNTAX_ERROR = "syntax_error"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    RESOURCE_LIMIT = "resource_limit"
    FORBIDDEN = "forbidden"
    INVALID = "invalid_prediction"
    GOLD_ERROR = "gold_error"

    @property
    def executed(self) -> bool:
        """The prediction ran and returned rows (right or wrong)."""
        return self in (Verdict.MATCH, Verdict.MISMATCH)

    @property
    def is_failure(self) -> bool:
        """The prediction did not execute: it gets the reward floor."""
        return not self.executed and self is not Verdict.GOLD_ERROR

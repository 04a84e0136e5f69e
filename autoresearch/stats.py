"""How sure a held-out accuracy is: Wilson intervals, per-example match vectors, and the exact McNemar test.

A held-out set of a few dozen examples moves in steps of several points, so
an accuracy means little without its interval, and two trials' accuracies can
only be told apart on the examples they were both scored on: the paired test
counts the examples where exactly one of them matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from scipy.stats import binomtest

Matches = Sequence[bool | None]
"""Per held-out example, in held-out order: matched, did not, or None when the example does not count (broken gold)."""

CONFIDENCE = 0.95
MATCH, MISMATCH, EXCLUDED = "1", "0", "-"


def wilson_interval(matched: int, counted: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of ``matched / counted``: unlike the normal approximation, it stays inside [0, 1]
    and is not empty at 0 or 1, which is where a tiny study's untrained model sits. Nothing counted: [0, 1]."""
    if counted == 0:
        return 0.0, 1.0
    interval = binomtest(matched, counted).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class Accuracy:
    """Execution accuracy over the examples that count, with its 95% Wilson interval."""

    matched: int
    counted: int

    @property
    def value(self) -> float:
        """The point estimate; 0 when nothing counted (as the objective has always been)."""
        return self.matched / self.counted if self.counted else 0.0

    @property
    def ci(self) -> list[float]:
        """``[low, high]``, a list so that it is stored as JSON unchanged."""
        return list(wilson_interval(self.matched, self.counted))


def accuracy(matches: Matches) -> Accuracy:
    """The accuracy of a match vector, leaving out the examples that do not count."""
    counted = [m for m in matches if m is not None]
    return Accuracy(sum(counted), len(counted))


def encode_matches(matches: Matches) -> str:
    """A match vector as one short string, ``1``, ``0`` or ``-`` per example: compact enough for a trial attribute."""
    return "".join(EXCLUDED if m is None else MATCH if m else MISMATCH for m in matches)


def decode_matches(text: str) -> list[bool | None]:
    """The inverse of :func:`encode_matches`."""
    codes = {MATCH: True, MISMATCH: False, EXCLUDED: None}
    try:
        return [codes[c] for c in text]
    except KeyError as error:
        raise ValueError(f"not a match vector: unknown code {error.args[0]!r}") from None


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of two match vectors on the same examples.

    ``b``: examples only the first matched; ``c``: only the second; ``paired``:
    examples both counted. ``p_value`` is two-sided, 1.0 when they differ on no example.
    """

    b: int
    c: int
    paired: int
    p_value: float

    def distinguishable(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def mcnemar(first: Matches, second: Matches) -> McNemar:
    """Compare two evaluations of the same examples, in the same order, example by example.

    Only the discordant examples carry information: under the null hypothesis
    each is equally likely to favour either side, so ``min(b, c)`` is binomial
    with ``p = 1/2`` over ``b + c`` trials.
    """
    if len(first) != len(second):
        raise ValueError(f"match vectors of different lengths ({len(first)} and {len(second)}) are not paired")
    pairs = [(x, y) for x, y in zip(first, second) if x is not None and y is not None]
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    p_value = 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)
    return McNemar(b, c, len(pairs), p_value)

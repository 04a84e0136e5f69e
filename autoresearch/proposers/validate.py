"""Check an LLM proposal against the declared space: fit it (clamp, snap, round) or reject it with the reason.

The proposal schema has exactly three fields (``params``, ``reward``,
``rationale``); anything else, or any name outside the search space, rejects
the proposal, so no reply can reach the objective, the fixed parameters or
the space itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial

from ..spec import REWARD_PREFIX

FIELDS = {"params", "reward", "rationale"}
MAX_RATIONALE = 2000


class Rejected(ValueError):
    """A proposal that cannot be run; the message says why in one line."""


@dataclass(frozen=True)
class Checked:
    """A proposal that fits the space: Optuna parameters (``reward.*`` for weights) and what was changed to fit."""

    params: dict[str, Any]
    rationale: str
    adjustments: list[str] = field(default_factory=list)


def check(raw: Any, space: dict[str, BaseDistribution], *, clamp: bool) -> Checked:
    """Fit one proposal to ``space``; out-of-range numbers are clamped when ``clamp``, else rejected."""
    if not isinstance(raw, dict):
        raise Rejected("a proposal must be a JSON object")
    extra = sorted(set(raw) - FIELDS)
    if extra:
        raise Rejected(f"unknown field(s) {', '.join(map(repr, extra))}: a proposal has only {sorted(FIELDS)}")
    rationale = raw.get("rationale")
    if not isinstance(rationale, str) or not rationale.strip():
        raise Rejected("missing rationale")
    flat: dict[str, Any] = {}
    for section, prefix in (("params", ""), ("reward", REWARD_PREFIX)):
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise Rejected(f"{section} must be a JSON object")
        flat.update({prefix + str(name): value for name, value in values.items()})
    unknown = sorted(set(flat) - set(space))
    if unknown:
        raise Rejected(f"not in the search space: {', '.join(unknown)}")
    missing = sorted(set(space) - set(flat))
    if missing:
        raise Rejected(f"missing parameter(s): {', '.join(missing)}")
    params, adjustments = {}, []
    for name, distribution in space.items():
        params[name] = _fit(name, flat[name], distribution, clamp, adjustments)
    return Checked(params, rationale.strip()[:MAX_RATIONALE], adjustments)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer too large for a float
        return False


def _fit(name: str, value: Any, distribution: BaseDistribution, clamp: bool, notes: list[str]) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        for choice in distribution.choices:  # exact type first: True == 1 in Python
            if type(choice) is type(value) and choice == value:
                return choice
        for choice in distribution.choices:  # structured output sends every choice as a string
            if str(choice) == str(value):
                return choice
        raise Rejected(f"{name}: {value!r} is not one of {list(distribution.choices)}")
    assert isinstance(distribution, (FloatDistribution, IntDistribution))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise Rejected(f"{name}: {repr(value)[:40]} is not a finite number")
    fitted: float = value
    if distribution.step is not None:  # the nearest grid point (an int's grid has step 1)
        fitted = distribution.low + round((fitted - distribution.low) / distribution.step) * distribution.step
    if not distribution.low <= fitted <= distribution.high:
        if not clamp:
            raise Rejected(f"{name}: {value!r} is outside [{distribution.low}, {distribution.high}]")
        fitted = min(max(fitted, distribution.low), distribution.high)
    fitted = int(fitted) if isinstance(distribution, IntDistribution) else float(fitted)
    if not math.isclose(fitted, value, rel_tol=1e-12, abs_tol=1e-15):
        notes.append(f"{name}: {value!r} -> {fitted!r}")
    return fitted


def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two parameter sets are the same point; floats agree to the 6 significant digits the prompt shows."""
    if a.keys() != b.keys():
        return False
    return all(math.isclose(x, b[k], rel_tol=1e-5, abs_tol=1e-12)
               if isinstance(x, float) and isinstance(b[k], (int, float)) and not isinstance(b[k], bool) else x == b[k]
               for k, x in a.items())


def duplicate_of(params: dict[str, Any], trials: Iterable[FrozenTrial], pending: Sequence[dict[str, Any]]) -> str | None:
    """Why ``params`` repeats a past, running, waiting or queued point; None if it is new."""
    for trial in trials:
        # An enqueued trial still WAITING keeps its parameters in ``fixed_params`` until it is asked.
        if same_params(params, trial.params or trial.system_attrs.get("fixed_params", {})):
            return f"duplicate of trial #{trial.number} ({trial.state.name})"
    if any(same_params(params, other) for other in pending):
        return "duplicate of another proposal"
    return None

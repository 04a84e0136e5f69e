"""Checks that numbers are finite and in range, for requests coming in and results going out.

``NaN < 0`` is false, so a range check written as comparisons lets NaN through, and a
NaN or infinite hyperparameter poisons an adapter for good; JSON cannot carry either,
so a non-finite result could not even be returned. Every float the service accepts or
sends back goes through these helpers instead of ad-hoc comparisons.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch

from .exceptions import UserError

_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_number(
    name: str,
    value: float,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    error: type[Exception] = UserError,
) -> float:
    """``value`` as a float if it is a finite real number within the given bounds, else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number, got {value!r}")
    number = float(value)
    bounds = [(op, bound) for op, bound in zip(_COMPARISONS, (ge, gt, le, lt)) if bound is not None]
    if not math.isfinite(number) or not all(_COMPARISONS[op](number, bound) for op, bound in bounds):
        wanted = " and ".join(["finite"] + [f"{op} {bound:g}" for op, bound in bounds])
        raise error(f"{name} must be {wanted}, got {value!r}")
    return number


def check_int(name: str, value: int, low: int, high: int) -> int:
    """``value`` if it is an integer in ``[low, high]``, else a user error naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def all_finite(values: Iterable[torch.Tensor | float]) -> bool:
    """Whether every tensor element and float is finite, with one device sync per device, not one per tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for value in values:
        if isinstance(value, torch.Tensor):
            flags.setdefault(value.device, []).append(torch.isfinite(value).all())
        elif not math.isfinite(value):
            return False
    return all(bool(torch.stack(group).all()) for group in flags.values())

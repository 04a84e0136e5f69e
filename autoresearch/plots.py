"""matplotlib, imported only when a plot is drawn and always on the file-only Agg backend (no display needed)."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axis import Axis


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis: "Axis") -> None:
    """Ticks at whole numbers only: steps and trial numbers, which matplotlib would tick at 0.5 when few."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))

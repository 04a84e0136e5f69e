"""matplotlib, imported only when a plot is drawn and always on the file-only Agg backend (no display needed)."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

"""Result comparison under the fixed verdict rules.

Rows compare as a multiset (DISTINCT is the query's business, so duplicates
count); order matters only when the gold query's outermost SELECT has ORDER
BY; columns may come in any order (names are ignored); numbers compare across
int and float within a small tolerance; NULL equals NULL; text and bytes
compare exactly.

Backends hand over rows of plain cells (None, int, float, str, bytes):
:func:`normalize_rows` is how the server backends get driver types (Decimal,
dates, memoryview) there. SQLite produces nothing else, so its rows need no
pass at all.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections import Counter
from decimal import Decimal
from typing import Any, Sequence

Cell = Any
NormalRow = tuple

REL_TOL = 1e-6
ABS_TOL = 1e-9
MAX_PERMUTATIONS = 720


def normalize_rows(rows: Sequence[Sequence[Any]]) -> list[NormalRow]:
    """Bring driver values to plain cells: Decimal as float, dates as SQLite-style text."""
    return [tuple(_normalize_cell(cell) for cell in row) for row in rows]


def _normalize_cell(cell: Any) -> Cell:
    if cell is None or isinstance(cell, (str, float)):
        return cell
    if isinstance(cell, (bool, int)):
        return int(cell)
    if isinstance(cell, Decimal):
        return float(cell)
    if isinstance(cell, (dt.date, dt.time, dt.datetime)):
        return str(cell)
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    return str(cell)


def results_match(gold: Sequence[NormalRow], predicted: Sequence[NormalRow], ordered: bool) -> bool:
    """The execution-match rule on rows of plain cells."""
    if len(gold) != len(predicted):
        return False
    if not gold:
        return True
    width = len(gold[0])
    if len(predicted[0]) != width:
        return False
    # Exact equality (1 == 1.0 included) settles most cases at C speed; equal lists are equal multisets too.
    if list(gold) == list(predicted) or (not ordered and Counter(gold) == Counter(predicted)):
        return True
    gold_rows = list(gold) if ordered else sorted(gold, key=_row_key)
    identity = predicted if ordered else sorted(predicted, key=_row_key)
    if all(_rows_equal(g, p) for g, p in zip(gold_rows, identity)):
        return True
    if width == 1:
        return False
    for permutation in _column_permutations(gold, predicted, width):
        moved = [tuple(row[i] for i in permutation) for row in predicted]
        if not ordered:
            moved.sort(key=_row_key)
        if all(_rows_equal(g, p) for g, p in zip(gold_rows, moved)):
            return True
    return False


def _column_permutations(gold: Sequence[NormalRow], predicted: Sequence[NormalRow], width: int):
    """Permutations of predicted columns whose column multisets fit the gold's.

    Comparing each column's sorted values first keeps the search tiny: in
    practice only the identity (or one swap) survives.
    """
    gold_columns = [sorted((row[i] for row in gold), key=_cell_key) for i in range(width)]
    pred_columns = [sorted((row[i] for row in predicted), key=_cell_key) for i in range(width)]
    candidates = [
        [j for j in range(width) if all(_cells_equal(a, b) for a, b in zip(gold_columns[i], pred_columns[j]))]
        for i in range(width)
    ]
    if any(not options for options in candidates):
        return
    for count, permutation in enumerate(itertools.product(*candidates)):
        if count >= MAX_PERMUTATIONS:
            return
        if len(set(permutation)) == width:
            yield permutation


def _rows_equal(a: NormalRow, b: NormalRow) -> bool:
    return all(_cells_equal(x, y) for x, y in zip(a, b))


def _cells_equal(a: Cell, b: Cell) -> bool:
    if type(a) in _NUMBERS and type(b) in _NUMBERS:
        return a == b or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL) or (a != a and b != b)
    return type(a) is type(b) and a == b


_NUMBERS = (int, float)
_TYPE_RANK = {type(None): 0, int: 1, float: 1, str: 2, bytes: 3}


def _cell_key(cell: Cell) -> tuple:
    return (_TYPE_RANK.get(type(cell), 4), 0.0 if cell is None else cell)


def _row_key(row: NormalRow) -> tuple:
    return tuple(_cell_key(cell) for cell in row)


def cell_overlap(gold: Sequence[NormalRow], predicted: Sequence[NormalRow]) -> float:
    """F1 of the two results' cells as multisets: partial credit for near misses."""
    return overlap_f1(
        Counter(_hashable(cell) for row in gold for cell in row),
        Counter(_hashable(cell) for row in predicted for cell in row),
    )


def overlap_f1(gold: Counter, predicted: Counter) -> float:
    """F1 of two multisets; two empty ones agree fully."""
    total = sum(gold.values()) + sum(predicted.values())
    return 2 * sum((gold & predicted).values()) / total if total else 1.0


def _hashable(cell: Cell) -> Cell:
    return float(f"{cell:.6g}") if type(cell) in _NUMBERS and math.isfinite(cell) else cell

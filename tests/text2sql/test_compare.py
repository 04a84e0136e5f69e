import datetime as dt
from decimal import Decimal

import pytest

from env.text2sql.compare import cell_overlap, normalize_rows, results_match


def match(gold, predicted, ordered=False):
    return results_match(normalize_rows(gold), normalize_rows(predicted), ordered)


def test_rows_compare_as_a_multiset_when_unordered():
    assert match([(1,), (2,), (3,)], [(3,), (1,), (2,)])
    assert not match([(1,), (1,), (2,)], [(1,), (2,), (2,)])


def test_duplicates_count_so_distinct_is_kept():
    assert not match([(1,), (2,)], [(1,), (1,), (2,)])


def test_order_matters_only_when_asked():
    assert match([(1,), (2,)], [(1,), (2,)], ordered=True)
    assert not match([(1,), (2,)], [(2,), (1,)], ordered=True)


def test_columns_may_be_permuted():
    assert match([(1, "a"), (2, "b")], [("a", 1), ("b", 2)])
    assert match([(1, "a"), (2, "b")], [("b", 2), ("a", 1)])
    assert match([(1, 2, 3)], [(3, 1, 2)], ordered=True)


def test_permutation_must_keep_rows_together():
    # Each column matches on its own, but no column order rebuilds the gold rows.
    assert not match([(1, 2), (2, 1)], [(1, 1), (2, 2)])


def test_numbers_compare_across_types_with_tolerance():
    assert match([(1, 2.5, Decimal("3.10"))], [(1.0, 2.5000000001, 3.1)])
    assert not match([(1.0,)], [(1.01,)])
    assert match([(True,)], [(1,)])


def test_null_equals_null_and_is_not_zero_or_empty_text():
    assert match([(None,)], [(None,)])
    assert not match([(None,)], [(0,)])
    assert not match([(None,)], [("",)])


def test_text_compares_exactly():
    assert not match([("Alice",)], [("alice",)])
    assert not match([("1",)], [(1,)])
    assert not match([("a ",)], [("a",)])


def test_shape_must_agree():
    assert not match([(1,)], [(1, 2)])
    assert not match([(1,)], [])
    assert match([], [])


def test_server_types_normalise_to_sqlite_equivalents():
    assert match([("2024-01-05",)], [(dt.date(2024, 1, 5),)])
    assert match([("2024-01-05 10:00:00",)], [(dt.datetime(2024, 1, 5, 10),)])
    assert match([(b"\x00\x01",)], [(memoryview(b"\x00\x01"),)])


@pytest.mark.parametrize(
    ("gold", "predicted", "expected"),
    [([(1, "a")], [(1, "a")], 1.0), ([(1, "a")], [(2, "b")], 0.0), ([(1, "a")], [(1, "b")], 0.5), ([], [], 1.0)],
)
def test_cell_overlap_gives_partial_credit(gold, predicted, expected):
    assert cell_overlap(normalize_rows(gold), normalize_rows(predicted)) == pytest.approx(expected)

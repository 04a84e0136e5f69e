"""Wilson intervals, match vectors and the exact McNemar test against values worked out by hand, and the report
and status lines built on them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from autoresearch.report import write_report
from autoresearch.spec import load_spec
from autoresearch.stats import Accuracy, accuracy, decode_matches, encode_matches, mcnemar, wilson_interval
from autoresearch.summary import status_document, status_table
from tests.autoresearch.conftest import StudyFactory

Z = 1.959963984540054  # the normal quantile of 0.975


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def test_the_wilson_interval_of_11_of_32() -> None:
    low, high = wilson_interval(11, 32)
    assert (low, high) == pytest.approx(_wilson_by_hand(11, 32), abs=1e-9)
    assert (round(low, 4), round(high, 4)) == (0.2041, 0.5169)


def test_the_wilson_interval_at_the_edges_is_not_empty() -> None:
    low, high = wilson_interval(0, 32)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx((Z * Z / 32) / (1 + Z * Z / 32))
    low, high = wilson_interval(32, 32)
    assert high == pytest.approx(1.0) and low == pytest.approx(1 / (1 + Z * Z / 32))
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing counted: nothing is ruled out


def test_accuracy_leaves_out_the_examples_that_do_not_count() -> None:
    found = accuracy([True, None, False, True, None])
    assert found == Accuracy(matched=2, counted=3)
    assert found.value == pytest.approx(2 / 3)
    assert found.ci == pytest.approx(list(_wilson_by_hand(2, 3)))
    assert found.ci[0] <= found.value <= found.ci[1]
    assert accuracy([None]).value == 0.0 and accuracy([None]).ci == [0.0, 1.0]


def test_match_vectors_round_trip_as_strings() -> None:
    matches = [True, False, None, True]
    assert encode_matches(matches) == "10-1"
    assert decode_matches("10-1") == matches
    with pytest.raises(ValueError, match="unknown code 'x'"):
        decode_matches("1x")


def test_mcnemar_counts_the_discordant_pairs_and_gives_the_exact_p_value() -> None:
    # b = 0 and c = 6: two-sided, 2 * (1/2)^6
    test = mcnemar([False] * 6 + [True, False], [True] * 6 + [True, False])
    assert (test.b, test.c, test.paired) == (0, 6, 8)
    assert test.p_value == pytest.approx(0.03125) and test.distinguishable()
    # b = 1 and c = 5: 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    test = mcnemar([True] + [False] * 5, [False] + [True] * 5)
    assert (test.b, test.c) == (1, 5) and test.p_value == pytest.approx(14 / 64) and not test.distinguishable()


def test_mcnemar_pairs_only_the_examples_both_counted() -> None:
    test = mcnemar([True, None, True, False], [False, True, None, False])
    assert (test.b, test.c, test.paired) == (1, 0, 2) and test.p_value == pytest.approx(1.0)
    same = mcnemar([True, False], [True, False])
    assert (same.b, same.c, same.p_value) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar([True], [True, False])


def _evaluated(value: float, final: str, sft: str | None, digest: str = "d1") -> dict[str, Any]:
    """The user attrs run_trial records, for a 10-example held-out set."""
    attrs: dict[str, Any] = {"n_eval": 10, "eval_examples_sha256": digest}
    for prefix, vector in (("untrained_eval_", "0" * 10), ("sft_eval_", sft), ("eval_", final)):
        if vector is not None:
            found = accuracy(decode_matches(vector))
            attrs.update({f"{prefix}execution_accuracy": found.value, f"{prefix}execution_accuracy_ci": found.ci,
                          f"{prefix}matches": vector})
    assert attrs["eval_execution_accuracy"] == value
    return attrs


def _study(trials: list[tuple[float, dict[str, Any]]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for value, attrs in trials:
        study.add_trial(optuna.trial.create_trial(params={"x": value}, distributions=dist, value=value, user_attrs=attrs))
    return study


def test_the_report_tables_the_intervals_and_tests_the_best_trial(study_file: StudyFactory, tmp_path: Path) -> None:
    spec = load_spec(study_file())
    study = _study([
        (0.7, _evaluated(0.7, "1111111000", sft="1000000000")),  # c = 6 against its own after-SFT: p = 0.03125
        (0.6, _evaluated(0.6, "1111110000", sft="1111110000")),  # differs from the best on one example only
    ])
    text = write_report(spec, study, tmp_path / "report").read_text()
    assert "| #0 | COMPLETE | 0.0000 [0.0000, 0.2775] | 0.1000 [0.0179, 0.4042] | 0.7000 [0.3968, 0.8922] | 10 |" in text
    assert ("The best trial #0 and the runner-up #1 are not distinguishable at the 5% level "
            "(p = 1; b = 1, c = 0 of 10 paired examples).") in text
    assert ("The best trial #0 and its own after-SFT evaluation are distinguishable "
            "(p = 0.03125; b = 6, c = 0 of 10 paired examples).") in text
    status = status_table(status_document(spec, study))
    assert "best #0: 0.7000  held-out accuracy, 95% CI, n=10: untrained 0.0000 [0.0000, 0.2775]; " in status
    assert "0.7000  [0.3968, 0.8922]" in status


@pytest.mark.parametrize(("runner_up", "sentence"), [
    ((0.6, _evaluated(0.6, "1111110000", sft=None, digest="d2")),
     "The best trial #0 and the runner-up #1 cannot be compared: they were not evaluated on the same held-out examples."),
    ((0.6, {"n_eval": 10}), "The best trial #0 and the runner-up #1 cannot be compared: the runner-up #1 recorded no "
                            "per-example matches."),
    ((0.7, _evaluated(0.7, "1111111000", sft=None)), "The best trial #0 and the runner-up #1 are not distinguishable "
                                                     "at the 5% level: they match on exactly the same examples (b = 0, "
                                                     "c = 0 of 10 paired examples)."),
])
def test_the_report_says_when_two_trials_cannot_be_told_apart(study_file: StudyFactory, tmp_path: Path,
                                                              runner_up: tuple[float, dict[str, Any]], sentence: str) -> None:
    spec = load_spec(study_file())
    best = _evaluated(0.7, "1111111000", sft=None)  # no warm-up: its own reference is the untrained evaluation
    text = write_report(spec, _study([(0.7, best), runner_up]), tmp_path / "report").read_text()
    assert sentence in text
    assert "The best trial #0 and its own untrained evaluation are distinguishable (p = 0.01562; b = 7, c = 0" in text

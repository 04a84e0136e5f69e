"""GRPO arithmetic and datum building on their own: plain token lists, no SDK and no training service."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from autoresearch.trial.grpo import Datum, group_advantages, rl_data, rl_datum, sft_datum, token_advantage

PROMPT = [11, 12, 13, 14]


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float] | None


def _per_position_lengths(datum: Datum) -> set[int]:
    return {len(datum.model_input), *(len(values) for values in datum.loss_fn_inputs.values())}


def test_an_sft_datum_targets_the_shifted_sequence_and_weights_only_the_answer() -> None:
    datum = sft_datum(PROMPT, [21, 22, 23])
    assert datum.model_input == [11, 12, 13, 14, 21, 22]
    assert datum.loss_fn_inputs["target_tokens"] == [12, 13, 14, 21, 22, 23]
    assert datum.loss_fn_inputs["weights"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # the weighted targets are exactly the answer's tokens
    targets = datum.loss_fn_inputs["target_tokens"]
    assert [t for t, w in zip(targets, datum.loss_fn_inputs["weights"]) if w] == [21, 22, 23]


def test_an_rl_datum_pads_the_prompt_with_zero_logprobs_and_advantages() -> None:
    datum = rl_datum(PROMPT, [31, 32], [-0.5, -1.5], advantage=0.25)
    assert datum.model_input == [11, 12, 13, 14, 31]
    assert datum.loss_fn_inputs["target_tokens"] == [12, 13, 14, 31, 32]
    assert datum.loss_fn_inputs["logprobs"] == [0.0, 0.0, 0.0, -0.5, -1.5]
    assert datum.loss_fn_inputs["advantages"] == [0.0, 0.0, 0.0, 0.25, 0.25]
    assert _per_position_lengths(datum) == {5}


def test_an_rl_datum_refuses_logprobs_that_do_not_line_up_with_the_completion() -> None:
    with pytest.raises(ValueError, match="1 sampling logprobs for 2 completion tokens"):
        rl_datum(PROMPT, [31, 32], [-0.5], advantage=1.0)


@pytest.mark.parametrize("rewards", [[1.0, 0.0, 1.0, 0.0], [0.1, 0.7, 1.1, 0.3, 0.3], [2.0, -1.0]])
def test_group_advantages_sum_to_zero_with_unit_spread(rewards: list[float]) -> None:
    advantages = group_advantages(rewards)
    assert sum(advantages) == pytest.approx(0.0, abs=1e-12)
    assert sum(a * a for a in advantages) / len(advantages) == pytest.approx(1.0)
    # the order of rewards is kept: a better completion gets a larger advantage
    assert sorted(range(len(rewards)), key=rewards.__getitem__) == sorted(range(len(rewards)), key=advantages.__getitem__)


def test_group_advantages_are_normalised_within_the_group() -> None:
    assert group_advantages([1.0, 0.0, 1.0, 0.0]) == [1.0, -1.0, 1.0, -1.0]
    assert group_advantages([0.3, 0.3]) == [0.0, 0.0]
    assert group_advantages([0.3]) == [0.0]


def test_token_advantage_is_a_mean_over_completions_of_per_token_means() -> None:
    assert token_advantage(1.0, length=4, completions=8) == 1.0 / 32
    # summed over its tokens, each completion contributes advantage / completions, whatever its length
    for length in (1, 7, 64):
        assert sum([token_advantage(-2.0, length, 4)] * length) == pytest.approx(-0.5)


def test_rl_data_skips_all_equal_groups_and_empty_completions() -> None:
    prompts = [[1, 2], [3, 4, 5]]
    groups = [
        [Sampled([7, 8], [-0.1, -0.2]), Sampled([9], [-0.3])],          # rewards 1.0 and 0.0: both carry gradient
        [Sampled([6], [-0.4]), Sampled([6, 6], [-0.5, -0.6])],           # all-equal rewards: no gradient
    ]
    data = rl_data(prompts, groups, [[1.0, 0.0], [0.5, 0.5]])
    assert [d.model_input for d in data] == [[1, 2, 7], [1, 2]]
    completions = 4  # every sampled completion counts in the normalisation, sent or not
    assert data[0].loss_fn_inputs["advantages"] == [0.0, 1.0 / (2 * completions), 1.0 / (2 * completions)]
    assert data[1].loss_fn_inputs["advantages"] == [0.0, -1.0 / (1 * completions)]
    assert all(len(_per_position_lengths(d)) == 1 for d in data)
    empty = rl_data([[1, 2]], [[Sampled([], []), Sampled([5], [-0.1])]], [[1.0, 0.0]])
    assert [d.model_input for d in empty] == [[1, 2]]


def test_rl_data_needs_a_reward_per_completion() -> None:
    with pytest.raises(ValueError):
        rl_data([[1, 2]], [[Sampled([5], [-0.1]), Sampled([6], [-0.2])]], [[1.0]])

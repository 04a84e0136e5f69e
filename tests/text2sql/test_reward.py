import pytest

from env.text2sql.reward import Credit, RewardConfig, compute_reward
from env.text2sql.verdict import Verdict


def test_round_trips_through_a_dict():
    config = RewardConfig(execution_match=2.0, result_overlap=0.3, length_budget=100)
    assert RewardConfig.from_dict(config.to_dict()) == config


def test_rejects_out_of_bounds_and_unknown_weights_naming_the_field():
    with pytest.raises(ValueError, match="error_penalty"):
        RewardConfig.from_dict({"error_penalty": 5})
    with pytest.raises(ValueError, match="objective"):
        RewardConfig.from_dict({"objective": 1})


def test_failures_get_the_floor_and_gold_errors_are_neutral():
    config = RewardConfig(error_penalty=0.2, length_penalty=0.1)
    for verdict in (Verdict.SYNTAX_ERROR, Verdict.FORBIDDEN, Verdict.TIMEOUT, Verdict.RESOURCE_LIMIT, Verdict.INVALID):
        assert compute_reward(verdict, Credit(), 10, config) == pytest.approx(-0.3) == pytest.approx(config.floor)
    assert compute_reward(Verdict.GOLD_ERROR, Credit(), 10, config) == 0.0


def test_executed_predictions_earn_weighted_parts():
    config = RewardConfig(execution_match=1.0, executes=0.1, result_overlap=0.5, schema_link=0.2)
    credit = Credit(result_overlap=0.5, schema_link=1.0)
    assert compute_reward(Verdict.MISMATCH, credit, 10, config) == pytest.approx(0.1 + 0.25 + 0.2)
    assert compute_reward(Verdict.MATCH, credit, 10, config) == pytest.approx(1.1 + 0.25 + 0.2)


def test_length_penalty_grows_past_the_budget_and_is_capped():
    config = RewardConfig(length_penalty=0.4, length_budget=100)
    assert compute_reward(Verdict.MATCH, Credit(), 100, config) == pytest.approx(1.1)
    assert compute_reward(Verdict.MATCH, Credit(), 150, config) == pytest.approx(1.1 - 0.2)
    assert compute_reward(Verdict.MATCH, Credit(), 10_000, config) == pytest.approx(1.1 - 0.4)
    assert compute_reward(Verdict.MISMATCH, Credit(), 10_000, config) > config.floor

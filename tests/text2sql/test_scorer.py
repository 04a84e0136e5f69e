import pytest

import env.text2sql as text2sql
from env.text2sql import RewardConfig, Scorer, Verdict

from .cases import CORRECT, example


@pytest.fixture
def scorer():
    with Scorer() as scorer:
        yield scorer


def test_module_level_score_matches_model_output():
    result = text2sql.score(example(), f"Here you go:\n```sql\n{CORRECT};\n```")
    assert result.verdict is Verdict.MATCH and result.execution_match
    assert result.reward == pytest.approx(RewardConfig().execution_match + RewardConfig().executes)
    assert result.to_record() == {"id": "case", "verdict": "match", "execution_match": True, "reward": result.reward, "error": None,
                                  "method": "test_suite", "databases": result.databases, "weak_gold": False}
    assert result.databases > 1


def test_order_from_the_gold_decides(scorer):
    assert scorer.score(example(), "SELECT name FROM employees WHERE salary > 90 ORDER BY name DESC").verdict is Verdict.MISMATCH
    unordered = example(gold="SELECT name FROM employees WHERE salary > 90")
    assert scorer.score(unordered, "SELECT name FROM employees WHERE salary > 90 ORDER BY name DESC").verdict is Verdict.MATCH


def test_prediction_dialect_is_transpiled_to_the_backend(scorer):
    gold = example(gold="SELECT name FROM employees ORDER BY salary DESC LIMIT 1")
    assert scorer.score(gold, "SELECT TOP 1 name FROM employees ORDER BY salary DESC", dialect="tsql").verdict is Verdict.MATCH
    assert scorer.score(gold, "SELECT `name` FROM employees ORDER BY salary DESC LIMIT 1", dialect="mysql").verdict is Verdict.MATCH
    assert scorer.score(gold, "DELETE FROM employees", dialect="postgres").verdict is Verdict.FORBIDDEN


def test_gold_in_another_dialect_is_transpiled_too(scorer):
    gold = example(gold="SELECT TOP 2 name FROM employees ORDER BY salary DESC")
    gold = type(gold)(**{**gold.to_dict(), "dialect": "tsql", "schema": gold.schema})
    assert scorer.score(gold, "SELECT name FROM employees ORDER BY salary DESC LIMIT 2").verdict is Verdict.MATCH


def test_partial_credit_parts_need_and_use_the_ast(scorer):
    config = RewardConfig(result_overlap=0.5, schema_link=0.5, ast_similarity=0.5)
    near = scorer.score(example(), "SELECT name FROM employees WHERE salary > 100 ORDER BY name", reward=config)
    far = scorer.score(example(), "SELECT title FROM projects", reward=config)
    assert near.verdict is far.verdict is Verdict.MISMATCH
    assert near.reward > far.reward > config.floor
    exact = scorer.score(example(), CORRECT, reward=config)
    assert exact.reward == pytest.approx(1.0 + 0.1 + 0.5 * 3)


def test_strict_gate_refuses_before_execution():
    with Scorer(strict_gate=True) as strict:
        result = strict.score(example(), "WITH x AS (SELECT 1) SELECT load_extension('a') FROM x")
        assert result.verdict is Verdict.FORBIDDEN
        assert "load_extension" in result.error


def test_repeated_predictions_execute_once(scorer, monkeypatch):
    calls = []
    original = scorer.backend.run
    monkeypatch.setattr(scorer.backend, "run", lambda ex, sql: calls.append(sql) or original(ex, sql))
    for _ in range(5):
        result = scorer.score(example(), f"```sql\n{CORRECT}\n```")
        scorer.score(example(), CORRECT + ";")
    assert result.databases > 1
    assert calls == [CORRECT] * (2 * result.databases)  # on each database of the suite: gold once, the prediction once


def test_reward_config_changes_the_reward_not_the_verdict(scorer):
    generous = RewardConfig(execution_match=3.0, executes=0.5)
    assert scorer.score(example(), CORRECT, reward=generous).reward == pytest.approx(3.5)
    assert scorer.score(example(), CORRECT).reward == pytest.approx(1.1)


def test_length_penalty_reads_the_raw_output(scorer):
    config = RewardConfig(length_penalty=0.5, length_budget=100)
    rambling = "Let me think. " * 30 + f"\n```sql\n{CORRECT}\n```"
    assert scorer.score(example(), rambling, reward=config).reward < scorer.score(example(), CORRECT, reward=config).reward

import os
import signal
import threading

import pytest

from env.text2sql import Limits, RewardConfig, Submission, Verdict, score_batch
from env.text2sql.pool import ScorerSpec, ScoringPool

from .cases import CORRECT, example

SLOW = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r"


def test_results_keep_input_order_with_several_workers():
    predictions = [CORRECT, "SELECT 1", "DROP TABLE employees", "SELECT nope"] * 10
    submissions = [Submission(example(id=str(i)), p) for i, p in enumerate(predictions)]
    in_process = score_batch(submissions)
    pooled = score_batch(submissions, workers=2)
    assert [r.id for r in pooled] == [str(i) for i in range(len(predictions))]
    assert [(r.verdict, r.reward) for r in pooled] == [(r.verdict, r.reward) for r in in_process]


def test_a_query_past_its_wall_deadline_is_killed_and_the_rest_still_scored():
    # An unlimited step budget lets the query run; only the hard kill stops it.
    limits = Limits(vm_steps=10**15, timeout_s=0.5)
    submissions = [Submission(example(id="a"), CORRECT), Submission(example(id="slow"), SLOW), Submission(example(id="b"), CORRECT)]
    results = score_batch(submissions, workers=1, limits=limits, reward=RewardConfig(error_penalty=0.3))
    assert [r.verdict for r in results] == [Verdict.MATCH, Verdict.TIMEOUT, Verdict.MATCH]
    assert "killed" in results[1].error
    assert results[1].reward == pytest.approx(-0.3)


def test_a_dead_worker_is_replaced_and_its_prediction_recorded():
    with ScoringPool(ScorerSpec(limits=Limits(vm_steps=10**15, timeout_s=30)), workers=1) as pool:
        first = pool._workers[0]
        submissions = [Submission(example(id="slow"), SLOW), Submission(example(id="ok"), CORRECT)]
        threading.Timer(1.0, lambda: os.kill(first.process.pid, signal.SIGKILL)).start()
        results = pool.map(submissions)
        assert results[0].verdict is Verdict.RESOURCE_LIMIT and "died" in results[0].error
        assert results[1].verdict is Verdict.MATCH
        assert pool.map([Submission(example(), CORRECT)])[0].verdict is Verdict.MATCH

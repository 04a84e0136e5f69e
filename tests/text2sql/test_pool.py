import os
import signal
import threading
import time

import pytest

from env.text2sql import Limits, RewardConfig, Submission, Verdict, score_batch
from env.text2sql import pool as pool_module
from env.text2sql.pool import ScorerSpec, ScoringPool, _Batch

from .cases import CORRECT, SCHEMA, example

SLOW = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r"


def kill_while_on(worker, number, seconds):
    """SIGKILL a pool worker once it has been on its ``number``-th prediction for ``seconds``."""
    while (word := worker.progress.value) >> 40 != number or not word & ((1 << 40) - 1):  # count, start stamp
        time.sleep(0.01)
    time.sleep(seconds)
    os.kill(worker.process.pid, signal.SIGKILL)


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


def test_a_stuck_prediction_mid_chunk_fails_alone_and_the_finished_results_are_kept():
    # One example, so all 301 predictions form one chunk on the one worker.
    predictions = [CORRECT, "SELECT nope", "SELECT name FROM employees"] * 50
    predictions = predictions + [SLOW] + predictions
    submissions = [Submission(example(id=str(i)), p) for i, p in enumerate(predictions)]
    expected = [(r.verdict, r.reward) for r in score_batch(submissions[:150])] * 2
    with ScoringPool(ScorerSpec(limits=Limits(vm_steps=10**15, timeout_s=0.3)), workers=1) as pool:
        results = pool.map(submissions)
        assert [r.id for r in results] == [str(i) for i in range(len(predictions))]
        assert results[150].verdict is Verdict.TIMEOUT and "killed" in results[150].error
        assert [(r.verdict, r.reward) for r in results[:150] + results[151:]] == expected
        # The results sent before the hang were kept: the replacement scored only the 150 after it.
        assert pool._workers[0].answered == 150
        assert [r.verdict for r in pool.map(submissions[:3])] == [Verdict.MATCH, Verdict.RUNTIME_ERROR, Verdict.MISMATCH]


def test_predictions_are_grouped_by_example_and_come_back_in_input_order(monkeypatch):
    schemas = [SCHEMA, SCHEMA + "INSERT INTO employees VALUES (5, 'Eve', 'ops', 95.0);"]
    golds = [CORRECT, "SELECT count(*) FROM employees"]
    examples = [example(gold=g, schema=s, id=f"{i}{j}") for i, s in enumerate(schemas) for j, g in enumerate(golds)]
    # Interleaved: each example's predictions are spread over the whole batch.
    submissions = [Submission(examples[n % 4], p) for n, p in enumerate([CORRECT, golds[1], "SELECT 1", "SELECT nope"] * 12)]
    in_process = [(r.id, r.verdict, r.reward) for r in score_batch(submissions)]
    with ScoringPool(ScorerSpec(), workers=2) as pool:
        batch = _Batch(pool, chunk_size=4)
        batch.route(submissions)
        batch.end_of_input()
        slots: dict[tuple, set[int]] = {}
        for slot, chunks in enumerate(batch.pending):
            for chunk in chunks:
                for _, submission in chunk:
                    slots.setdefault((submission.example.schema, submission.example.gold), set()).add(slot)
        assert len(slots) == 4 and all(len(home) == 1 for home in slots.values()), "each example on one worker"
        assert set().union(*slots.values()) == {0, 1}, "the examples are spread over both workers"
        assert [(r.id, r.verdict, r.reward) for r in pool.map(submissions)] == in_process
        # Any other iterable is read in blocks while the workers score: the same results, in order.
        monkeypatch.setattr(pool_module, "_BLOCK", 5)
        assert [(r.id, r.verdict, r.reward) for r in pool.map(iter(submissions))] == in_process


def test_a_worker_killed_mid_chunk_fails_only_the_prediction_it_was_on():
    with ScoringPool(ScorerSpec(limits=Limits(vm_steps=10**15, timeout_s=30)), workers=1) as pool:
        first = pool._workers[0]
        predictions = [CORRECT] * 40 + [SLOW] + ["SELECT nope"] * 40
        submissions = [Submission(example(id=str(i)), p) for i, p in enumerate(predictions)]
        threading.Thread(target=kill_while_on, args=(first, 41, 0.5), daemon=True).start()
        results = pool.map(submissions)
        assert [r.verdict for r in results] == [Verdict.MATCH] * 40 + [Verdict.RESOURCE_LIMIT] + [Verdict.RUNTIME_ERROR] * 40
        assert "died" in results[40].error and pool._workers[0].answered == 40


def test_an_empty_batch_and_a_pool_reused_across_batches():
    with ScoringPool(ScorerSpec(), workers=2) as pool:
        assert pool.map([]) == []
        for size in (1, 7, 300):
            results = pool.map([Submission(example(id=str(i)), CORRECT) for i in range(size)])
            assert [r.id for r in results] == [str(i) for i in range(size)]
            assert all(r.verdict is Verdict.MATCH for r in results)


def test_stuck_predictions_on_two_workers_while_the_input_streams(monkeypatch):
    monkeypatch.setattr(pool_module, "_BLOCK", 16)
    schemas = [SCHEMA, SCHEMA + "INSERT INTO employees VALUES (5, 'Eve', 'ops', 95.0);"]
    predictions = [CORRECT, "SELECT nope", "SELECT name FROM employees"] * 40
    slow = {17, 90}
    submissions = [
        Submission(example(schema=schemas[i % 2], id=str(i)), SLOW if i in slow else p) for i, p in enumerate(predictions)
    ]
    expected = [(r.id, r.verdict, r.reward) for r in score_batch(s for i, s in enumerate(submissions) if i not in slow)]
    with ScoringPool(ScorerSpec(limits=Limits(vm_steps=10**15, timeout_s=0.3)), workers=2, wait=False) as pool:
        results = pool.map(iter(submissions))
        assert [r.id for r in results] == [str(i) for i in range(len(submissions))]
        assert [i for i, r in enumerate(results) if r.verdict is Verdict.TIMEOUT] == sorted(slow)
        assert [(r.id, r.verdict, r.reward) for i, r in enumerate(results) if i not in slow] == expected

"""Reward throughput: this environment against a naive scorer, measured in one run.

The naive baseline is what a first implementation does: for every call it
creates an in-memory SQLite database from the schema script, runs the gold and
the predicted query, and compares sorted rows. It has no sandbox, so it is
only given the predictions it can survive (the generator's mix: correct, near
misses, wrong and non-executing queries).

Ours is measured under both verdicts (the single database, and the test suite
that is the objective), each twice on the same pairs' examples: cold (a fresh
scorer, so database builds, gold runs and suite distillation are included)
and in steady state (the next batch of new predictions for the same
examples, as in a later training step, when databases, gold results and
every example's suite are cached).

Run: python benchmarks/reward_throughput.py [--pairs 2000] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time

import sqlglot

from env.text2sql import Scorer, ScorerSpec, ScoringPool, Submission, extract_sql
from env.text2sql.data import generate, perturbed_predictions
from env.text2sql.gate import is_ordered

VERDICTS = ("single_database", "test_suite")


def naive_verdict(schema: str, gold: str, prediction: str) -> str:
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(schema)
        gold_rows = connection.execute(gold).fetchall()
        try:
            predicted_rows = connection.execute(extract_sql(prediction)).fetchall()
        except (sqlite3.Error, sqlite3.Warning, ValueError):
            return "error"
        return "match" if sorted(map(repr, gold_rows)) == sorted(map(repr, predicted_rows)) else "mismatch"
    finally:
        connection.close()


def make_pairs(count: int, seed: int, batch: int = 0) -> list[Submission]:
    """``count`` predictions, four per example; ``batch`` draws new predictions for the same examples."""
    _, held_out = generate(0, count // 4 + 1, seed=seed)
    predictions = perturbed_predictions(held_out, seed=seed + 1000 * batch, per_example=4)
    return [Submission(p.example, p.text) for p in predictions][:count]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} scores/s  ({seconds:.3f}s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pairs = make_pairs(args.pairs, args.seed)
    print(f"{len(pairs)} (prediction, gold) pairs over {len({p.example.schema for p in pairs})} schemas")

    next_batch = make_pairs(args.pairs, args.seed, batch=1)
    # The gold itself as a prediction matches, so scoring these builds every example's suite in the workers.
    warm_up = [Submission(p.example, p.example.gold) for p in {p.example.id: p for p in pairs}.values()]
    timings: dict[str, list[float]] = {"naive": []}
    results: dict[str, list] = {}
    # Rounds alternate the scorers and report medians: this machine's load drifts.
    for _ in range(args.rounds):
        started = time.perf_counter()
        naive = [naive_verdict(p.example.schema, p.example.gold, p.prediction) for p in pairs]
        timings["naive"].append(time.perf_counter() - started)
        for verdict in VERDICTS:
            with Scorer(verdict=verdict) as scorer:
                started = time.perf_counter()
                results[verdict] = [scorer.score_submission(p) for p in pairs]
                timings.setdefault(f"{verdict} cold", []).append(time.perf_counter() - started)
                for pair in pairs:  # suites are built on a gold's first match: build the rest, as training soon has
                    scorer.suite_for(pair.example)
                started = time.perf_counter()
                for p in next_batch:
                    scorer.score_submission(p)
                timings.setdefault(f"{verdict} steady", []).append(time.perf_counter() - started)
            with ScoringPool(ScorerSpec(verdict=verdict), workers=args.workers) as pool:
                started = time.perf_counter()
                results[f"{verdict} pool"] = pool.map(pairs)
                timings.setdefault(f"{verdict} pool cold", []).append(time.perf_counter() - started)
                pool.map(warm_up)
                started = time.perf_counter()
                pool.map(next_batch)
                timings.setdefault(f"{verdict} pool steady", []).append(time.perf_counter() - started)

    median = {name: statistics.median(values) for name, values in timings.items()}
    naive_s = median["naive"]
    print(f"medians of {args.rounds} rounds:")
    print(f"{'naive baseline, 1 process':<46}{rate(len(pairs), naive_s)}")
    for verdict in VERDICTS:
        for mode, label in (("cold", "1 process, cold"), ("steady", "1 process, steady"),
                            ("pool cold", f"{args.workers} workers, cold"), ("pool steady", f"{args.workers} workers, steady")):
            seconds = median[f"{verdict} {mode}"]
            print(f"{verdict + ', ' + label:<46}{rate(len(pairs), seconds)}   ratio {naive_s / seconds:5.1f}x")

    # Single-database verdicts agree wherever the baseline's rules are ours: no ORDER BY in the gold.
    comparable = disagreements = 0
    for pair, baseline, result in zip(pairs, naive, results["single_database"]):
        if is_ordered(sqlglot.parse_one(pair.example.gold, read="sqlite")):
            continue
        comparable += 1
        mine = result.verdict.value if result.verdict.executed else "error"
        if mine != baseline:
            disagreements += 1
            print(f"  differs: {pair.example.id}: baseline {baseline}, ours {result.verdict.value} ({result.error})")
    print(f"single-database verdicts identical to the baseline's on {comparable - disagreements}/{comparable} pairs where its rules apply")
    single, suite = results["single_database"], results["test_suite"]
    caught = sum(a.execution_match and not b.execution_match for a, b in zip(single, suite))
    print(f"matches on the example's own database: {sum(a.execution_match for a in single)}; "
          f"of those the test suite rejects {caught}; it accepts none the single database rejects: "
          f"{not any(b.execution_match and not a.execution_match for a, b in zip(single, suite))}")
    for verdict in VERDICTS:
        same = sum(a.verdict == b.verdict for a, b in zip(results[verdict], results[f"{verdict} pool"]))
        print(f"{verdict}: pooled and in-process verdicts identical on {same}/{len(pairs)} pairs")


if __name__ == "__main__":
    main()

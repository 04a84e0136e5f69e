"""``python -m env.text2sql``: score predictions, generate data, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from .backends import Limits
from .example import Example
from .pool import score_batch
from .reward import RewardConfig
from .scorer import Score, Submission

INVALID_INPUT = "invalid_input"
"""Verdict of an input line that could not be read: no prediction was scored."""


def _parse_line(line: str, number: int) -> Submission:
    if not line.strip():
        raise ValueError(f"line {number}: empty line")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"line {number}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in ("id", "schema", "gold", "prediction") if key not in row]
    if missing:
        raise ValueError(f"line {number}: missing key(s) {', '.join(missing)}")
    wrong = [key for key in ("schema", "gold", "prediction", "dialect") if key in row and not isinstance(row[key], str)]
    if wrong:
        raise ValueError(f"line {number}: key(s) {', '.join(wrong)} must be strings")
    example = Example(id=str(row["id"]), question=str(row.get("question", "")), schema=row["schema"], gold=row["gold"])
    return Submission(example, row["prediction"], row.get("dialect") or "sqlite")


def _error_record(line: str, message: str) -> dict[str, Any]:
    try:
        identifier = json.loads(line).get("id")
    except (json.JSONDecodeError, AttributeError):
        identifier = None
    return {"id": identifier, "verdict": INVALID_INPUT, "execution_match": False, "reward": None, "error": message}


def score_file(source: TextIO, sink: TextIO, *, workers: int, backend: str, reward: RewardConfig, limits: Limits) -> Counter:
    """Score a JSONL stream into a JSONL stream, one output line per input line, in order."""
    lines = source.read().splitlines()
    records: list[dict[str, Any] | None] = [None] * len(lines)
    submissions: list[Submission] = []
    positions: list[int] = []
    for number, line in enumerate(lines, start=1):
        try:
            submissions.append(_parse_line(line, number))
            positions.append(number - 1)
        except ValueError as error:
            records[number - 1] = _error_record(line, str(error))
    scores: list[Score] = score_batch(submissions, workers=workers, backend=backend, reward=reward, limits=limits)
    for position, result in zip(positions, scores):
        records[position] = result.to_record()
    counts: Counter = Counter()
    for record in records:
        counts[record["verdict"]] += 1
        sink.write(json.dumps(record) + "\n")
    return counts


def _cmd_score(args: argparse.Namespace) -> int:
    reward = RewardConfig.from_dict(json.loads(Path(args.reward).read_text())) if args.reward else RewardConfig()
    limits = Limits(timeout_s=args.timeout)
    started = time.perf_counter()
    with open(args.input, encoding="utf-8") as source:
        sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            counts = score_file(source, sink, workers=args.workers, backend=args.backend, reward=reward, limits=limits)
        finally:
            if args.output:
                sink.close()
    summary = ", ".join(f"{verdict} {count}" for verdict, count in counts.most_common())
    print(f"scored {sum(counts.values())} line(s) in {time.perf_counter() - started:.2f}s: {summary}", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import generate

    train, held_out = generate(args.train, args.eval, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in (("train", train), ("eval", held_out)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as sink:
            for example in examples:
                sink.write(json.dumps(example.to_dict()) + "\n")
    print(f"wrote {len(train)} train and {len(held_out)} eval examples to {out}/", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Score the generator's gold queries and model-like predictions; print what the verdicts say."""
    from .data import generate, perturbed_predictions

    _, held_out = generate(0, args.examples, seed=args.seed)
    predictions = perturbed_predictions(held_out, seed=args.seed, per_example=args.per_example)
    submissions = [Submission(example, example.gold) for example in held_out]
    submissions += [Submission(p.example, p.text) for p in predictions]
    kinds = ["gold"] * len(held_out) + [p.kind for p in predictions]
    print(f"scoring {len(submissions)} predictions on {len(held_out)} held-out examples with {args.workers} worker(s)...", flush=True)
    started = time.perf_counter()
    scores = score_batch(submissions, workers=args.workers)
    elapsed = time.perf_counter() - started

    table: dict[str, Counter] = {}
    rewards: dict[str, list[float]] = {}
    for kind, result in zip(kinds, scores):
        table.setdefault(kind, Counter())[result.verdict.value] += 1
        rewards.setdefault(kind, []).append(result.reward)
    print(f"{'prediction kind':<16}{'n':>6}{'exec acc':>10}{'mean reward':>13}  verdicts")
    for kind, counts in table.items():
        n = sum(counts.values())
        verdicts = ", ".join(f"{verdict} {count}" for verdict, count in counts.most_common())
        accuracy = counts["match"] / n
        print(f"{kind:<16}{n:>6}{accuracy:>10.1%}{sum(rewards[kind]) / n:>13.3f}  {verdicts}")
    print(f"scored {len(scores)} predictions in {elapsed:.2f}s ({len(scores) / elapsed:,.0f}/s, worker start-up included)")
    gold_ok = table["gold"]["match"] == len(held_out)
    print("gold queries: all match" if gold_ok else "gold queries: NOT all match; see the table above")
    return 0 if gold_ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m env.text2sql", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score predictions in a JSONL file; prints one JSON object per line")
    score.add_argument("input", help="JSONL with keys id, schema, gold, prediction and optional dialect")
    score.add_argument("-o", "--output", help="write results here instead of standard output")
    score.add_argument("--workers", type=int, default=1, help="scoring processes (0: in this process, no hard kill)")
    score.add_argument("--backend", default="sqlite", help="'sqlite' or a postgresql:// or mysql:// URL")
    score.add_argument("--reward", help="JSON file with RewardConfig weights (default weights otherwise)")
    score.add_argument("--timeout", type=float, default=Limits().timeout_s, help="wall-clock seconds per query")
    score.set_defaults(run=_cmd_score)

    generate = commands.add_parser("generate", help="write a synthetic train/eval dataset as JSONL")
    generate.add_argument("--train", type=int, default=1000, help="training examples")
    generate.add_argument("--eval", type=int, default=200, help="held-out examples")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", default="data", help="folder for train.jsonl and eval.jsonl")
    generate.set_defaults(run=_cmd_generate)

    demo = commands.add_parser("demo", help="score gold and model-like predictions on the built-in dataset")
    demo.add_argument("--examples", type=int, default=300, help="held-out examples to generate")
    demo.add_argument("--per-example", type=int, default=4, help="model-like predictions per example")
    demo.add_argument("--workers", type=int, default=2, help="scoring processes")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

"""``python -m env.text2sql``: score predictions, generate data, run the demo."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, TextIO

import orjson

from .backends import Limits
from .example import Example
from .pool import score_batch
from .reward import RewardConfig
from .scorer import VERDICT_METHODS, Score, Submission, VerdictMethod
from .suite import SuiteOptions
from .suite_cache import default_cache_dir

INVALID_INPUT = "invalid_input"
"""Verdict of an input line that could not be read: no prediction was scored."""


def _parse_line(line: str, number: int, shared: dict | None = None) -> Submission:
    """One input line as a submission; raises ``ValueError`` saying what is wrong with it.

    ``shared`` (one dict for a whole file) maps each schema, gold, question,
    id and dialect string, and each example, to the first equal one seen, so
    the lines of one example share one object: less memory, and pickling a
    chunk of predictions for a worker sends each schema once, not per line.
    """
    if not line.strip():
        raise ValueError(f"line {number}: empty line")
    try:
        row = _load_json(line)
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
    seen = {} if shared is None else shared
    identifier, question = str(row["id"]), str(row.get("question", ""))
    identifier, question = seen.setdefault(identifier, identifier), seen.setdefault(question, question)
    schema, gold = seen.setdefault(row["schema"], row["schema"]), seen.setdefault(row["gold"], row["gold"])
    dialect = row.get("dialect") or "sqlite"
    key = (identifier, question, schema, gold)
    example = seen.get(key)
    if example is None:
        example = seen[key] = Example(id=identifier, question=question, schema=schema, gold=gold)
    return Submission(example, row["prediction"], seen.setdefault(dialect, dialect))


def _load_json(line: str) -> Any:
    """The line's JSON value, as ``json.loads`` reads it, mostly by orjson, three times faster.

    orjson reads what it accepts as json does, but for numbers: past 64 bits
    an integer becomes a float (json keeps it whole). So a line is read again
    by json when orjson refuses it (json accepts NaN, lone surrogates and huge
    exponents, and words its own errors) and when it is not an object whose id
    and question, the only values used as they are read, hold no float.
    """
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)
    if type(row) is dict and type(row.get("id")) in _EXACT and type(row.get("question")) in _EXACT:
        return row
    return json.loads(line)


_EXACT = frozenset({str, int, bool, type(None)})
"""Types of value that orjson reads exactly as json does."""


def _error_record(line: str, message: str) -> dict[str, Any]:
    try:
        identifier = json.loads(line).get("id")
    except (json.JSONDecodeError, AttributeError):
        identifier = None
    return {"id": identifier, "verdict": INVALID_INPUT, "execution_match": False, "reward": None, "error": message,
            "method": None, "databases": 0, "weak_gold": False}


def score_file(source: TextIO, sink: TextIO, *, workers: int, backend: str, reward: RewardConfig, limits: Limits,
               verdict: VerdictMethod = "test_suite", suite: SuiteOptions | None = None,
               suite_cache: str | None = None) -> tuple[Counter, set[str]]:
    """Score a JSONL stream into a JSONL stream, one output line per input line, in order.

    Returns how many lines got each verdict, and the ids of the examples whose gold is weak (its suite
    cannot tell it from most of its neighbours), for the summary line.
    """
    records: list[dict[str, Any] | None] = []
    positions: list[int] = []
    shared: dict = {}

    def submissions() -> Iterator[Submission]:
        # A generator, so the pool scores the first lines while later ones are read and parsed. A
        # file's lines end at its newlines only; str.splitlines would also split at U+2028 and other
        # separators that JSON allows inside a string.
        for number, line in enumerate(source, start=1):
            line = line[:-1] if line.endswith("\n") else line
            records.append(None)
            try:
                submission = _parse_line(line, number, shared)
            except ValueError as error:
                records[number - 1] = _error_record(line, str(error))
                continue
            positions.append(number - 1)
            yield submission

    scores: list[Score] = score_batch(submissions(), workers=workers, backend=backend, reward=reward, limits=limits,
                                      verdict=verdict, suite=suite, suite_cache=suite_cache)
    for position, result in zip(positions, scores):
        records[position] = result.to_record()
    counts: Counter = Counter()
    weak: set[str] = set()
    for record in records:
        counts[record["verdict"]] += 1
        if record["weak_gold"]:
            weak.add(str(record["id"]))
        sink.write(json.dumps(record) + "\n")
    return counts, weak


def _cmd_score(args: argparse.Namespace) -> int:
    gc.freeze()  # the modules loaded live as long as the command: collections need not walk them again and again
    reward = RewardConfig.from_dict(json.loads(Path(args.reward).read_text())) if args.reward else RewardConfig()
    limits = Limits(timeout_s=args.timeout)
    suite = SuiteOptions(size=args.suite_size, candidates=args.suite_candidates)
    started = time.perf_counter()
    with open(args.input, encoding="utf-8") as source:
        sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            counts, weak = score_file(source, sink, workers=args.workers, backend=args.backend, reward=reward, limits=limits,
                                verdict=args.verdict, suite=suite,
                                suite_cache=None if args.no_suite_cache else str(args.suite_cache))
        finally:
            if args.output:
                sink.close()
    summary = ", ".join(f"{verdict} {count}" for verdict, count in counts.most_common())
    print(f"scored {sum(counts.values())} line(s) in {time.perf_counter() - started:.2f}s: {summary}", file=sys.stderr)
    if weak:
        shown = ", ".join(sorted(weak)[:10]) + (", ..." if len(weak) > 10 else "")
        print(f"{len(weak)} line(s) have a weak gold, which even its test suite cannot tell from most of its "
              f"neighbour queries (a match there says little): {shown}", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import generate_with_report

    train, held_out, report = generate_with_report(args.train, args.eval, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in (("train", train), ("eval", held_out)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as sink:
            for example in examples:
                sink.write(json.dumps(example.to_dict()) + "\n")
    print(
        f"wrote {len(train)} train and {len(held_out)} eval examples to {out}/ "
        f"(redrew {report.degenerate} degenerate candidates)",
        file=sys.stderr,
    )
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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    score.add_argument("--workers", type=int, default=min(2, cpus),
                       help="scoring processes (0: in this process, no hard kill; default 2, or 1 on one CPU)")
    score.add_argument("--backend", default="sqlite", help="'sqlite' or a postgresql:// or mysql:// URL")
    score.add_argument("--reward", help="JSON file with RewardConfig weights (default weights otherwise)")
    score.add_argument("--timeout", type=float, default=Limits().timeout_s, help="wall-clock seconds per query")
    score.add_argument("--verdict", choices=VERDICT_METHODS, default="test_suite",
                       help="test_suite (default: match on every database of the gold's test suite) or single_database "
                            "(the example's own database only; accepts wrong queries)")
    score.add_argument("--suite-size", type=int, default=SuiteOptions().size,
                       help="databases per test suite, the example's own included (default %(default)s)")
    score.add_argument("--suite-candidates", type=int, default=SuiteOptions().candidates,
                       help="random databases tried per gold when distilling its suite (default %(default)s)")
    score.add_argument("--suite-cache", default=default_cache_dir(), metavar="DIR",
                       help="folder that keeps distilled suites across runs (default %(default)s, or $TEXT2SQL_CACHE)")
    score.add_argument("--no-suite-cache", action="store_true", help="distil every suite afresh and keep none")
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

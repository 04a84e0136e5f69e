"""Whole-process throughput of ``python -m env.text2sql score`` against a naive per-line scorer.

Writes a JSONL of model-like predictions (``--per-example`` per example, like a
GRPO group, over 14 schema instances per generator seed), then times, in the
same run and each as a whole process started with ``subprocess``:

  (a) ``python -m env.text2sql score FILE -o OUT`` with its defaults (worker
      pool with the hard kill), twice: with an empty suite cache (every
      gold's test suite distilled in the run) and with the suites an earlier
      run cached (re-scoring an evaluation set, the next checkpoint's
      predictions, another trial);
  (b) a naive scorer (``--naive``, this file): per line, parse the JSON, build
      an in-memory SQLite database from the schema script, run the gold and
      the extracted prediction, compare with ``results_match``; no caching and
      no sandbox (the generator's predictions are ones it survives).

It prints both wall times, lines/s and the speed-up, (b)'s wall time over
(a)'s, and the CPU time of each command with its workers (a busy machine
stretches wall times, not CPU times); ``--repeat`` alternates (a) and (b) and
reports medians, because the machine is noisy. The issue's target is a
speed-up of at least 3 on 20,000 or more lines over 40 or more schemas.
``--score-args`` adds arguments to (a): ``"--verdict single_database"``
checks what the naive scorer checks (the default test-suite verdict also runs
matches on the gold's suite), and ``"--workers 1"`` leaves (a) one scoring
process, like (b). (a) uses two processes by default, so another job that
keeps a core busy slows (a) and not (b): compare runs on a quiet machine.

    python benchmarks/score_cli.py [--lines 20000] [--seeds 3] [--per-example 8] [--repeat 3] [--keep DIR]
        [--score-args "--workers 2"]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def naive_score(source: Path, sink: Path) -> None:
    """The naive per-line scorer: a fresh in-memory database per line, nothing cached."""
    from env.text2sql import extract_sql
    from env.text2sql.compare import results_match

    with open(source, encoding="utf-8") as lines, open(sink, "w", encoding="utf-8") as out:
        for line in lines:
            row = json.loads(line)
            connection = sqlite3.connect(":memory:")
            try:
                connection.executescript(row["schema"])
                gold = connection.execute(row["gold"]).fetchall()
                try:
                    predicted = connection.execute(extract_sql(row["prediction"])).fetchall()
                    ordered = "order by" in row["gold"].lower()
                    verdict = "match" if results_match(gold, predicted, ordered=ordered) else "mismatch"
                except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
                    verdict = "error"
            finally:
                connection.close()
            out.write(json.dumps({"id": row["id"], "verdict": verdict}) + "\n")


def write_input(path: Path, lines: int, seeds: int, per_example: int) -> tuple[int, int]:
    """Write ``lines`` JSONL rows drawn over ``seeds`` generator seeds; return (lines, distinct schemas)."""
    from env.text2sql.data import generate, perturbed_predictions

    per_seed = -(-lines // (seeds * per_example))
    rows = []
    for seed in range(seeds):
        examples, _ = generate(per_seed, 0, seed=seed)
        for number, prediction in enumerate(perturbed_predictions(examples, seed=seed, per_example=per_example)):
            example = prediction.example
            rows.append({"id": f"s{seed}-{example.id}-{number}", "schema": example.schema, "gold": example.gold,
                         "prediction": prediction.text})
    rows = rows[:lines]
    with open(path, "w", encoding="utf-8") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
    return len(rows), len({row["schema"] for row in rows})


def timed(command: list[str], cache: Path | None = None) -> tuple[float, float]:
    """Wall time and CPU time (its worker processes' included) of a whole process.

    ``cache`` is the suite cache folder it gets ($TEXT2SQL_CACHE). CPU time
    shows what a busy machine does to the wall time: a command that waited
    for a core takes longer but no more CPU.
    """
    env = {**os.environ, "TEXT2SQL_CACHE": str(cache)} if cache else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return elapsed, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=3, help="generator seeds (14 schemas each)")
    parser.add_argument("--per-example", type=int, default=8, help="predictions per example")
    parser.add_argument("--repeat", type=int, default=3, help="alternate (a) and (b) this many times; medians")
    parser.add_argument("--keep", help="write the input and outputs here instead of a temporary folder")
    parser.add_argument("--score-args", default="", help="extra arguments for (a), e.g. '--workers 2' (default: none)")
    parser.add_argument("--naive", metavar="IN", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive:
        naive_score(Path(args.naive), Path(args.output))
        return

    with tempfile.TemporaryDirectory(prefix="score-cli-") as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / "in.jsonl"
        count, schemas = write_input(source, args.lines, args.seeds, args.per_example)
        print(f"{count} lines over {schemas} schemas, {args.per_example} predictions per example")
        ours_command = [sys.executable, "-m", "env.text2sql", "score", str(source), "-o", str(folder / "ours.jsonl")]
        ours_command += shlex.split(args.score_args)
        naive_command = [sys.executable, __file__, "--naive", str(source), "-o", str(folder / "naive.jsonl")]
        warm = folder / "warm-suites"
        timed(ours_command, warm)  # fills the warm suite cache; not timed
        timings: dict[str, list[float]] = {"cold": [], "warm": [], "naive": []}
        cpu: dict[str, list[float]] = {name: [] for name in timings}
        for round_number in range(args.repeat):
            # Alternate the order too, so neither always runs on a warmer page cache.
            order = ("cold", "warm", "naive") if round_number % 2 == 0 else ("naive", "warm", "cold")
            for name in order:
                cache = folder / f"cold-suites-{round_number}" if name == "cold" else warm
                wall, used = timed(naive_command) if name == "naive" else timed(ours_command, cache)
                timings[name].append(wall)
                cpu[name].append(used)
            done = (f"{name} {timings[name][-1]:.2f}s (CPU {cpu[name][-1]:.2f}s)" for name in timings)
            print(f"round {round_number + 1}: " + ", ".join(done), flush=True)
        median = {name: statistics.median(values) for name, values in timings.items()}
        median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
        print(f"medians of {args.repeat} round(s), whole process, start-up included (CPU: all its processes):")
        label = f"(a) python -m env.text2sql score {args.score_args or '(defaults)'}"
        for name, what in (("cold", "empty suite cache"), ("warm", "suites cached by an earlier run")):
            print(f"{label + ', ' + what:<80} {median[name]:8.2f}s  {count / median[name]:10,.0f} lines/s"
                  f"   ratio {median['naive'] / median[name]:.2f}x   CPU {median_cpu[name]:.2f}s")
        print(f"{'(b) naive per-line scorer':<80} {median['naive']:8.2f}s  {count / median['naive']:10,.0f} lines/s"
              f"{'':13}CPU {median_cpu['naive']:.2f}s")
        produced = sum(1 for _ in open(folder / "ours.jsonl", encoding="utf-8"))
        if produced != count:
            raise SystemExit(f"the score command wrote {produced} lines for {count} input lines")


if __name__ == "__main__":
    main()

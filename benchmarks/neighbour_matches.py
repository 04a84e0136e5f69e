"""How often a wrong neighbour of the gold still scores as a match, per verdict.

Writes, for each example, its gold's one-edit neighbours (env.text2sql.neighbours:
a comparison flipped, a constant shifted by 1 or 3, a condition or the whole
WHERE dropped, MIN for MAX, the sort reversed, LIMIT off by one, a column
swapped...) as predictions in the ``score`` command's JSONL, scores the file
with ``python -m env.text2sql score`` under the single-database verdict and
under the test-suite verdict, and prints the share of neighbours that match.

Two kinds are left out of the rate: DISTINCT toggled and an inner join made
outer. Under the schema's own keys they are often the same query (DISTINCT
over a key or a GROUP BY, a LEFT JOIN along a NOT NULL foreign key), so a
match there is right, not a false positive. They are still counted and shown.

    python benchmarks/neighbour_matches.py                     # generator held-out split: 300, seed 0, all domains
    python benchmarks/neighbour_matches.py --examples my.jsonl # any examples (keys of env.text2sql.Example)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from env.text2sql import Example
from env.text2sql.data import generate
from env.text2sql.suite import example_neighbours

EQUIVALENT_PRONE = ("distinct", "join")


def _examples(args: argparse.Namespace) -> list[Example]:
    if args.examples:
        lines = Path(args.examples).read_text().splitlines()
        return [Example.from_dict(json.loads(line)) for line in lines if line.strip()]
    return generate(0, args.n, seed=args.seed)[1]


def _write(examples: list[Example], path: Path) -> list[tuple[str, str]]:
    """The JSONL to score; returns (example id, neighbour kind) per line."""
    keys = []
    with path.open("w") as sink:
        for example in examples:
            for number, neighbour in enumerate(example_neighbours(example)):
                row = {"id": f"{example.id}/{number}", "schema": example.schema, "gold": example.gold,
                       "prediction": neighbour.sql, "dialect": "sqlite"}
                sink.write(json.dumps(row) + "\n")
                keys.append((example.id, neighbour.kind))
    return keys


def _score(path: Path, verdict: str, workers: int) -> list[dict]:
    out = path.with_suffix(f".{verdict}.out")
    command = [sys.executable, "-m", "env.text2sql", "score", str(path), "-o", str(out), "--verdict", verdict, "--workers", str(workers)]
    subprocess.run(command, check=True)
    return [json.loads(line) for line in out.read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", help="JSONL of examples instead of the generator's held-out split")
    parser.add_argument("--n", type=int, default=300, help="held-out examples to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show", type=int, default=10, help="matching neighbours to print under the test-suite verdict")
    args = parser.parse_args()
    examples = _examples(args)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "neighbours.jsonl"
        keys = _write(examples, path)
        print(f"{len(keys)} neighbours of {len(examples)} gold queries", flush=True)
        results = {verdict: _score(path, verdict, args.workers) for verdict in ("single_database", "test_suite")}
        predictions = [json.loads(line)["prediction"] for line in path.read_text().splitlines()]
    by_id = {example.id: example for example in examples}
    print(f"\n{'kind':<18}{'n':>7}{'single db':>12}{'test suite':>12}")
    kinds = Counter(kind for _, kind in keys)
    for kind in sorted(kinds):
        rates = [sum(r["execution_match"] for r, (_, k) in zip(results[v], keys) if k == kind) / kinds[kind] for v in results]
        print(f"{kind:<18}{kinds[kind]:>7}{rates[0]:>12.2%}{rates[1]:>12.2%}")
    for verdict, records in results.items():
        measured = [(r, key) for r, key in zip(records, keys) if key[1] not in EQUIVALENT_PRONE]
        matched = sum(r["execution_match"] for r, _ in measured)
        accepting = defaultdict(bool)
        for record, (example_id, _) in measured:
            accepting[example_id] |= record["execution_match"]
        weak = len({example_id for r, (example_id, _) in zip(records, keys) if r.get("weak_gold")})
        print(f"\n{verdict}: {matched} of {len(measured)} neighbours match ({matched / max(len(measured), 1):.2%}), "
              f"excluding {', '.join(EQUIVALENT_PRONE)}; {sum(accepting.values())} of {len(examples)} examples accept at least one"
              + (f"; {weak} weak gold(s)" if verdict == "test_suite" else ""))
    shown = 0
    for record, (example_id, kind), prediction in zip(results["test_suite"], keys, predictions):
        if record["execution_match"] and kind not in EQUIVALENT_PRONE and shown < args.show:
            shown += 1
            print(f"  [{kind}] gold: {by_id[example_id].gold}\n          matched: {prediction}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

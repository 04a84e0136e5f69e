"""Score predictions: extract, gate, execute in the sandbox, compare, reward.

Work is cached at three levels, because GRPO groups repeat completions and
datasets repeat schemas: each schema's database is built once (by the
backend), each gold query runs and parses once, and each distinct extracted
prediction is executed once per example.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp

from .backends import Backend, Limits, QueryFailed, make_backend, schema_key
from .compare import NormalRow, cell_overlap, overlap_f1, results_match
from .example import Example
from .extract import extract_sql
from .gate import is_ordered, node_bag, parse_query, referenced_names, to_dialect
from .reward import Credit, RewardConfig, compute_reward
from .verdict import Verdict


@dataclass(frozen=True)
class Submission:
    """One model output to score against one example."""

    example: Example
    prediction: str
    dialect: str = "sqlite"


@dataclass(frozen=True)
class Score:
    """What scoring one prediction found."""

    id: str
    verdict: Verdict
    reward: float
    error: str | None = None
    sql: str = ""

    @property
    def execution_match(self) -> bool:
        return self.verdict is Verdict.MATCH

    def to_record(self) -> dict[str, Any]:
        """The JSON record of the ``score`` command."""
        return {
            "id": self.id,
            "verdict": self.verdict.value,
            "execution_match": self.execution_match,
            "reward": self.reward,
            "error": self.error,
        }


class _Gold:
    """A gold query's result, and its parse only once something needs it.

    Parsing costs more than running a query, so the ORDER BY decision waits
    until a prediction's rows match as a multiset and the gold has more than
    one row; a gold without the word ORDER in it cannot have the clause.
    """

    def __init__(self, sql: str, dialect: str, rows: list[NormalRow], tree: exp.Expr | None = None) -> None:
        self.sql = sql
        self.dialect = dialect
        self.rows = rows
        self._tree = tree

    @property
    def tree(self) -> exp.Expr:
        if self._tree is None:
            self._tree = _parse_gold(self.sql, self.dialect)
        return self._tree

    @property
    def ordered(self) -> bool:
        if len(self.rows) < 2 or "order" not in self.sql.lower():
            return False
        return is_ordered(self.tree)


@dataclass(frozen=True)
class _Outcome:
    """The reward-independent result of one prediction: what gets cached."""

    verdict: Verdict
    error: str | None = None
    credit: Credit = Credit()


class Scorer:
    """Scores predictions on one backend, caching databases, gold results and outcomes.

    ``strict_gate`` parses every prediction with the static gate even where
    the SQLite sandbox alone would refuse it; otherwise a SQLite-dialect
    prediction on SQLite is parsed only when an AST-based reward part is
    weighted, which keeps parsing off the hot path.
    """

    def __init__(
        self,
        backend: Backend | str = "sqlite",
        *,
        reward: RewardConfig | None = None,
        limits: Limits | None = None,
        strict_gate: bool = False,
        cache_size: int = 65_536,
    ) -> None:
        self.backend = make_backend(backend, limits) if isinstance(backend, str) else backend
        self.reward = reward or RewardConfig()
        self.strict_gate = strict_gate
        self.cache_size = cache_size
        self._gold: dict[tuple[str, str, str], _Gold | QueryFailed] = {}
        self._outcomes: OrderedDict[tuple, _Outcome] = OrderedDict()

    def score(self, example: Example, prediction: str, *, dialect: str = "sqlite", reward: RewardConfig | None = None) -> Score:
        """Score one raw model output; never raises for anything the model wrote."""
        config = reward or self.reward
        sql = extract_sql(prediction)
        outcome = self._outcome(example, sql, dialect, config.needs_overlap, config.needs_ast)
        value = compute_reward(outcome.verdict, outcome.credit, len(prediction), config)
        return Score(example.id, outcome.verdict, value, outcome.error, sql)

    def score_submission(self, submission: Submission, reward: RewardConfig | None = None) -> Score:
        return self.score(submission.example, submission.prediction, dialect=submission.dialect, reward=reward)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _outcome(self, example: Example, sql: str, dialect: str, needs_overlap: bool, needs_ast: bool) -> _Outcome:
        key = (schema_key(example), example.gold, dialect, sql, needs_overlap, needs_ast)
        cached = self._outcomes.get(key)
        if cached is not None:
            self._outcomes.move_to_end(key)
            return cached
        outcome = self._evaluate(example, sql, dialect, needs_overlap, needs_ast)
        self._outcomes[key] = outcome
        if len(self._outcomes) > self.cache_size:
            self._outcomes.popitem(last=False)
        return outcome

    def _evaluate(self, example: Example, sql: str, dialect: str, needs_overlap: bool, needs_ast: bool) -> _Outcome:
        gold = self._gold_for(example)
        if isinstance(gold, QueryFailed):
            return _Outcome(Verdict.GOLD_ERROR, gold.message)
        if "\x00" in sql:
            return _Outcome(Verdict.INVALID, "prediction contains a NUL byte")
        if not sql:
            return _Outcome(Verdict.INVALID, "no SQL found in the prediction")
        limit = self.backend.limits.max_query_bytes
        if len(sql.encode("utf-8", "surrogatepass")) > limit:
            return _Outcome(Verdict.RESOURCE_LIMIT, f"query is longer than {limit} bytes")
        try:
            tree = self._gate(sql, dialect, needs_ast)
            runnable = sql if dialect == self.backend.dialect else to_dialect(tree, self.backend.dialect)
            rows = self.backend.run(example, runnable)
        except QueryFailed as failure:
            return _Outcome(failure.verdict, failure.message)
        try:
            match = results_match(gold.rows, rows, ordered=False) and (
                not gold.ordered or results_match(gold.rows, rows, ordered=True)
            )
            credit = _credit(gold, rows, tree, needs_overlap)
        except QueryFailed as failure:
            return _Outcome(failure.verdict, failure.message)
        return _Outcome(Verdict.MATCH if match else Verdict.MISMATCH, None, credit)

    def _gate(self, sql: str, dialect: str, needs_ast: bool) -> exp.Expr | None:
        """Parse when something needs the tree or the sandbox alone is not the barrier."""
        sandboxed_sqlite = self.backend.dialect == "sqlite" and dialect == "sqlite"
        if sandboxed_sqlite and not (needs_ast or self.strict_gate):
            return None
        return parse_query(sql, dialect)

    def _gold_for(self, example: Example) -> _Gold | QueryFailed:
        key = (schema_key(example), example.gold, example.dialect)
        if key not in self._gold:
            self._gold[key] = self._run_gold(example)
        return self._gold[key]

    def _run_gold(self, example: Example) -> _Gold | QueryFailed:
        try:
            if example.dialect == self.backend.dialect:
                return _Gold(example.gold, example.dialect, self.backend.run(example, example.gold))
            tree = _parse_gold(example.gold, example.dialect)
            rows = self.backend.run(example, to_dialect(tree, self.backend.dialect))
            return _Gold(example.gold, example.dialect, rows, tree)
        except QueryFailed as failure:
            if failure.verdict is Verdict.GOLD_ERROR:
                return failure
            return QueryFailed(Verdict.GOLD_ERROR, f"gold query failed ({failure.verdict.value}): {failure.message}")


def _parse_gold(sql: str, dialect: str) -> exp.Expr:
    try:
        return sqlglot.parse_one(sql, read=dialect)
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, RecursionError) as error:
        raise QueryFailed(Verdict.GOLD_ERROR, f"gold query does not parse: {str(error).splitlines()[0][:200]}") from None


def _credit(gold: _Gold, rows: list[NormalRow], tree: exp.Expr | None, needs_overlap: bool) -> Credit:
    """Measure the partial-credit parts that are weighted (a tree means AST parts are)."""
    overlap = cell_overlap(gold.rows, rows) if needs_overlap else 0.0
    if tree is None:
        return Credit(result_overlap=overlap)
    return Credit(
        result_overlap=overlap,
        schema_link=overlap_f1(Counter(referenced_names(gold.tree)), Counter(referenced_names(tree))),
        ast_similarity=overlap_f1(node_bag(gold.tree), node_bag(tree)),
    )

"""Score predictions: extract, gate, execute in the sandbox, compare, reward.

Work is cached at three levels, because GRPO groups repeat completions and
datasets repeat schemas: each schema's database is built once (by the
backend), each gold query runs and parses once, and each distinct extracted
prediction is executed once per example.

The verdict is test-suite execution accuracy (:mod:`.suite`): a prediction
matches only if it returns the gold's rows on every database of the gold's
suite. It runs on the example's own database first, and a suite is built only
for a gold that some prediction matches there, so wrong answers cost one
query and no fuzzing.
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal, get_args

import sqlglot
from sqlglot import exp

from .backends import Backend, Limits, QueryFailed, make_backend, schema_key
from .compare import NormalRow, cell_overlap, overlap_f1, results_match
from .example import Example
from .extract import extract_sql
from .gate import is_ordered, node_bag, parse_query, referenced_names, to_dialect
from .reward import Credit, RewardConfig, compute_reward
from .suite import Suite, SuiteOptions, build_suite
from .suite_cache import SuiteCache
from .verdict import Verdict

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
"""SQL comments: a prediction of nothing else runs no statement, and must not earn ``executes``."""

VerdictMethod = Literal["test_suite", "single_database"]
VERDICT_METHODS: tuple[str, ...] = get_args(VerdictMethod)


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
    method: str = "test_suite"
    """The verdict that produced this score: ``test_suite`` or ``single_database``."""
    databases: int = 1
    """Databases the prediction was compared on (one for anything that did not match on the first)."""
    weak_gold: bool = False
    """The gold's suite cannot tell it apart from most of its neighbour queries: a match says little."""

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
            "method": self.method,
            "databases": self.databases,
            "weak_gold": self.weak_gold,
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
        self.suite: Suite | None = None
        """Built on the first prediction that matches on the example's own database."""
        self.suite_rows: list[tuple[Example, list[NormalRow]]] = []
        """The gold's rows on each further database of the suite that it runs on in this backend."""

    @property
    def tree(self) -> exp.Expr:
        if self._tree is None:
            self._tree = _parse_gold(self.sql, self.dialect)
        return self._tree

    def ordered(self, rows: list[NormalRow]) -> bool:
        """Whether row order is part of an answer of these rows (it cannot be for fewer than two)."""
        if len(rows) < 2 or "order" not in self.sql.lower():
            return False
        return is_ordered(self.tree)


@dataclass(frozen=True)
class _Outcome:
    """The reward-independent result of one prediction: what gets cached."""

    verdict: Verdict
    error: str | None = None
    credit: Credit = Credit()
    databases: int = 1
    weak_gold: bool = False


class Scorer:
    """Scores predictions on one backend, caching databases, gold results and outcomes.

    ``strict_gate`` parses every prediction with the static gate even where
    the SQLite sandbox alone would refuse it; otherwise a SQLite-dialect
    prediction on SQLite is parsed only when an AST-based reward part is
    weighted, which keeps parsing off the hot path.

    ``verdict`` is ``test_suite`` (the objective's) or ``single_database``
    (the example's own database only, as BIRD and most RL recipes score:
    it accepts wrong queries), ``suite`` says how suites are built, and
    ``suite_cache`` names a folder that keeps them across processes.
    """

    def __init__(
        self,
        backend: Backend | str = "sqlite",
        *,
        reward: RewardConfig | None = None,
        limits: Limits | None = None,
        strict_gate: bool = False,
        cache_size: int = 65_536,
        verdict: VerdictMethod = "test_suite",
        suite: SuiteOptions | None = None,
        suite_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if verdict not in VERDICT_METHODS:
            raise ValueError(f"unknown verdict {verdict!r}; choose from {', '.join(VERDICT_METHODS)}")
        self.backend = make_backend(backend, limits) if isinstance(backend, str) else backend
        self.reward = reward or RewardConfig()
        self.strict_gate = strict_gate
        self.verdict = verdict
        self.suite_options = suite or SuiteOptions()
        self._build_suite = SuiteCache(suite_cache).suite if suite_cache is not None else build_suite
        self.cache_size = cache_size
        self._gold: dict[tuple[str, str, str], _Gold | QueryFailed] = {}
        self._outcomes: OrderedDict[tuple, _Outcome] = OrderedDict()

    def score(self, example: Example, prediction: str, *, dialect: str = "sqlite", reward: RewardConfig | None = None) -> Score:
        """Score one raw model output; never raises for anything the model wrote."""
        config = reward or self.reward
        sql = extract_sql(prediction)
        outcome = self._outcome(example, sql, dialect, config.needs_overlap, config.needs_ast)
        value = compute_reward(outcome.verdict, outcome.credit, len(prediction), config)
        return Score(example.id, outcome.verdict, value, outcome.error, sql, self.verdict, outcome.databases, outcome.weak_gold)

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
        if not sql or not _COMMENTS.sub("", sql).strip(" \t\r\n;"):
            return _Outcome(Verdict.INVALID, "no SQL statement in the prediction (only comments or whitespace)" if sql
                            else "no SQL found in the prediction")
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
            match = _matches(gold, gold.rows, rows)
            credit = _credit(gold, rows, tree, needs_overlap)
        except QueryFailed as failure:
            return _Outcome(failure.verdict, failure.message)
        if not match or self.verdict == "single_database":
            return _Outcome(Verdict.MATCH if match else Verdict.MISMATCH, None, credit)
        return self._on_suite(example, gold, runnable, credit)

    def _on_suite(self, example: Example, gold: _Gold, runnable: str, credit: Credit) -> _Outcome:
        """A prediction that matched on the example's own database, checked on the rest of the gold's suite."""
        self._ensure_suite(example, gold)
        weak = gold.suite.weak
        total = len(gold.suite_rows) + 1
        for number, (database, gold_rows) in enumerate(gold.suite_rows, start=2):
            try:
                rows = self.backend.run(database, runnable)
            except QueryFailed as failure:
                reason = f"fails on test-suite database {number} of {total} ({failure.verdict.value}): {failure.message}"
                return _Outcome(Verdict.MISMATCH, reason, credit, number, weak)
            if not _matches(gold, gold_rows, rows):
                reason = f"result differs from the gold's on test-suite database {number} of {total}"
                return _Outcome(Verdict.MISMATCH, reason, credit, number, weak)
        return _Outcome(Verdict.MATCH, None, credit, total, weak)

    def _ensure_suite(self, example: Example, gold: _Gold) -> None:
        """Build the gold's suite once, and run the gold on each of its databases in this backend.

        A generated database on which the gold fails in this backend (an
        engine's own limits) is left out rather than counted against anyone.
        """
        if gold.suite is not None:
            return
        gold.suite = self._build_suite(example, self.suite_options, self.backend.limits)
        for database, image in zip(gold.suite.databases[1:], gold.suite.images):
            self.backend.offer_image(database, image)
        runnable = gold.sql if gold.dialect == self.backend.dialect else to_dialect(gold.tree, self.backend.dialect)
        for database in gold.suite.databases[1:]:
            with suppress(QueryFailed):
                gold.suite_rows.append((database, self.backend.run(database, runnable)))

    def suite_for(self, example: Example) -> Suite | None:
        """The example's suite (built now if need be), or None when its gold does not run."""
        gold = self._gold_for(example)
        if isinstance(gold, QueryFailed):
            return None
        self._ensure_suite(example, gold)
        return gold.suite

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


def _matches(gold: _Gold, expected: list[NormalRow], rows: list[NormalRow]) -> bool:
    """The execution-match rule: rows as a multiset, and in order when the gold's outermost query sorts.

    Equal rows in the same order, the usual match, meet both rules: they need no parse of the gold.
    """
    if expected == rows:
        return True
    return results_match(expected, rows, ordered=False) and (not gold.ordered(expected) or results_match(expected, rows, ordered=True))


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

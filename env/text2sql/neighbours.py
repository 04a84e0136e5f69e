"""Neighbour queries: the gold query with exactly one thing changed.

A neighbour is what a model that almost understood the question writes: a
comparison flipped, a constant off by a little, a condition dropped, MIN for
MAX, DISTINCT lost, the sort reversed, LIMIT off by one, an inner join made
outer, a column swapped for another of its table. A verdict is honest only if
it tells the gold apart from its neighbours, so the test suite is distilled
against them (Zhong, Yu and Klein, EMNLP 2020), and the neighbour script in
``benchmarks/`` measures how many still match.

Edits are made on the token stream, not on a parse tree: tokenizing is about
a hundred times cheaper than parsing and rendering a query, and the suite
needs dozens of neighbours per gold. An edit that yields invalid SQL is
harmless: the caller drops neighbours that do not run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot.errors import SqlglotError
from sqlglot.tokens import Token, TokenType

COMPARISONS = {TokenType.EQ: "=", TokenType.NEQ: "<>", TokenType.GT: ">", TokenType.GTE: ">=", TokenType.LT: "<", TokenType.LTE: "<="}
AGGREGATES = ("MIN", "MAX", "SUM", "AVG")
SHIFTS = (1, 3)
"""How far a numeric constant moves: by one, and by a few (both seen in model errors)."""
TEXT_VALUES_PER_LITERAL = 2
COLUMNS_PER_SWAP = 2

_CLAUSES = {
    TokenType.SELECT: "select", TokenType.FROM: "from", TokenType.JOIN: "from", TokenType.ON: "on",
    TokenType.WHERE: "where", TokenType.GROUP_BY: "group", TokenType.HAVING: "having",
    TokenType.ORDER_BY: "order", TokenType.LIMIT: "limit", TokenType.OFFSET: "offset",
    TokenType.UNION: "setop", TokenType.EXCEPT: "setop", TokenType.INTERSECT: "setop",
}
_CLAUSE_ENDS = {"where": ("group", "having", "order", "limit", "offset", "setop"), "having": ("order", "limit", "offset", "setop"),
                "order": ("limit", "offset", "setop"), "limit": ("setop",)}
_JOIN_MODIFIERS = (TokenType.INNER, TokenType.LEFT, TokenType.RIGHT, TokenType.FULL, TokenType.CROSS, TokenType.OUTER, TokenType.NATURAL)


@dataclass(frozen=True)
class Neighbour:
    """One neighbour: what was changed (``kind``) and the query text."""

    kind: str
    sql: str


@dataclass(frozen=True)
class _Tok:
    token: Token
    depth: int
    clause: str | None
    """The clause the token sits in, at its own parenthesis depth."""

    @property
    def type(self) -> TokenType:
        return self.token.token_type

    @property
    def start(self) -> int:
        return self.token.start

    @property
    def end(self) -> int:
        """One past the token's last character."""
        return self.token.end + 1


def neighbour_queries(
    sql: str,
    dialect: str = "sqlite",
    *,
    columns: Mapping[str, Sequence[str]] | None = None,
    text_values: Mapping[str, Sequence[str]] | None = None,
) -> list[Neighbour]:
    """Every one-edit neighbour of ``sql``, deduplicated, in a deterministic order.

    ``columns`` maps each table (lower-cased) to its column names, for swapped
    columns; ``text_values`` maps a column (lower-cased) to values it holds,
    for a string constant replaced by another value of its column. Without
    them those two kinds are skipped. A query that does not tokenize has no
    neighbours.
    """
    try:
        tokens = _annotate(sqlglot.tokenize(sql, read=dialect))
    except SqlglotError:
        return []
    edits = _Edits(sql, tokens, columns or {}, {k.lower(): v for k, v in (text_values or {}).items()})
    seen = {sql.strip()}
    found = []
    for kind, text in edits:
        text = text.strip()
        if text not in seen:
            seen.add(text)
            found.append(Neighbour(kind, text))
    return found


def compared_column(tokens: Sequence[Token], index: int) -> str | None:
    """The column (lower-cased) that the literal at ``index`` is compared with: ``col op literal`` or ``literal op col``."""
    for op, other in ((index - 1, index - 2), (index + 1, index + 2)):
        if 0 <= other < len(tokens) and tokens[op].token_type in COMPARISONS and _is_name(tokens[other]):
            return tokens[other].text.lower()
    return None


def _is_name(token: Token) -> bool:
    return token.token_type in (TokenType.VAR, TokenType.IDENTIFIER)


def _annotate(tokens: list[Token]) -> list[_Tok]:
    annotated, clauses, depth = [], [None], 0
    for token in tokens:
        kind = token.token_type
        if kind is TokenType.L_PAREN:
            annotated.append(_Tok(token, depth, clauses[-1]))
            depth += 1
            clauses.append(None)
            continue
        if kind is TokenType.R_PAREN:
            depth = max(0, depth - 1)
            clauses = clauses[:-1] or [None]
            annotated.append(_Tok(token, depth, clauses[-1]))
            continue
        if kind in _CLAUSES:
            clauses[-1] = _CLAUSES[kind]
        annotated.append(_Tok(token, depth, clauses[-1]))
    return annotated


class _Edits:
    """Generates (kind, text) pairs, one per single edit of the query."""

    def __init__(self, sql: str, tokens: list[_Tok], columns: Mapping[str, Sequence[str]], text_values: Mapping[str, Sequence[str]]) -> None:
        self.sql = sql
        self.tokens = tokens
        self.raw = [tok.token for tok in tokens]
        self.columns = {table.lower(): list(names) for table, names in columns.items()}
        self.text_values = text_values

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from self._comparisons()
        yield from self._constants()
        yield from self._predicates()
        yield from self._aggregates()
        yield from self._distinct()
        yield from self._ordering()
        yield from self._limits()
        yield from self._joins()
        yield from self._swapped_columns()

    def _splice(self, start: int, end: int, text: str) -> str:
        return f"{self.sql[:start]}{text}{self.sql[end:]}"

    def _comparisons(self) -> Iterator[tuple[str, str]]:
        for tok in self.tokens:
            if tok.type in COMPARISONS and tok.clause in ("where", "having"):
                own = COMPARISONS[tok.type]
                for other in COMPARISONS.values():
                    if other != own:
                        yield "comparison", self._splice(tok.start, tok.end, other)

    def _constants(self) -> Iterator[tuple[str, str]]:
        for index, tok in enumerate(self.tokens):
            if tok.clause not in ("select", "where", "having", "on"):
                continue
            if tok.type is TokenType.NUMBER:
                for shifted in _shifted(tok.token.text):
                    yield "constant", self._splice(tok.start, tok.end, shifted)
            elif tok.type is TokenType.STRING:
                column = compared_column(self.raw, index)
                values = [v for v in self.text_values.get(column or "", ()) if v != tok.token.text and "\\" not in v]
                for value in values[:TEXT_VALUES_PER_LITERAL]:
                    yield "constant", self._splice(tok.start, tok.end, "'" + value.replace("'", "''") + "'")

    def _clause_span(self, keyword: int) -> int:
        """Index one past the last token of the clause that the keyword at ``keyword`` opens."""
        head = self.tokens[keyword]
        ends = _CLAUSE_ENDS.get(head.clause or "", ())
        for index in range(keyword + 1, len(self.tokens)):
            tok = self.tokens[index]
            if tok.depth < head.depth or tok.type is TokenType.SEMICOLON:
                return index
            if tok.depth == head.depth and tok.clause in ends:
                return index
        return len(self.tokens)

    def _text_end(self, stop: int) -> int:
        return self.tokens[stop].start if stop < len(self.tokens) else len(self.sql)

    def _predicates(self) -> Iterator[tuple[str, str]]:
        """Drop the whole WHERE or HAVING, drop one of its conditions, or swap AND and OR."""
        for index, head in enumerate(self.tokens):
            if head.type not in (TokenType.WHERE, TokenType.HAVING):
                continue
            stop = self._clause_span(index)
            name = "where" if head.type is TokenType.WHERE else "having"
            yield f"drop_{name}", self._splice(head.start, self._text_end(stop), " ")
            connectors, between = [], False
            for position in range(index + 1, stop):
                tok = self.tokens[position]
                if tok.depth != head.depth:
                    continue
                if tok.type is TokenType.BETWEEN:
                    between = True
                elif tok.type in (TokenType.AND, TokenType.OR):
                    if between and tok.type is TokenType.AND:
                        between = False
                    else:
                        connectors.append(position)
            bounds = [index] + connectors + [stop]
            for part in range(len(bounds) - 1):
                if not connectors:
                    break
                if part == 0:  # the first condition goes with the connector after it
                    start, end = self.tokens[index].end, self.tokens[connectors[0]].end
                    yield "drop_condition", self._splice(start, end, " ")
                else:  # a later one goes with the connector before it
                    start, end = self.tokens[bounds[part]].start, self._text_end(bounds[part + 1])
                    yield "drop_condition", self._splice(start, end, " ")
            for position in connectors:
                tok = self.tokens[position]
                yield "connective", self._splice(tok.start, tok.end, "OR" if tok.type is TokenType.AND else "AND")

    def _aggregates(self) -> Iterator[tuple[str, str]]:
        for index, tok in enumerate(self.tokens[:-1]):
            if self.tokens[index + 1].type is not TokenType.L_PAREN:
                continue
            name = tok.token.text.upper()
            if name in AGGREGATES:
                for other in AGGREGATES:
                    if other != name:
                        yield "aggregate", self._splice(tok.start, tok.end, other)
            elif name == "COUNT" and index + 2 < len(self.tokens):
                inner = self.tokens[index + 2]
                if inner.type is TokenType.DISTINCT:
                    yield "aggregate", self._splice(inner.start, self.tokens[index + 3].start, "")
                elif inner.type is not TokenType.STAR:
                    yield "aggregate", self._splice(inner.start, inner.start, "DISTINCT ")

    def _distinct(self) -> Iterator[tuple[str, str]]:
        for index, tok in enumerate(self.tokens[:-1]):
            if tok.type is not TokenType.SELECT:
                continue
            after = self.tokens[index + 1]
            if after.type is TokenType.DISTINCT:
                yield "distinct", self._splice(tok.end, self._text_end(index + 2), " ")
            else:
                yield "distinct", self._splice(tok.end, tok.end, " DISTINCT")

    def _ordering(self) -> Iterator[tuple[str, str]]:
        """Each sort key reversed, and the whole ORDER BY dropped."""
        for index, head in enumerate(self.tokens):
            if head.type is not TokenType.ORDER_BY:
                continue
            stop = self._clause_span(index)
            yield "drop_order", self._splice(head.start, self._text_end(stop), " ")
            commas = [p for p in range(index + 1, stop) if self.tokens[p].depth == head.depth and self.tokens[p].type is TokenType.COMMA]
            for last in [p - 1 for p in commas] + [stop - 1]:
                tok = self.tokens[last]
                if tok.type is TokenType.DESC:
                    yield "order_direction", self._splice(tok.start, tok.end, "ASC")
                elif tok.type is TokenType.ASC:
                    yield "order_direction", self._splice(tok.start, tok.end, "DESC")
                else:
                    yield "order_direction", self._splice(tok.end, tok.end, " DESC")

    def _limits(self) -> Iterator[tuple[str, str]]:
        for index, head in enumerate(self.tokens[:-1]):
            count = self.tokens[index + 1]
            if head.type is not TokenType.LIMIT or count.type is not TokenType.NUMBER or not count.token.text.isdigit():
                continue
            value = int(count.token.text)
            for other in (value - 1, value + 1):
                if other >= 1:
                    yield "limit", self._splice(count.start, count.end, str(other))
            yield "drop_limit", self._splice(head.start, self._text_end(self._clause_span(index)), " ")

    def _joins(self) -> Iterator[tuple[str, str]]:
        """An inner join made LEFT, and an outer one made inner."""
        for index, tok in enumerate(self.tokens):
            if tok.type is not TokenType.JOIN:
                continue
            first = index
            while first > 0 and self.tokens[first - 1].type in _JOIN_MODIFIERS:
                first -= 1
            modifiers = {t.type for t in self.tokens[first:index]}
            if modifiers & {TokenType.CROSS, TokenType.NATURAL, TokenType.RIGHT, TokenType.FULL}:
                continue
            replacement = "JOIN" if TokenType.LEFT in modifiers else "LEFT JOIN"
            yield "join", self._splice(self.tokens[first].start, tok.end, replacement)

    def _swapped_columns(self) -> Iterator[tuple[str, str]]:
        """A projected or compared column replaced by another column of a table that has it."""
        if not self.columns:
            return
        for index, tok in enumerate(self.tokens):
            if tok.type not in (TokenType.VAR, TokenType.IDENTIFIER) or tok.clause not in ("select", "where", "having"):
                continue
            after = self.tokens[index + 1].type if index + 1 < len(self.tokens) else None
            before = self.tokens[index - 1].type if index else None
            if after in (TokenType.L_PAREN, TokenType.DOT) or before is TokenType.ALIAS:
                continue
            name = tok.token.text.lower()
            owners = [names for names in self.columns.values() if name in (n.lower() for n in names)]
            if not owners:
                continue
            others = [n for n in owners[0] if n.lower() != name][:COLUMNS_PER_SWAP]
            for other in others:
                yield "column", self._splice(tok.start, tok.end, other)


def _shifted(text: str) -> list[str]:
    """A numeric literal moved by each of :data:`SHIFTS`, down and up, in the literal's own kind."""
    if text.isdigit():
        value = int(text)
        return [str(value + sign * shift) for shift in SHIFTS for sign in (-1, 1) if value + sign * shift >= 0]
    try:
        value = float(text)
    except ValueError:
        return []
    return [repr(round(value + sign * shift, 9)) for shift in SHIFTS for sign in (-1, 1) if value + sign * shift >= 0]

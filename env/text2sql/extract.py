"""Find the SQL in raw model text.

Models wrap their answer in reasoning, chat-turn markers, Markdown fences and
prose. Extraction is deliberately lenient about the wrapping and strict about
the content: it never drops a statement that follows the first one, so a
stacked ``SELECT 1; DROP TABLE t`` still reaches the sandbox and is refused
there rather than being silently "repaired" into a match.
"""

from __future__ import annotations

import re

_THINK = re.compile(r"<think(?:ing)?>.*?(?:</think(?:ing)?>|\Z)", re.DOTALL | re.IGNORECASE)
_TURN_END = re.compile(r"<end_of_turn>|<eos>|<\|im_end\|>|<\|endoftext\|>")
_TURN_START = re.compile(r"<start_of_turn>\s*(?:model|assistant)?\s*|<bos>")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_SQL_START = re.compile(r"(?im)(?:^|(?<=:)|(?<=:\s))[ \t(]*(SELECT|WITH)\b")
_SQL_FENCE_LABELS = {"sql", "sqlite", "postgres", "postgresql", "mysql", ""}


def extract_sql(text: str) -> str:
    """Return the SQL query in ``text``, or "" when there is none.

    Order of rules: drop ``<think>`` sections; keep the model's turn up to its
    end marker; prefer a fenced block (an ``sql``-labelled one first); else
    start at the first line that begins a query and stop at the first blank
    line. Trailing semicolons and whitespace are removed.
    """
    if "<" in text:
        text = _THINK.sub("", text)
        turn_end = _TURN_END.search(text)
        if turn_end and text[: turn_end.start()].strip():
            text = text[: turn_end.start()]
        text = _TURN_END.sub("", _TURN_START.sub("", text))

    fenced = [(label.lower(), body) for label, body in _FENCE.findall(text)] if "```" in text else []
    if fenced:
        sql_blocks = [body for label, body in fenced if label in _SQL_FENCE_LABELS]
        candidate = sql_blocks[0] if sql_blocks else fenced[0][1]
    else:
        start = _SQL_START.search(text)
        candidate = text[start.start(1) - _open_parens_before(text, start.start(1)) :] if start else text
        if start:
            candidate = re.split(r"\n[ \t]*\n", candidate, maxsplit=1)[0]
    return candidate.strip().rstrip(";").rstrip()


def _open_parens_before(text: str, index: int) -> int:
    """How many "(" directly precede ``index`` (so "(SELECT ...)" keeps its paren)."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "(":
        count += 1
    return count

"""The prompt a policy model sees for one example.

The model gets the tables' CREATE statements, never the rows: a schema
script's INSERTs can be far longer than the question and would teach the
model to read answers off the data instead of writing a query.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .example import Example

_DIALECT_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mysql": "MySQL", "duckdb": "DuckDB", "tsql": "T-SQL"}

# Quoted strings and identifiers, comments, and statement ends: a semicolon counts only outside the others.
_LEXEMES = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|--[^\n]*|/\*.*?\*/|;""", re.DOTALL)
_CREATE = re.compile(
    r"(?:\s+|--[^\n]*|/\*.*?\*/)*CREATE\s+(?:TEMP(?:ORARY)?\s+)?(?:TABLE|VIEW)\b", re.DOTALL | re.IGNORECASE
)


def create_statements(script: str) -> list[str]:
    """The CREATE TABLE and CREATE VIEW statements of a schema script, in order, without the data.

    Splits on semicolons outside quotes and comments, so a ``';'`` inside an
    inserted value does not cut a statement.
    """
    statements, start = [], 0
    for lexeme in _LEXEMES.finditer(script):
        if lexeme.group() == ";":
            statements.append(script[start : lexeme.start()])
            start = lexeme.end()
    statements.append(script[start:])
    return [statement.strip() for statement in statements if _CREATE.match(statement)]


@lru_cache(maxsize=256)
def _ddl(schema: str) -> str:
    return "\n\n".join(f"{statement};" for statement in create_statements(schema))


def prompt_message(example: Example) -> str:
    """The user turn: the tables, the question, and how to answer."""
    dialect = _DIALECT_NAMES.get(example.dialect, example.dialect)
    return (
        f"Here is a {dialect} database schema:\n\n{_ddl(example.schema)}\n\n"
        f"Question: {example.question}\n\n"
        f"Write one {dialect} query that answers the question. Reply with the query in a ```sql code block."
    )


def format_prompt(example: Example, tokenizer: Any = None) -> str:
    """The full prompt text: the tokenizer's chat template if it has one, else Gemma's turn format.

    ``tokenizer`` is any object with ``chat_template`` and
    ``apply_chat_template`` (a Hugging Face tokenizer), so this module needs
    no ``transformers`` import.
    """
    message = prompt_message(example)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return f"<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"

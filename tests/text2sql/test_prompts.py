"""Prompts: the tables without their rows, the question, and the chat format."""

from __future__ import annotations

import re

import pytest

from env.text2sql.data import generate
from env.text2sql.example import Example
from env.text2sql.prompts import create_statements, format_prompt, prompt_message

SCRIPT = """-- a toy library
CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
create table books (
  id INTEGER PRIMARY KEY,
  title TEXT NOT NULL, -- the title; may hold ';'
  author_id INTEGER REFERENCES authors (id)
);
INSERT INTO authors (id, name) VALUES (1, 'O''Brien; Jr.'), (2, 'CREATE TABLE x');
/* a view; with a semicolon */
CREATE VIEW long_books AS SELECT * FROM books;
INSERT INTO books VALUES (1, 'A;B', 1)
"""

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture()
def example():
    return Example(id="x", question="Which books did O'Brien write?", schema=SCRIPT, gold="SELECT 1")


def test_create_statements_skip_data_and_respect_quotes_and_comments():
    statements = create_statements(SCRIPT)
    names = [re.search(r"(?:TABLE|VIEW)\s+(\w+)", statement, re.IGNORECASE).group(1) for statement in statements]
    assert names == ["authors", "books", "long_books"]
    assert "may hold ';'" in statements[1]
    assert all("INSERT" not in statement for statement in statements)


def test_plain_prompt_is_gemma_turns(example):
    prompt = format_prompt(example)
    assert prompt.startswith("<start_of_turn>user\nHere is a SQLite database schema:")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert "Question: Which books did O'Brien write?" in prompt
    assert "CREATE TABLE authors" in prompt and "CREATE VIEW long_books" in prompt
    assert "INSERT" not in prompt and "O''Brien; Jr." not in prompt
    assert "one SQLite query" in prompt and "```sql" in prompt


def test_prompt_names_the_example_dialect():
    example = Example(id="p", question="q", schema="CREATE TABLE t (a INT)", gold="SELECT a FROM t", dialect="postgres")
    assert "one PostgreSQL query" in prompt_message(example)


def test_generated_schema_prompt_holds_every_table_and_no_rows():
    example = generate(1, 0, seed=0)[0][0]
    message = prompt_message(example)
    assert message.count("CREATE TABLE") == example.schema.count("CREATE TABLE") >= 2
    assert "VALUES" not in message


class _FakeTokenizer:
    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "templated"


def test_tokenizer_chat_template_is_used(example):
    tokenizer = _FakeTokenizer()
    assert format_prompt(example, tokenizer) == "templated"
    assert tokenizer.calls == [([{"role": "user", "content": prompt_message(example)}], False, True)]


def test_tokenizer_without_chat_template_falls_back_to_gemma(example):
    tokenizer = _FakeTokenizer()
    tokenizer.chat_template = None
    assert format_prompt(example, tokenizer) == format_prompt(example)
    assert tokenizer.calls == []


def test_real_tokenizer_with_gemma_template_matches_plain_prompt(example):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocabulary = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", chat_template=GEMMA_TEMPLATE
    )
    assert format_prompt(example, tokenizer) == "<bos>" + format_prompt(example)

import pytest

from env.text2sql.extract import extract_sql


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```sql\nSELECT 1;\n```", "SELECT 1"),
        ("Here is the query:\n```sql\nSELECT a FROM t\n```\nIt returns a.", "SELECT a FROM t"),
        ("```python\nprint(1)\n```\n```sql\nSELECT 2\n```", "SELECT 2"),
        ("```\nSELECT 3\n```", "SELECT 3"),
        ("```sql\nSELECT 4", "SELECT 4"),
        ("<think>maybe SELECT wrong FROM x</think>\nSELECT right FROM t;", "SELECT right FROM t"),
        ("<think>never finishes SELECT 1", ""),
        ("<start_of_turn>model\nSELECT x FROM y<end_of_turn>\n<start_of_turn>user\nthanks", "SELECT x FROM y"),
        ("SELECT z FROM w<eos>", "SELECT z FROM w"),
        ("The answer is: SELECT * FROM t\n\nThis selects every row.", "SELECT * FROM t"),
        ("Sure.\nWITH c AS (SELECT 1) SELECT * FROM c", "WITH c AS (SELECT 1) SELECT * FROM c"),
        ("Sure.\n(SELECT 1) UNION (SELECT 2)", "(SELECT 1) UNION (SELECT 2)"),
        ("  select 1 ;;  ", "select 1"),
        ("", ""),
    ],
)
def test_extracts_the_query(text, expected):
    assert extract_sql(text) == expected


def test_keeps_stacked_statements_so_the_sandbox_refuses_them():
    assert extract_sql("SELECT 1; DROP TABLE t") == "SELECT 1; DROP TABLE t"


def test_non_query_text_is_passed_through_to_be_judged():
    assert extract_sql("DROP TABLE t;") == "DROP TABLE t"

import json
import subprocess
import sys

import pytest

from .cases import CORRECT, SCHEMA


def run_score(tmp_path, lines, *args):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "env.text2sql", "score", str(source), *args], capture_output=True, text=True, timeout=120
    )
    return done, [json.loads(line) for line in done.stdout.splitlines()]


def row(id, prediction, **extra):
    return json.dumps({"id": id, "schema": SCHEMA, "gold": CORRECT, "prediction": prediction, **extra})


def test_one_record_per_line_in_order_and_bad_lines_do_not_stop_the_run(tmp_path):
    lines = [
        row("good", f"```sql\n{CORRECT}\n```"),
        "{not json",
        json.dumps({"id": "partial", "schema": SCHEMA}),
        row("tsql", "SELECT [name] FROM [employees] WHERE salary > 90 ORDER BY [name]", dialect="tsql"),
        "",
        row("evil", "DROP TABLE employees"),
        json.dumps(["a", "list"]),
        json.dumps({"id": 7, "schema": SCHEMA, "gold": CORRECT, "prediction": 3}),
        row("still-good", CORRECT),
    ]
    done, records = run_score(tmp_path, lines)
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in records] == ["good", None, "partial", "tsql", None, "evil", None, 7, "still-good"]
    assert [r["verdict"] for r in records] == [
        "match", "invalid_input", "invalid_input", "match", "invalid_input", "forbidden", "invalid_input", "invalid_input", "match",
    ]
    for record in records:
        assert set(record) == {"id", "verdict", "execution_match", "reward", "error", "method", "databases", "weak_gold"}
    assert records[0]["method"] == "test_suite" and records[0]["databases"] > 1
    assert "line 2" in records[1]["error"] and "line 3: missing key(s) gold, prediction" in records[2]["error"]
    assert records[5]["reward"] < 0 and records[0]["reward"] > 1
    assert "scored 9 line(s)" in done.stderr


def test_in_process_and_custom_reward(tmp_path):
    reward = tmp_path / "reward.json"
    reward.write_text(json.dumps({"execution_match": 2.0, "executes": 0.0}))
    done, records = run_score(tmp_path, [row("a", CORRECT)], "--workers", "0", "--reward", str(reward))
    assert done.returncode == 0, done.stderr
    assert records[0]["reward"] == 2.0


def test_bad_arguments_get_one_clear_line_not_a_traceback(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "env.text2sql", "score", str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr
    bad_reward = tmp_path / "r.json"
    bad_reward.write_text('{"error_penalty": 9}')
    done, _ = run_score(tmp_path, [row("a", CORRECT)], "--reward", str(bad_reward))
    assert done.returncode == 2 and "error_penalty" in done.stderr and "Traceback" not in done.stderr


def test_lines_end_only_at_newlines_and_crlf_files_read_the_same(tmp_path):
    # U+2028 and U+0085 are legal inside a JSON string; they do not end a line.
    prediction = f"```sql\n{CORRECT}\n```\nthat\u2028is\x85all"
    odd = json.dumps({"id": "odd", "schema": SCHEMA, "gold": CORRECT, "prediction": prediction}, ensure_ascii=False)
    source = tmp_path / "in.jsonl"
    source.write_bytes("\r\n".join([row("a", CORRECT), odd, row("b", "SELECT nope")]).encode("utf-8") + b"\r\n")
    command = [sys.executable, "-m", "env.text2sql", "score", str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.split("\n")[:-1]]
    assert [(r["id"], r["verdict"]) for r in records] == [("a", "match"), ("odd", "match"), ("b", "runtime_error")]


def test_lines_of_one_example_share_their_strings_and_example():
    from env.text2sql.cli import _parse_line

    shared: dict = {}
    first, second = (_parse_line(row("x", p), n, shared) for n, p in ((1, CORRECT), (2, "SELECT 1")))
    other = _parse_line(row("y", CORRECT), 3, shared)
    assert first.example is second.example and first.prediction != second.prediction
    assert other.example is not first.example and other.example.schema is first.example.schema
    assert _parse_line(row("x", CORRECT), 4).example == first.example  # the same without sharing


def test_lines_are_read_as_json_reads_them_even_where_orjson_reads_numbers_otherwise():
    from env.text2sql.cli import _load_json

    lines = ['{"id": 123456789012345678901234567890, "question": -9223372036854775809}', '{"id": 1e400}', '{"id": NaN}',
             '{"id": "\\ud800"}', '123456789012345678901234567890', '{"id": [18446744073709551616]}', '{"id": 7, "id": "x"}']
    for line in lines:
        assert repr(_load_json(line)) == repr(json.loads(line)), line
    for line in ('{"id": 1', '{"id": 1}}', '[1,]', '\ufeff{}'):
        assert _decode_error(_load_json, line) == _decode_error(json.loads, line), line


def _decode_error(load, line):
    with pytest.raises(json.JSONDecodeError) as caught:
        load(line)
    return caught.value.msg, caught.value.colno


def test_weak_golds_are_reported_in_the_summary(tmp_path):
    lonely = "CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);"
    line = json.dumps({"id": "lonely", "schema": lonely, "gold": "SELECT DISTINCT id FROM t", "prediction": "SELECT id FROM t"})
    done, records = run_score(tmp_path, [line, row("fine", CORRECT)])
    assert done.returncode == 0, done.stderr
    assert [r["weak_gold"] for r in records] == [True, False]
    assert "1 line(s) have a weak gold" in done.stderr and "lonely" in done.stderr

"""Loaders: field mapping for each format, layout detection, and errors that point at the bad row."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from env.text2sql.data import from_gretel_rows, load, load_hf, load_jsonl, load_parquet, load_spider
from env.text2sql.example import Example

GRETEL_ROW = {
    "id": 5097,
    "domain": "forestry",
    "sql_prompt": "What is the total volume of timber sold by each salesperson?",
    "sql_context": "CREATE TABLE salesperson (salesperson_id INT, name TEXT); INSERT INTO salesperson VALUES (1, 'John Doe');",
    "sql": "SELECT name FROM salesperson",
    "sql_complexity": "single join",
}
OUR_ROW = {"id": "ex-1", "question": "How many?", "schema": "CREATE TABLE t (a INTEGER);", "gold": "SELECT COUNT(*) FROM t"}


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(f"{row}\n" if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return path


def _sqlite_file(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    connection.executescript(script)
    connection.close()
    return path


def test_from_gretel_rows_maps_fields():
    second = {key: value for key, value in GRETEL_ROW.items() if key not in ("id", "domain")}
    first, other = from_gretel_rows([GRETEL_ROW, second], dialect="mysql")
    assert first == Example(
        id="5097",
        question=GRETEL_ROW["sql_prompt"],
        schema=GRETEL_ROW["sql_context"],
        gold=GRETEL_ROW["sql"],
        dialect="mysql",
        domain="forestry",
    )
    assert (other.id, other.domain) == ("gretel-2", "")


def test_from_gretel_rows_names_the_row_and_field():
    bad = {key: value for key, value in GRETEL_ROW.items() if key != "sql"}
    with pytest.raises(ValueError, match=r"row 2: missing field\(s\) 'sql'"):
        from_gretel_rows([GRETEL_ROW, bad])


def test_load_jsonl_detects_the_shape_of_each_row(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [OUR_ROW, "", {**OUR_ROW, "id": 7, "dialect": "postgres"}, GRETEL_ROW])
    ours, numbered, gretel = load_jsonl(path)
    assert ours == Example(**OUR_ROW)
    assert (numbered.id, numbered.dialect) == ("7", "postgres")
    assert (gretel.id, gretel.gold, gretel.dialect) == ("5097", "SELECT name FROM salesperson", "sqlite")


def test_load_jsonl_errors_name_file_line_and_field(tmp_path):
    missing = {key: value for key, value in OUR_ROW.items() if key != "gold"}
    path = _write_jsonl(tmp_path / "bad.jsonl", [OUR_ROW, "", missing])
    with pytest.raises(ValueError, match=rf"{path}:3: missing field\(s\) 'gold'"):
        load_jsonl(path)
    path = _write_jsonl(tmp_path / "broken.jsonl", [OUR_ROW, "{not json"])
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        load_jsonl(path)
    path = _write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(ValueError, match=rf"{path}:1: expected an object"):
        load_jsonl(path)


def test_load_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "rows.parquet"
    rows = [{**OUR_ROW, "id": "ex-2", "database": "/data/t.sqlite", "domain": "toy"}, OUR_ROW]
    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    first, second = load_parquet(path)
    assert (first.database, first.domain) == ("/data/t.sqlite", "toy")
    assert second == Example(**OUR_ROW)  # the null cells Parquet gives absent keys take the defaults

    gretel_path = tmp_path / "gretel.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([GRETEL_ROW]), gretel_path)
    assert load_parquet(gretel_path, dialect="mysql")[0].dialect == "mysql"

    bad = tmp_path / "bad.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([OUR_ROW, {**OUR_ROW, "schema": None}]), bad)
    with pytest.raises(ValueError, match=rf"{bad}: row 2: missing field\(s\) 'schema'"):
        load_parquet(bad)


@pytest.fixture()
def spider(tmp_path) -> Path:
    folder = tmp_path / "spider"
    _sqlite_file(
        folder / "database" / "concert_singer" / "concert_singer.sqlite",
        "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT);"
        "CREATE TABLE concert (concert_id INTEGER PRIMARY KEY, singer_id INTEGER REFERENCES singer (singer_id));"
        "CREATE INDEX singer_name ON singer (name);"
        "INSERT INTO singer VALUES (1, 'Joe', 'France');",
    )
    entries = [
        {"db_id": "concert_singer", "question": "How many singers are there?", "query": "SELECT count(*) FROM singer"},
        {"db_id": "concert_singer", "question": "List names.", "query": "SELECT name FROM singer"},
    ]
    (folder / "dev.json").write_text(json.dumps(entries))
    return folder


def test_load_spider(spider):
    first, second = load_spider(spider)
    database = spider / "database" / "concert_singer" / "concert_singer.sqlite"
    assert first.id == "concert_singer-0000" and second.id == "concert_singer-0001"
    assert (first.question, first.gold) == ("How many singers are there?", "SELECT count(*) FROM singer")
    assert (first.database, first.domain, first.dialect) == (str(database), "concert_singer", "sqlite")
    assert first.schema.count("CREATE TABLE") == 2 and "INSERT" not in first.schema and "INDEX" not in first.schema
    assert first.schema is second.schema
    connection = sqlite3.connect(":memory:")
    connection.executescript(first.schema)  # the DDL is a runnable script


def test_load_bird_appends_evidence(tmp_path):
    folder = tmp_path / "bird"
    _sqlite_file(folder / "dev_databases" / "schools" / "schools.sqlite", "CREATE TABLE frpm (cds TEXT, enrollment INTEGER);")
    entries = [
        {
            "question_id": 0,
            "db_id": "schools",
            "question": "What is the highest enrollment?",
            "evidence": "Enrollment refers to `enrollment`",
            "SQL": "SELECT MAX(enrollment) FROM frpm",
        }
    ]
    (folder / "dev.json").write_text(json.dumps(entries))
    (example,) = load_spider(folder)
    assert example.question == "What is the highest enrollment?\nHint: Enrollment refers to `enrollment`"
    assert example.gold == "SELECT MAX(enrollment) FROM frpm"
    assert example.database == str(folder / "dev_databases" / "schools" / "schools.sqlite")


def test_load_spider_errors(spider, tmp_path):
    with pytest.raises(FileNotFoundError, match="no database"):
        load_spider(tmp_path)
    (spider / "bad.json").write_text(json.dumps([{"db_id": "concert_singer", "question": "q"}]))
    with pytest.raises(ValueError, match=r"bad.json: entry 0: missing field 'query' \(Spider\) or 'SQL' \(BIRD\)"):
        load_spider(spider, "bad.json")
    (spider / "gone.json").write_text(json.dumps([{"db_id": "nowhere", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(FileNotFoundError, match="nowhere.sqlite"):
        load_spider(spider, "gone.json")


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> str:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return str(tmp_path / "hf-cache")


def test_load_hf_on_local_json_and_parquet(tmp_path, hf_cache):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    json_path = _write_jsonl(tmp_path / "gretel.jsonl", [GRETEL_ROW])
    (example,) = load_hf("json", data_files=str(json_path), cache_dir=hf_cache)
    assert (example.id, example.question, example.domain) == ("5097", GRETEL_ROW["sql_prompt"], "forestry")

    parquet_path = tmp_path / "ours.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([OUR_ROW]), parquet_path)
    assert load_hf("parquet", data_files=str(parquet_path), cache_dir=hf_cache) == [Example(**OUR_ROW)]


def test_load_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"autoresearch\[data\]"):
        load_hf("gretelai/synthetic_text_to_sql")


def test_load_dispatches_on_the_source(tmp_path, spider, hf_cache):
    train = load("synthetic", n_train=30, n_eval=10, seed=1)
    held_out = load("synthetic", split="eval", n_train=30, n_eval=10, seed=1)
    assert (len(train), len(held_out)) == (30, 10)
    with pytest.raises(ValueError, match="splits"):
        load("synthetic", split="test", n_train=1, n_eval=1)

    jsonl = _write_jsonl(tmp_path / "rows.jsonl", [OUR_ROW])
    assert load(str(jsonl)) == [Example(**OUR_ROW)]
    assert load(spider)[0].domain == "concert_singer"
    (spider / "train.json").write_text(json.dumps([{"db_id": "concert_singer", "question": "q", "query": "SELECT 1"}]))
    assert load(spider, split="train")[0].gold == "SELECT 1"
    assert load("json", data_files=str(jsonl), cache_dir=hf_cache) == [Example(**OUR_ROW)]

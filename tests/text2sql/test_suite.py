"""Test suites: wrong queries that agree on one database are caught; equivalent ones still match."""

import random
import sqlite3

import pytest
import sqlglot
from sqlglot import exp

from env.text2sql import Example, Limits, RewardConfig, Scorer, Submission, SuiteOptions, Verdict, build_suite, score_batch
from env.text2sql.backends import QueryFailed, SQLiteBackend
from env.text2sql.data import generate
from env.text2sql.suite import example_neighbours

from .cases import CORRECT, example

KEYED = """
CREATE TABLE teams (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, city TEXT);
INSERT INTO teams VALUES (1, 'Owls', 'Oslo'), (2, 'Larks', NULL), (3, 'Crows', 'Rome');
CREATE TABLE players (id INTEGER PRIMARY KEY, team_id INTEGER NOT NULL REFERENCES teams (id), name TEXT NOT NULL,
                      goals INTEGER NOT NULL, rating REAL NOT NULL);
INSERT INTO players VALUES (1, 1, 'Ana', 5, 7.5), (2, 1, 'Bo', 9, 8.0), (3, 2, 'Cy', 2, 6.25), (4, 3, 'Di', 9, 9.5);
"""


def keyed(gold: str) -> Example:
    return Example(id="keyed", question="", schema=KEYED, gold=gold)


@pytest.fixture(scope="module")
def scorer():
    with Scorer() as scorer:
        yield scorer


def test_a_wrong_query_that_agrees_on_the_own_database_is_a_mismatch(scorer):
    wrong = "SELECT name FROM employees WHERE salary >= 99 ORDER BY name"  # the same two rows here
    with Scorer(verdict="single_database") as single:
        assert single.score(example(), wrong).verdict is Verdict.MATCH
        assert single.score(example(), wrong).method == "single_database"
    result = scorer.score(example(), wrong)
    assert result.verdict is Verdict.MISMATCH and result.method == "test_suite"
    assert "test-suite database" in result.error
    assert result.reward == pytest.approx(RewardConfig().executes)  # it ran: executes, never execution_match


def test_the_suite_is_deterministic_and_keeps_the_options():
    first, second = build_suite(example()), build_suite(example())
    assert [db.schema for db in first.databases] == [db.schema for db in second.databases]
    assert first.databases[0] == example() and len(first.databases) == SuiteOptions().size
    assert len(build_suite(example(), SuiteOptions(size=2)).databases) == 2
    assert build_suite(example(), SuiteOptions(size=1)).databases == (example(),)
    other_seed = build_suite(example(), SuiteOptions(seed=1))
    assert [db.schema for db in other_seed.databases] != [db.schema for db in first.databases]


def test_generated_databases_keep_keys_types_and_foreign_keys():
    for gold in ("SELECT t.name FROM teams AS t JOIN players AS p ON p.team_id = t.id WHERE p.goals > 4",
                 "SELECT name FROM players WHERE rating < 8.0 AND team_id = 1"):
        suite = build_suite(keyed(gold))
        assert len(suite.databases) == SuiteOptions().size
        for database in suite.databases[1:]:
            connection = sqlite3.connect(":memory:")
            connection.execute("PRAGMA foreign_keys = ON")
            connection.executescript(database.schema)  # PK, UNIQUE, NOT NULL and FK are enforced while it builds
            assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
            assert {type(v) for (v,) in connection.execute("SELECT goals FROM players")} == {int}
            assert {type(v) for (v,) in connection.execute("SELECT rating FROM players")} == {float}
            assert connection.execute("SELECT count(*) FROM players WHERE name IS NULL").fetchone() == (0,)


def test_the_gold_and_its_neighbours_boundaries_get_rows():
    """Values come from the gold's constants and their neighbours, so a shifted constant is told apart."""
    gold = "SELECT name FROM players WHERE goals > 4"
    suite = build_suite(keyed(gold))
    goals = set()
    for database in suite.databases[1:]:
        connection = sqlite3.connect(":memory:")
        connection.executescript(database.schema)
        goals |= {v for (v,) in connection.execute("SELECT goals FROM players")}
    assert goals & {4, 5}
    assert suite.undistinguished == ()


EQUIVALENT = [
    ("SELECT name FROM players WHERE goals > 4", "SELECT p.name FROM players AS p WHERE p.goals >= 5"),
    ("SELECT name FROM players WHERE goals > 4", "SELECT name FROM players WHERE NOT goals <= 4"),
    ("SELECT name, goals FROM players WHERE rating > 7", "SELECT goals, name FROM players WHERE 7 < rating"),
    ("SELECT name FROM players WHERE goals BETWEEN 3 AND 9", "SELECT name FROM players WHERE goals >= 3 AND goals <= 9"),
    ("SELECT name FROM players WHERE team_id IN (SELECT id FROM teams WHERE name = 'Owls')",
     "SELECT p.name FROM players AS p JOIN teams AS t ON t.id = p.team_id WHERE t.name = 'Owls'"),
    ("SELECT name FROM teams WHERE id IN (SELECT team_id FROM players)",
     "SELECT t.name FROM teams AS t WHERE EXISTS (SELECT 1 FROM players AS p WHERE p.team_id = t.id)"),
    ("SELECT COUNT(*) FROM players", "SELECT COUNT(id) FROM players"),
    ("SELECT name FROM players ORDER BY rating DESC, id", "SELECT name FROM players ORDER BY 0 - rating, id ASC"),
    ("SELECT t.name, COUNT(*) FROM teams AS t JOIN players AS p ON p.team_id = t.id GROUP BY t.id, t.name",
     "SELECT COUNT(p.id), t.name FROM players p JOIN teams t ON p.team_id = t.id GROUP BY t.name"),
    ("SELECT MAX(goals) FROM players", "SELECT goals FROM players ORDER BY goals DESC LIMIT 1"),
    ("SELECT city FROM teams WHERE city IS NOT NULL", "SELECT city FROM teams WHERE city = city"),
]


@pytest.mark.parametrize(("gold", "rewrite"), EQUIVALENT)
def test_equivalent_rewrites_still_match(scorer, gold, rewrite):
    result = scorer.score(keyed(gold), rewrite)
    assert result.verdict is Verdict.MATCH, result
    assert result.databases == SuiteOptions().size


def _rewrites(example: Example) -> list[str]:
    """Equivalent forms of a generated gold: every identifier quoted and pretty-printed, and ``> n`` as ``>= n + 1``."""
    tree = sqlglot.parse_one(example.gold, read="sqlite")
    forms = [tree.sql(dialect="sqlite", identify=True, pretty=True)]
    strict = tree.copy()
    changed = False
    for node in list(strict.find_all(exp.GT)):
        literal, column = node.expression, node.this
        if (isinstance(literal, exp.Literal) and literal.this.isdigit() and isinstance(column, exp.Column)
                and column.name in _integer_columns(example.schema)):
            node.replace(exp.GTE(this=column.copy(), expression=exp.Literal.number(int(literal.this) + 1)))
            changed = True
    if changed:
        forms.append(strict.sql(dialect="sqlite"))
    return forms


def _integer_columns(schema: str) -> set[str]:
    connection = sqlite3.connect(":memory:")
    connection.executescript(schema)
    tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {row[1] for table in tables for row in connection.execute(f"PRAGMA table_info({table})") if "INT" in row[2].upper()}


def test_equivalent_forms_of_generated_golds_match_on_the_whole_suite():
    _, held_out = generate(0, 120, seed=3)
    submissions = [Submission(example, form) for example in held_out for form in _rewrites(example)]
    assert any(">=" in s.prediction and ">=" not in s.example.gold for s in submissions)
    results = score_batch(submissions)
    wrong = [(s.example.gold, s.prediction) for s, r in zip(submissions, results) if r.verdict is not Verdict.MATCH]
    assert wrong == []


def test_neighbours_of_the_verdict_cases_do_not_match(scorer):
    golds = [example(), example(gold="SELECT dept, COUNT(*) FROM employees GROUP BY dept"),
             example(gold="SELECT name FROM employees WHERE salary > (SELECT AVG(salary) FROM employees) ORDER BY salary DESC"),
             keyed("SELECT t.name FROM teams AS t JOIN players AS p ON p.team_id = t.id WHERE p.goals > 4 AND p.rating < 9")]
    matched = []
    counted = 0
    for gold in golds:
        for neighbour in example_neighbours(gold):
            if neighbour.kind in ("distinct", "join"):  # often the same query under the schema's keys
                continue
            counted += 1
            if scorer.score(gold, neighbour.sql).execution_match:
                matched.append((gold.gold, neighbour.sql))
    assert counted > 60
    assert matched == []


def test_a_gold_its_suite_cannot_tell_from_its_neighbours_is_reported_weak(scorer):
    lonely = Example(id="w", question="", schema="CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);",
                     gold="SELECT DISTINCT id FROM t")
    suite = build_suite(lonely)
    assert suite.neighbours >= 1 and suite.weak
    assert scorer.score(lonely, "SELECT id FROM t").weak_gold
    assert not scorer.score(example(), CORRECT).weak_gold


def test_suites_work_for_database_files_and_other_dialects(tmp_path, scorer):
    path = tmp_path / "league.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(KEYED)
    connection.commit()
    connection.close()
    ddl = "CREATE TABLE players (id INTEGER PRIMARY KEY, team_id INTEGER, name TEXT, goals INTEGER, rating REAL);"
    on_file = Example(id="f", question="", schema=ddl, gold="SELECT name FROM players WHERE goals > 4", database=str(path))
    assert scorer.score(on_file, "SELECT name FROM players WHERE goals > 4").verdict is Verdict.MATCH
    assert scorer.score(on_file, "SELECT name FROM players WHERE goals >= 5.5").verdict is Verdict.MISMATCH
    assert len(build_suite(on_file).databases) == SuiteOptions().size
    mysql = Example(id="m", question="", dialect="mysql", gold="SELECT `name` FROM `players` WHERE `goals` > 4",
                    schema="CREATE TABLE `players` (`id` INT PRIMARY KEY, `name` VARCHAR(20), `goals` INT);"
                           "INSERT INTO `players` VALUES (1, 'Ana', 5), (2, 'Bo', 9), (3, 'Cy', 2);")
    assert scorer.score(mysql, "SELECT name FROM players WHERE goals > 4").verdict is Verdict.MATCH
    assert scorer.score(mysql, "SELECT name FROM players WHERE goals >= 5").verdict is Verdict.MATCH  # INT: the same query
    assert scorer.score(mysql, "SELECT name FROM players WHERE goals > 3").verdict is Verdict.MISMATCH


@pytest.mark.parametrize("text", ["-- just a comment", "/* nothing */", "```sql\n;\n```", "SELECT 1 -- x"[:0] + " ; ; "])
def test_a_prediction_that_runs_no_statement_is_invalid_and_gets_the_floor(scorer, text):
    result = scorer.score(example(), text)
    assert result.verdict is Verdict.INVALID
    assert result.reward == RewardConfig().floor


def test_random_seed_of_the_process_does_not_change_a_suite():
    state = random.getstate()
    random.seed(12345)
    first = build_suite(keyed("SELECT name FROM players WHERE goals > 4"))
    random.seed(999)
    second = build_suite(keyed("SELECT name FROM players WHERE goals > 4"))
    random.setstate(state)
    assert first == second


def test_a_suite_cache_distils_once_and_survives_a_damaged_file(tmp_path, monkeypatch):
    import env.text2sql.suite_cache as suite_cache

    built = []
    real = suite_cache.build_suite
    monkeypatch.setattr(suite_cache, "build_suite", lambda *args: built.append(args[0].gold) or real(*args))
    wrong = "SELECT name FROM employees WHERE salary >= 99 ORDER BY name"
    for _ in range(2):
        with Scorer(suite_cache=tmp_path) as cached:
            assert cached.score(example(), wrong).verdict is Verdict.MISMATCH
            assert cached.score(example(), CORRECT).databases == SuiteOptions().size
    assert built == [CORRECT]
    (stored,) = tmp_path.glob("*.suite")
    assert suite_cache.SuiteCache(tmp_path).suite(example(), SuiteOptions(), Limits()) == build_suite(example())
    assert built == [CORRECT]
    good = stored.read_bytes()
    not_an_image = good.replace(b"SQLite format 3", b"SQLite format 9", 1)
    for damage in (b"{not json", good[:-1], good + b"\0", not_an_image):
        stored.write_bytes(damage)
        with Scorer(suite_cache=tmp_path) as cached:
            assert cached.score(example(), wrong).verdict is Verdict.MISMATCH
            assert cached.score(example(), CORRECT).databases == SuiteOptions().size
        assert stored.read_bytes() == good
    assert built == [CORRECT] * 5
    with Scorer(suite_cache=tmp_path, suite=SuiteOptions(size=2)) as smaller:
        assert smaller.score(example(), CORRECT).databases == 2
    assert len(list(tmp_path.glob("*.suite"))) == 2


def _contents(backend, database):
    tables = [name for (name,) in backend.run(database, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {name: sorted(map(repr, backend.run(database, f'SELECT * FROM "{name}"'))) for name in tables}


def test_a_suites_images_hold_the_same_databases_as_its_scripts():
    """The SQLite backend opens a suite's images; every other backend builds its scripts: they must agree."""
    _, held_out = generate(0, 40, seed=3)
    checked = 0
    with SQLiteBackend() as from_scripts, SQLiteBackend() as from_images:
        for item in held_out:
            suite = build_suite(item)
            assert len(suite.images) == len(suite.databases) - 1
            for database, image in zip(suite.databases[1:], suite.images):
                from_images.offer_image(database, image)
                assert _contents(from_images, database) == _contents(from_scripts, database)
                checked += 1
    assert checked >= 60


def test_an_offered_image_is_what_the_backend_opens_and_nothing_changes_it():
    with sqlite3.connect(":memory:") as builder:
        builder.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7);")
        image = builder.serialize()
    scripted = example(schema="CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);", gold="SELECT x FROM t")
    with SQLiteBackend() as backend:
        backend.offer_image(scripted, image)
        assert backend.run(scripted, "SELECT x FROM t") == [(7,)]
        for write in ("DELETE FROM t", "UPDATE t SET x = 0", "INSERT INTO t VALUES (2)", "DROP TABLE t", "PRAGMA query_only = OFF"):
            with pytest.raises(QueryFailed):
                backend.run(scripted, write)
        assert backend.run(scripted, "SELECT x FROM t") == [(7,)]


WITH_UNRELATED = KEYED + """
CREATE TABLE venues (id INTEGER PRIMARY KEY, name TEXT NOT NULL, capacity INTEGER NOT NULL);
INSERT INTO venues VALUES (1, 'Dome', 900), (2, 'Field', 300);
CREATE INDEX venues_by_capacity ON venues (capacity);
"""


def _tables(database):
    with sqlite3.connect(":memory:") as connection:
        connection.executescript(database.schema)
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_generated_databases_hold_the_golds_tables_and_their_parents_only():
    on_players = Example(id="p", question="", schema=WITH_UNRELATED, gold="SELECT name FROM players WHERE goals > 4")
    suite = build_suite(on_players)
    assert [_tables(database) for database in suite.databases[1:]] == [{"players", "teams"}] * 3
    on_venues = Example(id="v", question="", schema=WITH_UNRELATED, gold="SELECT name FROM venues WHERE capacity > 400")
    assert {frozenset(_tables(database)) for database in build_suite(on_venues).databases[1:]} == {frozenset({"venues"})}
    with Scorer() as scorer:
        # Joining the parent along the NOT NULL foreign key is the same query, and still matches.
        joined = "SELECT p.name FROM players AS p JOIN teams AS t ON t.id = p.team_id WHERE p.goals > 4"
        assert scorer.score(on_players, joined).verdict is Verdict.MATCH
        assert scorer.score(on_venues, "SELECT name FROM venues WHERE capacity >= 400").verdict is Verdict.MISMATCH


def test_a_schema_with_a_view_keeps_every_table():
    viewed = WITH_UNRELATED + "CREATE VIEW big_venues AS SELECT * FROM venues WHERE capacity > 500;\n"
    suite = build_suite(Example(id="w", question="", schema=viewed, gold="SELECT name FROM players WHERE goals > 4"))
    assert all(_tables(database) == {"players", "teams", "venues"} for database in suite.databases[1:])

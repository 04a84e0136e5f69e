"""Neighbour queries: one edit each, of every kind the suite is distilled against."""

from collections import Counter

from env.text2sql.neighbours import neighbour_queries

QUERY = (
    "SELECT DISTINCT e.name, MAX(e.salary) FROM employees AS e JOIN projects AS p ON p.owner_id = e.id "
    "WHERE e.salary > 90 AND e.dept = 'eng' GROUP BY e.name HAVING COUNT(*) >= 2 ORDER BY e.name LIMIT 3"
)
COLUMNS = {"employees": ["id", "name", "dept", "salary"], "projects": ["id", "owner_id", "title"]}


def _by_kind(sql=QUERY, **kwargs):
    found = {}
    for neighbour in neighbour_queries(sql, columns=COLUMNS, **kwargs):
        found.setdefault(neighbour.kind, []).append(" ".join(neighbour.sql.split()))  # splices leave double spaces
    return found


def test_every_kind_appears_for_a_query_that_has_its_construct():
    kinds = _by_kind(text_values={"dept": ["eng", "ops"]})
    assert set(kinds) == {
        "comparison", "constant", "drop_where", "drop_condition", "connective", "drop_having", "aggregate",
        "distinct", "drop_order", "order_direction", "limit", "drop_limit", "join", "column",
    }
    assert "SELECT DISTINCT e.name, MAX(e.salary) FROM employees AS e JOIN projects AS p ON p.owner_id = e.id GROUP BY" in kinds["drop_where"][0]
    assert any("e.salary <= 90 AND" in sql for sql in kinds["comparison"])
    assert any("e.salary > 93 AND" in sql for sql in kinds["constant"])
    assert any("e.dept = 'ops'" in sql for sql in kinds["constant"])
    assert not any("e.dept = 'eng'" not in sql and "'eng'" in sql for sql in kinds["constant"])
    assert any("WHERE e.salary > 90 GROUP BY" in sql for sql in kinds["drop_condition"])
    assert any("WHERE e.dept = 'eng' GROUP BY" in sql for sql in kinds["drop_condition"])
    assert any("e.salary > 90 OR e.dept" in sql for sql in kinds["connective"])
    assert {sql.split(",")[1].split("(")[0].strip() for sql in kinds["aggregate"]} == {"MIN", "SUM", "AVG"}
    assert any("ORDER BY e.name DESC LIMIT" in sql for sql in kinds["order_direction"])
    assert sorted(sql.rsplit(" ", 1)[1] for sql in kinds["limit"]) == ["2", "4"]
    assert any("LEFT JOIN projects" in sql for sql in kinds["join"])
    assert kinds["distinct"] == [QUERY.replace("SELECT DISTINCT ", "SELECT ")]


def test_neighbours_are_distinct_from_each_other_and_from_the_gold():
    found = neighbour_queries(QUERY, columns=COLUMNS)
    texts = [n.sql for n in found]
    assert QUERY not in texts
    assert len(texts) == len(set(texts)) > 30
    assert found == neighbour_queries(QUERY, columns=COLUMNS)  # deterministic


def test_between_keeps_its_and_and_the_connectives_are_the_real_ones():
    found = _by_kind("SELECT id FROM employees WHERE salary BETWEEN 10 AND 20 AND dept = 'x'")
    assert found["connective"] == ["SELECT id FROM employees WHERE salary BETWEEN 10 AND 20 OR dept = 'x'"]
    assert "SELECT id FROM employees WHERE salary BETWEEN 10 AND 20" in [sql.strip() for sql in found["drop_condition"]]


def test_shifted_constants_never_turn_into_comments_or_negative_numbers():
    found = _by_kind("SELECT id FROM employees WHERE salary > -2 AND id < 1")
    assert not any("--" in sql for sql in found["constant"])
    assert Counter(sql.count("-") for sql in found["constant"]) == {1: len(found["constant"])}


def test_a_subquery_has_neighbours_of_its_own_and_counts_get_distinct():
    found = _by_kind("SELECT name FROM employees WHERE salary > (SELECT AVG(salary) FROM employees WHERE dept = 'eng')")
    assert any("(SELECT AVG(salary) FROM employees )" in sql for sql in found["drop_where"])
    assert any("SELECT MIN(salary)" in sql for sql in found["aggregate"])
    counts = _by_kind("SELECT COUNT(dept) FROM employees")
    assert counts["aggregate"] == ["SELECT COUNT(DISTINCT dept) FROM employees"]


def test_text_that_does_not_tokenize_has_no_neighbours():
    assert neighbour_queries("SELECT 'unterminated") == []

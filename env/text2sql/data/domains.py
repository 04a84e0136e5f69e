"""The synthetic domains: small relational schemas, and the words questions use for them.

A domain is data, not code: each column carries its role in the question
templates (``label``, ``category``, ``measure``...), the English phrase that
names it, and the values it draws from. The generator turns a domain into a
schema script with seeded random rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """A column, its role in question templates, and what its values are drawn from.

    Roles: ``key`` (the INTEGER PRIMARY KEY ``id``), ``ref`` (a foreign key to
    table ``ref``), ``label`` (a unique name or title, drawn without
    replacement from ``values``), ``category`` (drawn from ``values`` with
    repeats), ``measure`` and ``year`` (integers, or REAL with 2 decimals when
    ``real``, within ``bounds``). ``additive`` says a SUM of it means something.
    """

    name: str
    role: str
    phrase: str
    values: tuple[str, ...] = ()
    bounds: tuple[int, int] = (0, 0)
    real: bool = False
    additive: bool = True
    ref: str = ""

    @property
    def type(self) -> str:
        if self.role in ("label", "category"):
            return "TEXT"
        return "REAL" if self.real else "INTEGER"


@dataclass(frozen=True)
class Table:
    """A table; its name is the plural noun that questions use for its rows."""

    name: str
    singular: str
    size: tuple[int, int]
    columns: tuple[Column, ...]

    @property
    def plural(self) -> str:
        return self.name

    def role(self, *roles: str) -> list[Column]:
        return [column for column in self.columns if column.role in roles]

    @property
    def label(self) -> Column | None:
        return next(iter(self.role("label")), None)


@dataclass(frozen=True)
class Domain:
    name: str
    tables: tuple[Table, ...]

    def table(self, name: str) -> Table:
        return next(table for table in self.tables if table.name == name)

    def links(self) -> list[tuple[Table, Column, Table]]:
        """Every foreign key as (child table, referencing column, parent table)."""
        return [
            (child, column, self.table(column.ref))
            for child in self.tables
            for column in child.role("ref")
        ]


_ID = Column("id", "key", "id")


def _label(name: str, phrase: str, values: list[str]) -> Column:
    return Column(name, "label", phrase, values=tuple(values))


def _category(name: str, phrase: str, *values: str) -> Column:
    return Column(name, "category", phrase, values=values)


def _measure(name: str, phrase: str, low: int, high: int, real: bool = False, additive: bool = True) -> Column:
    return Column(name, "measure", phrase, bounds=(low, high), real=real, additive=additive)


def _year(name: str, phrase: str, low: int, high: int) -> Column:
    return Column(name, "year", phrase, bounds=(low, high))


def _ref(name: str, table: str, phrase: str) -> Column:
    return Column(name, "ref", phrase, ref=table)


def _combine(first: str, second: str, pattern: str = "{} {}") -> list[str]:
    return [pattern.format(a, b) for a, b in itertools.product(first.split(), second.split())]


_PEOPLE = _combine(
    "Ada Bruno Chen Dana Elif Farah Goran Hana Ivan Jonas Kira Luis Maya Nikhil Olga Pedro Quinn Rosa Sami Tara",
    "Novak Okafor Lindqvist Moreau Tanaka Silva Kowalski Haddad Petrov Nguyen Schmidt Rossi O'Connor Mensah Kaur",
)
_CITIES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Hillcrest", "Oakridge", "Brookfield")
_FLIGHT_NUMBERS = "104 215 326 437 548 659 761 872 983 195"
_COUNTRIES = ("Canada", "Brazil", "Japan", "Kenya", "Norway", "India", "Mexico", "France")

LIBRARY = Domain(
    "library",
    (
        Table("authors", "author", (10, 20), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("country", "country", *_COUNTRIES),
            _year("birth_year", "birth year", 1920, 1995),
        )),
        Table("books", "book", (25, 40), (
            _ID,
            _label("title", "title", _combine(
                "Silent Hidden Golden Broken Distant Crimson Frozen Last Wild Quiet",
                "River Garden Empire Mirror Harbor Forest Letter Storm Bridge Island",
                "The {} {}",
            )),
            _category("genre", "genre", "Fantasy", "Mystery", "Biography", "Science Fiction", "History", "Poetry"),
            _year("published_year", "publication year", 1950, 2023),
            _measure("pages", "page count", 90, 900),
            _measure("price", "price", 5, 60, real=True),
            _ref("author_id", "authors", "author"),
        )),
        Table("members", "member", (10, 25), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("city", "city", *_CITIES),
            _year("joined_year", "joining year", 2008, 2024),
        )),
        Table("loans", "loan", (25, 40), (
            _ID,
            _ref("book_id", "books", "book"),
            _ref("member_id", "members", "member"),
            _measure("days", "duration in days", 1, 60),
        )),
    ),
)

RETAIL = Domain(
    "retail",
    (
        Table("customers", "customer", (12, 25), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("city", "city", *_CITIES),
            _category("segment", "segment", "Consumer", "Corporate", "Small Business"),
        )),
        Table("products", "product", (15, 30), (
            _ID,
            _label("name", "name", _combine(
                "Bamboo Steel Ceramic Linen Copper Oak Wool Glass",
                "Kettle Lamp Chair Blanket Mug Shelf Vase Towel",
            )),
            _category("category", "category", "Kitchen", "Garden", "Office", "Bedroom", "Bathroom", "Outdoor"),
            _measure("price", "price", 3, 400, real=True),
            _measure("stock", "stock", 0, 250),
        )),
        Table("orders", "order", (25, 40), (
            _ID,
            _ref("customer_id", "customers", "customer"),
            _ref("product_id", "products", "product"),
            _measure("quantity", "quantity", 1, 12),
            _category("channel", "channel", "Online", "Store", "Phone"),
        )),
    ),
)

HR = Domain(
    "hr",
    (
        Table("departments", "department", (10, 12), (
            _ID,
            _label("name", "name", [
                "Finance", "Marketing", "Sales", "Engineering", "Research", "Legal", "Support",
                "Operations", "Logistics", "Design", "Security", "Procurement", "Training", "Quality",
            ]),
            _category("city", "city", *_CITIES),
            _measure("budget", "budget", 50_000, 900_000, real=True),
        )),
        Table("employees", "employee", (25, 40), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category(
                "job_title", "job title", "Engineer", "Analyst", "Manager", "Designer", "Technician", "Accountant"
            ),
            _measure("salary", "salary", 30_000, 150_000, real=True),
            _year("hire_year", "hiring year", 1995, 2024),
            _ref("department_id", "departments", "department"),
        )),
        Table("projects", "project", (10, 25), (
            _ID,
            _label("title", "title", _combine(
                "Blue Red Green Silver Amber Violet Black White",
                "Falcon Otter Lynx Heron Bison Fox Raven Wolf",
            )),
            _category("status", "status", "Planned", "Active", "Completed", "On Hold"),
            _measure("budget", "budget", 10_000, 500_000, real=True),
            _ref("department_id", "departments", "department"),
        )),
    ),
)

SCHOOL = Domain(
    "school",
    (
        Table("teachers", "teacher", (10, 18), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("subject", "subject", "Mathematics", "Science", "History", "Languages", "Arts", "Sports"),
            _measure("experience_years", "years of experience", 1, 35),
        )),
        Table("students", "student", (20, 40), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("city", "city", *_CITIES),
            _measure("grade_level", "grade level", 1, 12, additive=False),
        )),
        Table("courses", "course", (12, 25), (
            _ID,
            _label("title", "title", _combine(
                "Algebra Biology Chemistry History Literature Physics Geography Economics Art Music",
                "I II III IV",
            )),
            _category("level", "level", "Beginner", "Intermediate", "Advanced"),
            _measure("credits", "credit count", 1, 6),
            _ref("teacher_id", "teachers", "teacher"),
        )),
        Table("enrollments", "enrollment", (30, 40), (
            _ID,
            _ref("student_id", "students", "student"),
            _ref("course_id", "courses", "course"),
            _measure("score", "score", 40, 100, real=True, additive=False),
        )),
    ),
)

FLIGHTS = Domain(
    "flights",
    (
        Table("airlines", "airline", (10, 12), (
            _ID,
            _label("name", "name", [
                "Aurora Air", "Blue Sky Airways", "Coastal Wings", "Northern Jet", "Sunline", "Transglobal",
                "Skyward", "Pacific Arrow", "Atlas Air Lines", "Meridian Air", "Falcon Airways", "Zephyr Air",
            ]),
            _category("country", "country", *_COUNTRIES),
            _year("founded_year", "founding year", 1925, 2015),
        )),
        Table("flights", "flight", (25, 40), (
            _ID,
            _label("flight_number", "flight number", _combine("AR BS CW NJ", _FLIGHT_NUMBERS, "{}{}")),
            _category("origin", "origin", *_CITIES),
            _category("destination", "destination", *_CITIES),
            _measure("distance", "distance", 150, 9000),
            _measure("duration", "duration in minutes", 40, 780),
            _ref("airline_id", "airlines", "airline"),
        )),
        Table("bookings", "booking", (25, 40), (
            _ID,
            _label("passenger", "passenger name", _PEOPLE),
            _category("seat_class", "seat class", "Economy", "Premium Economy", "Business", "First"),
            _measure("fare", "fare", 50, 2500, real=True),
            _ref("flight_id", "flights", "flight"),
        )),
    ),
)

HOSPITAL = Domain(
    "hospital",
    (
        Table("doctors", "doctor", (10, 16), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("specialty", "specialty", "Cardiology", "Neurology", "Pediatrics", "Oncology", "Dermatology"),
            _measure("experience_years", "years of experience", 1, 40),
        )),
        Table("patients", "patient", (20, 40), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("city", "city", *_CITIES),
            _category("blood_type", "blood type", "A+", "A-", "B+", "O+", "O-", "AB+"),
            _year("birth_year", "birth year", 1935, 2020),
        )),
        Table("appointments", "appointment", (30, 40), (
            _ID,
            _ref("doctor_id", "doctors", "doctor"),
            _ref("patient_id", "patients", "patient"),
            _category("status", "status", "Completed", "Cancelled", "Scheduled", "No Show"),
            _measure("cost", "cost", 40, 900, real=True),
        )),
    ),
)

MOVIES = Domain(
    "movies",
    (
        Table("directors", "director", (10, 18), (
            _ID,
            _label("name", "name", _PEOPLE),
            _category("country", "country", *_COUNTRIES),
            _year("birth_year", "birth year", 1930, 1995),
        )),
        Table("movies", "movie", (25, 40), (
            _ID,
            _label("title", "title", _combine(
                "Midnight Neon Iron Velvet Electric Savage Paper Glass Solar Lucky",
                "Runner Protocol Horizon Heist Signal Kingdom Circuit Voyage Frontier Echo",
            )),
            _category("genre", "genre", "Drama", "Comedy", "Thriller", "Animation", "Documentary", "Action"),
            _year("release_year", "release year", 1970, 2024),
            _measure("rating", "rating", 1, 10, real=True, additive=False),
            _measure("runtime", "runtime in minutes", 75, 200),
            _ref("director_id", "directors", "director"),
        )),
        Table("reviews", "review", (25, 40), (
            _ID,
            _label("critic", "critic name", _PEOPLE),
            _category("outlet", "outlet", "Daily Reel", "Screen Weekly", "Film Gazette", "Cinema Today"),
            _measure("score", "score", 1, 100, additive=False),
            _ref("movie_id", "movies", "movie"),
        )),
    ),
)

ALL = (LIBRARY, RETAIL, HR, SCHOOL, FLIGHTS, HOSPITAL, MOVIES)

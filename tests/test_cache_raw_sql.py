"""Raw SQL through Django invalidates the cache: the tables come from PostgreSQL's parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections, transaction
from psycopg import sql

from django_dbscale.backends.written_tables import UNKNOWN, written_tables
from django_dbscale.cache import cache_stats
from django_dbscale.testing.harness import Services
from tests.test_cache_support import cache_env, fresh_context, invalidations, observe
from tests.testapp.models_cache import CCounter

TABLE = CCounter._meta.db_table


@pytest.mark.parametrize(
    ("statement", "tables"),
    [
        ("UPDATE qc_book SET price = price + 100", {"qc_book"}),
        ("UPDATE qc_book SET price = %s WHERE id = %(pk)s AND t LIKE 'a%%'", {"qc_book"}),
        ("INSERT INTO public.a (x) VALUES (%s)", {"a"}),
        ("WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d", {"a", "b"}),
        ("WITH d AS (UPDATE a SET x = 1 RETURNING *) SELECT count(*) FROM d", {"a"}),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v", {"t"}),
        ("TRUNCATE a, public.b", {"a", "b"}),
        ("COPY a (x, y) FROM STDIN", {"a"}),
        ("COPY a TO STDOUT", set()),
        ("SELECT 1; DELETE FROM c", {"c"}),
        ("ALTER TABLE a ADD COLUMN z int", {"a"}),
        ("DROP TABLE a, public.b", {"a", "b"}),
        ("CREATE INDEX i ON a (x)", set()),
        ("CREATE TABLE n (x int)", set()),
        ('DELETE FROM "Mixed" WHERE true', {"Mixed"}),
        ("INSERT INTO a VALUES (now(), lower('X'))", {"a"}),
    ],
)
def test_the_parser_names_every_written_table(statement: str, tables: set[str]) -> None:
    assert written_tables(statement) == frozenset(tables)


@pytest.mark.parametrize(
    "statement",
    [
        "TRUNCATE a CASCADE",  # empties every table that references a
        "INSERT INTO a VALUES (my_function())",  # a user function may write anything
        "DO $$ BEGIN DELETE FROM a; END $$",
        "CALL refresh_everything()",
        "REFRESH MATERIALIZED VIEW mv",
        "this is not sql",
    ],
)
def test_statements_whose_tables_cannot_be_named_are_unknown(statement: str) -> None:
    assert written_tables(statement) is UNKNOWN


def on_primary(services: Services, pk: int) -> int:
    rows = services.pg1.execute(f"SELECT value FROM {TABLE} WHERE id = %s", (pk,), dbname="dbscale")
    return int(rows[0][0])


def cached_value(pk: int) -> tuple[int, list[str]]:
    with fresh_context(), observe() as seen:
        value = int(CCounter.objects.cache().get(pk=pk).value)
    return value, seen.reasons


@pytest.fixture
def primed() -> CCounter:
    row: CCounter = CCounter.objects.create(name="c", value=1)
    assert cached_value(row.pk) == (1, ["miss"])
    assert cached_value(row.pk) == (1, ["hit"])
    return row


def raw(statement: Any, params: Any = None) -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute(statement, params)


WRITES: dict[str, Callable[[int], None]] = {
    "update": lambda pk: raw(f"UPDATE {TABLE} SET value = value + 100 WHERE id = %s", [pk]),
    "cte": lambda pk: raw(
        f"WITH u AS (UPDATE {TABLE} SET value = 101 WHERE id = %s RETURNING id) "
        "SELECT count(*) FROM u",
        [pk],
    ),
    "merge": lambda pk: raw(
        f"MERGE INTO {TABLE} t USING (SELECT %s::bigint AS id) s ON t.id = s.id "
        "WHEN MATCHED THEN UPDATE SET value = 101",
        [pk],
    ),
    "composed": lambda pk: raw(
        sql.SQL("UPDATE {} SET value = 101 WHERE id = %s").format(sql.Identifier(TABLE)), [pk]
    ),
    "schema_editor": lambda pk: _schema_editor_update(pk),
}


def _schema_editor_update(pk: int) -> None:
    # What a migration's RunSQL does.
    with connections["default"].schema_editor() as editor:
        editor.execute(f"UPDATE {TABLE} SET value = 101 WHERE id = %s", [pk])


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures(cache_env.__name__)
@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_raw_write_invalidates_what_was_cached(
    primed: CCounter, services: Services, write: str
) -> None:
    WRITES[write](primed.pk)
    assert on_primary(services, primed.pk) == 101
    assert cached_value(primed.pk) == (101, ["miss"])


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures(cache_env.__name__)
def test_a_raw_write_in_a_transaction_invalidates_at_commit_and_not_on_rollback(
    primed: CCounter, services: Services
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        raw(f"UPDATE {TABLE} SET value = 7 WHERE id = %s", [primed.pk])
        raise RuntimeError("abandon")
    assert cached_value(primed.pk) == (1, ["hit"])  # rolled back: nothing to invalidate
    with transaction.atomic():
        raw(f"UPDATE {TABLE} SET value = 8 WHERE id = %s", [primed.pk])
    assert on_primary(services, primed.pk) == 8
    assert cached_value(primed.pk) == (8, ["miss"])


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures(cache_env.__name__)
def test_executemany_and_copy_invalidate_counts(services: Services) -> None:
    def count() -> tuple[int, list[str]]:
        with fresh_context(), observe() as seen:
            value = CCounter.objects.cache().count()
        return value, seen.reasons

    assert count() == (0, ["miss"])
    with connections["default"].cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {TABLE} (name, value) VALUES (%s, %s)", [("a", 1), ("b", 2)]
        )
    assert count() == (2, ["miss"])
    assert count() == (2, ["hit"])
    with (
        connections["default"].cursor() as cursor,
        cursor.copy(f"COPY {TABLE} (name, value) FROM STDIN") as copy,
    ):
        copy.write_row(("c", 3))
    assert count() == (3, ["miss"])


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures(cache_env.__name__)
def test_a_write_whose_tables_cannot_be_named_invalidates_every_table_and_is_counted(
    primed: CCounter, services: Services
) -> None:
    raw(f"TRUNCATE {TABLE} CASCADE")
    assert services.pg1.execute(f"SELECT count(*) FROM {TABLE}", dbname="dbscale") == [(0,)]
    with fresh_context(), observe() as seen:
        assert list(CCounter.objects.cache().filter(pk=primed.pk)) == []
    assert seen.reasons == ["miss"]
    assert cache_stats(shared=False)["db:default"]["unknown_write"] == 1


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures(cache_env.__name__)
def test_an_orm_write_is_published_once_not_again_from_its_sql(primed: CCounter) -> None:
    with invalidations() as seen:
        CCounter.objects.filter(pk=primed.pk).update(value=5)
    assert [sorted(event["tables"]) for event in seen] == [[TABLE]]
    assert cache_stats(shared=False).get("db:default", {}).get("unknown_write", 0) == 0

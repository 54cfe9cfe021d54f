"""Every write path invalidates: write, then read, and the read returns the new data.

Each test primes the cache with a read, proves the next read is a hit that runs no SQL,
writes through one of Django's write paths, and checks the next read runs SQL and returns
exactly the new rows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, Sum

from django_dbscale.cache import invalidate, invalidate_model
from django_dbscale.cache import stats as cache_stats_module
from tests.test_cache_support import (
    QueryCounter,
    cache_env,
    cache_keys,
    commandstats,
    fresh_context,
    invalidations,
    observe,
)
from tests.testapp.models_cache import (
    CAuthor,
    CBook,
    CClub,
    CMembership,
    CPerson,
    CPlace,
    CPublisher,
    CRestaurant,
    CReview,
    CShelf,
    CTag,
)

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]


def primed(read: Callable[[], Any], expected: Any) -> None:
    """Read until a read is a hit that runs no SQL; every read returns *expected*.

    At most two reads may miss: a stored miss, plus one for a query shape whose first run
    taught the cache about a table it reads (prefetches, aggregates) and was not stored.
    """
    for _ in range(3):
        with fresh_context(), observe() as seen, QueryCounter() as counter:
            assert read() == expected
        if seen.reasons == ["hit"]:
            assert counter.total == 0, counter.sql
            return
    raise AssertionError(f"never became a hit: {seen.reasons}")


def reread(read: Callable[[], Any], expected: Any) -> None:
    """Read after a write: SQL runs (not a hit) and the result is *expected*."""
    with fresh_context(), observe() as seen, QueryCounter() as counter:
        got = read()
    assert got == expected
    assert seen.hits == 0, seen.reasons
    assert counter.selects() >= 1


@pytest.fixture
def library() -> dict[str, Any]:
    ann = CAuthor.objects.create(name="Ann")
    bob = CAuthor.objects.create(name="Bob")
    pub = CPublisher.objects.create(name="Pub")
    shelf = CShelf.objects.create(label="S1")
    b1 = CBook.objects.create(title="A1", author=ann, publisher=pub, price=10, shelf=shelf)
    b2 = CBook.objects.create(title="A2", author=ann, publisher=pub, price=20)
    b3 = CBook.objects.create(title="B1", author=bob, price=30)
    red = CTag.objects.create(name="red")
    blue = CTag.objects.create(name="blue")
    b1.tags.add(red)
    connections["default"].close()
    return {
        "ann": ann,
        "bob": bob,
        "pub": pub,
        "shelf": shelf,
        "b1": b1,
        "b2": b2,
        "b3": b3,
        "red": red,
        "blue": blue,
    }


def titles_of(author: CAuthor) -> Callable[[], list[str]]:
    return lambda: [b.title for b in CBook.objects.cache().filter(author=author).order_by("title")]


def prices_of(author: CAuthor) -> Callable[[], list[int]]:
    return lambda: [b.price for b in CBook.objects.cache().filter(author=author).order_by("price")]


def all_titles() -> list[str]:
    return [b.title for b in CBook.objects.cache().order_by("title")]


# -- single-object writes --------------------------------------------------------------------


def test_save_of_an_existing_object_invalidates(library: dict[str, Any]) -> None:
    read = titles_of(library["ann"])
    primed(read, ["A1", "A2"])
    book = CBook.objects.get(pk=library["b1"].pk)
    book.title = "A0"
    book.save()
    reread(read, ["A0", "A2"])


def test_create_invalidates_count_exists_and_rows(library: dict[str, Any]) -> None:
    ann = library["ann"]
    primed(lambda: CBook.objects.cache().filter(author=ann).count(), 2)
    primed(lambda: CBook.objects.cache().filter(title="A3").exists(), False)
    CBook.objects.create(title="A3", author=ann)
    reread(lambda: CBook.objects.cache().filter(author=ann).count(), 3)
    reread(lambda: CBook.objects.cache().filter(title="A3").exists(), True)


def test_get_is_cached_and_invalidated(library: dict[str, Any]) -> None:
    pk = library["b2"].pk
    primed(lambda: CBook.objects.cache().get(pk=pk).price, 20)
    CBook.objects.filter(pk=pk).update(price=21)
    reread(lambda: CBook.objects.cache().get(pk=pk).price, 21)


def test_instance_delete_invalidates(library: dict[str, Any]) -> None:
    primed(all_titles, ["A1", "A2", "B1"])
    CBook.objects.get(pk=library["b3"].pk).delete()
    reread(all_titles, ["A1", "A2"])


# -- bulk writes Django sends no signal for ---------------------------------------------------


def test_queryset_update_invalidates(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: sorted(CBook.objects.cache().values_list("price", flat=True))  # noqa: E731
    primed(read, [10, 20, 30])
    CBook.objects.filter(price__gte=20).update(price=5)
    reread(read, [5, 5, 10])


def test_bulk_create_invalidates(library: dict[str, Any]) -> None:
    bob = library["bob"]
    read = titles_of(bob)
    primed(read, ["B1"])
    CBook.objects.bulk_create([CBook(title="B2", author=bob), CBook(title="B3", author=bob)])
    reread(read, ["B1", "B2", "B3"])


def test_bulk_create_with_update_conflicts_invalidates(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: list(CTag.objects.cache().values_list("name", flat=True))  # noqa: E731
    primed(read, ["blue", "red"])
    CTag.objects.bulk_create(
        [CTag(id=library["red"].pk, name="green")],
        update_conflicts=True,
        unique_fields=["id"],
        update_fields=["name"],
    )
    reread(read, ["blue", "green"])


def test_bulk_update_invalidates(library: dict[str, Any]) -> None:
    read = titles_of(library["ann"])
    primed(read, ["A1", "A2"])
    b1, b2 = CBook.objects.filter(author=library["ann"]).order_by("id")
    b1.title, b2.title = "X1", "X2"
    CBook.objects.bulk_update([b1, b2], ["title"])
    reread(read, ["X1", "X2"])


def test_queryset_delete_invalidates(library: dict[str, Any]) -> None:
    primed(all_titles, ["A1", "A2", "B1"])
    CBook.objects.filter(price__lt=25).delete()
    reread(all_titles, ["B1"])


def test_raw_delete_of_fast_deletable_rows_invalidates(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: list(CShelf.objects.values_list("label", flat=True))  # noqa: E731
    # CShelf has no cache manager: read it through a cached query that joins it.
    join: Callable[[], Any] = lambda: list(  # noqa: E731
        CBook.objects.cache().filter(shelf__label="S1").values_list("title", flat=True)
    )
    primed(join, ["A1"])
    assert read() == ["S1"]
    CShelf.objects.all().delete()  # SET_NULL on books, then a fast delete of shelves
    reread(join, [])


def test_cascading_delete_invalidates_the_children(library: dict[str, Any]) -> None:
    CReview.objects.create(book=library["b1"], stars=5)
    read: Callable[[], Any] = lambda: CReview.objects.cache().count()  # noqa: E731
    primed(read, 1)
    CPublisher.objects.get(pk=library["pub"].pk).delete()  # cascades to books, then reviews
    reread(read, 0)
    reread(all_titles, ["B1"])


def test_on_delete_set_null_update_invalidates(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: CBook.objects.cache().filter(author__isnull=True).count()  # noqa: E731
    primed(read, 0)
    CAuthor.objects.get(pk=library["bob"].pk).delete()  # UPDATE books SET author_id = NULL
    reread(read, 1)


def test_loaddata_invalidates(library: dict[str, Any], tmp_path: Path) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    fixture = tmp_path / "books.json"
    fixture.write_text(
        json.dumps(
            [
                {
                    "model": "testapp.cbook",
                    "pk": library["b3"].pk,
                    "fields": {
                        "title": "B9",
                        "author": library["bob"].pk,
                        "price": 1,
                        "publisher": None,
                        "shelf": None,
                        "tags": [],
                    },
                },
                {
                    "model": "testapp.cbook",
                    "pk": 999,
                    "fields": {
                        "title": "B8",
                        "author": library["bob"].pk,
                        "price": 2,
                        "publisher": None,
                        "shelf": None,
                        "tags": [],
                    },
                },
            ]
        )
    )
    call_command("loaddata", str(fixture), verbosity=0)
    reread(read, ["B8", "B9"])


# -- many-to-many, both directions, custom through ---------------------------------------------


def test_m2m_add_and_remove_from_both_sides_invalidate(library: dict[str, Any]) -> None:
    b1, red, blue = library["b1"], library["red"], library["blue"]
    forward: Callable[[], Any] = lambda: list(b1.tags.cache().values_list("name", flat=True))  # noqa: E731
    reverse: Callable[[], Any] = lambda: list(blue.books.cache().values_list("title", flat=True))  # noqa: E731
    primed(forward, ["red"])
    primed(reverse, [])
    b1.tags.add(blue)
    reread(forward, ["blue", "red"])
    reread(reverse, ["A1"])
    primed(forward, ["blue", "red"])
    red.books.remove(b1)  # from the other side
    reread(forward, ["blue"])
    primed(reverse, ["A1"])
    blue.books.clear()
    reread(reverse, [])
    reread(forward, [])
    b1.tags.set([red])
    reread(forward, ["red"])


def test_m2m_through_model_writes_invalidate(library: dict[str, Any]) -> None:
    club = CClub.objects.create(name="chess")
    ann = CPerson.objects.create(name="ann")

    def read() -> list[str]:
        return list(
            CClub.objects.cache().filter(members__name="ann").values_list("name", flat=True)
        )

    primed(read, [])
    CMembership.objects.create(club=club, person=ann, role="chair")
    reread(read, ["chess"])
    primed(read, ["chess"])
    club.members.remove(ann)
    reread(read, [])
    club.members.add(ann, through_defaults={"role": "member"})
    reread(read, ["chess"])


# -- what a query depends on --------------------------------------------------------------------


def test_a_write_to_a_joined_table_invalidates(library: dict[str, Any]) -> None:
    def read() -> list[str]:
        return list(
            CBook.objects.cache().filter(author__name="Ann").values_list("title", flat=True)
        )

    primed(read, ["A1", "A2"])
    CAuthor.objects.filter(pk=library["ann"].pk).update(name="Anne")
    reread(read, [])


def test_a_write_to_a_select_related_table_invalidates(library: dict[str, Any]) -> None:
    pk = library["b1"].pk

    def read() -> Any:
        return CBook.objects.cache().select_related("author").get(pk=pk).author.name

    primed(read, "Ann")
    CAuthor.objects.filter(pk=library["ann"].pk).update(name="Anne")
    reread(read, "Anne")


def test_a_write_to_a_prefetched_table_invalidates(library: dict[str, Any]) -> None:
    def read() -> list[tuple[str, list[str]]]:
        authors = CAuthor.objects.cache().prefetch_related("books")
        return [(a.name, sorted(b.title for b in a.books.all())) for a in authors]

    primed(read, [("Ann", ["A1", "A2"]), ("Bob", ["B1"])])
    CBook.objects.filter(pk=library["b3"].pk).update(title="B0")
    reread(read, [("Ann", ["A1", "A2"]), ("Bob", ["B0"])])


def test_a_write_to_a_table_in_a_subquery_invalidates(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: list(  # noqa: E731
        CAuthor.objects.cache()
        .filter(Exists(CBook.objects.filter(author=OuterRef("pk"), price__gt=25)))
        .values_list("name", flat=True)
    )
    primed(read, ["Bob"])
    CBook.objects.filter(pk=library["b1"].pk).update(price=99)
    reread(read, ["Ann", "Bob"])


def test_a_write_to_an_annotated_table_invalidates(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: [  # noqa: E731
        (a.name, a.n) for a in CAuthor.objects.cache().annotate(n=Count("books")).order_by("name")
    ]
    primed(read, [("Ann", 2), ("Bob", 1)])
    CBook.objects.create(title="B2", author=library["bob"])
    reread(read, [("Ann", 2), ("Bob", 2)])


def test_aggregate_is_cached_and_invalidated(library: dict[str, Any]) -> None:
    read: Callable[[], Any] = lambda: CBook.objects.cache().aggregate(total=Sum("price"))  # noqa: E731
    primed(read, {"total": 60})
    CBook.objects.filter(pk=library["b1"].pk).update(price=11)
    reread(read, {"total": 61})


def test_multi_table_inheritance_parent_and_child_writes_invalidate() -> None:
    CRestaurant.objects.create(name="Luigi", serves_pizza=True)

    def read() -> Any:
        return list(CRestaurant.objects.cache().values_list("name", "serves_pizza"))

    primed(read, [("Luigi", True)])
    CPlace.objects.filter(name="Luigi").update(name="Mario")  # the parent table only
    reread(read, [("Mario", True)])
    primed(read, [("Mario", True)])
    r = CRestaurant.objects.get()
    r.serves_pizza = False
    r.save()  # both tables
    reread(read, [("Mario", False)])


def test_a_multi_table_child_of_a_parent_with_dimensions_is_cached_and_invalidated() -> None:
    from tests.testapp.models_cache import CKiosk, CStore

    CKiosk.objects.create(city="Oslo")
    CStore.objects.create(city="Rome")

    def kiosks() -> Any:
        return list(CKiosk.objects.cache().filter(city="Oslo").values_list("city", "open_late"))

    def stores() -> Any:
        return list(CStore.objects.cache().filter(city="Rome").values_list("city", flat=True))

    primed(kiosks, [("Oslo", False)])
    primed(stores, ["Rome"])
    CKiosk.objects.create(city="Oslo", open_late=True)  # parent row of Oslo, child row
    reread(kiosks, [("Oslo", False), ("Oslo", True)])
    with fresh_context(), observe() as seen:
        assert stores() == ["Rome"]
    assert seen.reasons == ["hit"]  # the parent's dimensions still split its versions
    CStore.objects.filter(city="Oslo").update(city="Bergen")
    reread(kiosks, [])


def outside_django(statement: str, params: list[Any]) -> None:
    """Write as another program would: on a connection the dbscale backend never sees."""
    from django_dbscale.cache import outbox

    with outbox.connect("default") as own:
        own.execute(statement, params)


def test_raw_sql_through_django_invalidates_by_itself(library: dict[str, Any]) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    with connection.cursor() as cursor:
        cursor.execute("UPDATE testapp_cbook SET title = 'Braw' WHERE id = %s", [library["b3"].pk])
    reread(read, ["Braw"])


def test_writes_from_outside_django_need_invalidate_model(library: dict[str, Any]) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    outside_django("UPDATE testapp_cbook SET title = 'Braw' WHERE id = %s", [library["b3"].pk])
    with fresh_context():
        assert read() == ["B1"]  # the cache cannot see another program's writes...
    invalidate_model(CBook)
    reread(read, ["Braw"])  # ...until told


def test_invalidate_object_bumps_its_dimension(library: dict[str, Any]) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    outside_django("UPDATE testapp_cbook SET title = 'Braw' WHERE id = %s", [library["b3"].pk])
    invalidate(library["b3"])
    reread(read, ["Braw"])


def truth(statement: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Rows read on the primary directly, not through the library."""
    from django_dbscale.cache import outbox

    with outbox.connect("default") as own:
        return [tuple(row) for row in own.execute(statement, params).fetchall()]


# -- dimensions ---------------------------------------------------------------------------------


def test_a_write_to_one_author_keeps_the_other_authors_entries(library: dict[str, Any]) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    CBook.objects.create(title="A3", author=library["ann"])
    with fresh_context(), observe() as seen, QueryCounter() as counter:
        assert bob_titles() == ["B1"]
    assert seen.reasons == ["hit"] and counter.total == 0
    reread(ann_titles, ["A1", "A2", "A3"])
    # A read without a dimension filter depends on the whole table.
    reread(all_titles, ["A1", "A2", "A3", "B1"])


def test_moving_a_row_between_dimension_values_invalidates_both(library: dict[str, Any]) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    book = CBook.objects.get(pk=library["b2"].pk)  # loaded, then saved with a new author
    book.author = library["bob"]
    book.save()
    reread(ann_titles, ["A1"])
    reread(bob_titles, ["A2", "B1"])


def test_save_keeping_its_dimension_is_one_plain_update_and_bumps_only_that_value(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    book = CBook.objects.get(pk=library["b1"].pk)
    book.title = "A0"
    with QueryCounter(["default"]) as counter:
        book.save()
    # No CTE reading the old author: the WHERE checks it is still the one being assigned.
    assert [sql.split(None, 1)[0] for _, sql in counter.sql] == ["UPDATE"], counter.sql
    assert '"author_id" = ' in counter.sql[0][1].split(" WHERE ", 1)[1], counter.sql
    reread(ann_titles, ["A0", "A2"])
    with fresh_context(), observe() as seen:
        assert bob_titles() == ["B1"]
    assert seen.reasons == ["hit"]  # Bob's dimension was not bumped


def test_save_of_an_instance_whose_dimension_changed_in_the_database_invalidates_both(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    book = CBook.objects.get(pk=library["b2"].pk)  # loaded with author Ann
    b2, bob = library["b2"].pk, library["bob"].pk
    outside_django("UPDATE testapp_cbook SET author_id = %s WHERE id = %s", [bob, b2])
    invalidate_model(CBook)
    primed(ann_titles, ["A1"])
    primed(bob_titles, ["A2", "B1"])
    book.title = "A2x"
    with QueryCounter(["default"]) as counter:
        book.save()  # moves the row back from Bob (in the database) to Ann (in memory)
    reread(bob_titles, ["B1"])
    reread(ann_titles, ["A1", "A2x"])
    # The guarded UPDATE matched no row (the author is not Ann any more): the CTE ran.
    assert [sql.split(None, 1)[0] for _, sql in counter.sql] == ["UPDATE", "WITH"], counter.sql
    assert truth("SELECT author_id, title FROM testapp_cbook WHERE id = %s", [b2]) == [
        (library["ann"].pk, "A2x")
    ]


def test_update_by_pk_assigning_no_dimension_returns_its_dimension_and_bumps_only_it(
    library: dict[str, Any],
) -> None:
    ann_prices = prices_of(library["ann"])
    bob_prices = prices_of(library["bob"])
    primed(ann_prices, [10, 20])
    primed(bob_prices, [30])
    with QueryCounter(["default"]) as counter:
        assert CBook.objects.filter(pk=library["b1"].pk).update(price=F("price") + 1) == 1
    # One UPDATE ... RETURNING author_id: no join reading the old author (it is unchanged).
    (statement,) = [sql for _, sql in counter.sql]
    assert statement.startswith("UPDATE ") and " RETURNING " in statement, statement
    assert "__dbscale_old" not in statement and "WITH" not in statement
    reread(ann_prices, [11, 20])
    with fresh_context(), observe() as seen:
        assert bob_prices() == [30]
    assert seen.reasons == ["hit"]  # Bob's dimension was not bumped


def test_update_of_many_rows_assigning_no_dimension_bumps_their_dimensions(
    library: dict[str, Any],
) -> None:
    ann_prices, bob_prices = prices_of(library["ann"]), prices_of(library["bob"])
    primed(ann_prices, [10, 20])
    primed(bob_prices, [30])
    with QueryCounter(["default"]) as counter:
        assert CBook.objects.filter(price__lt=25).update(price=F("price") + 5) == 2
    (statement,) = [sql for _, sql in counter.sql]
    assert statement.startswith("WITH u AS (UPDATE ") and "__dbscale_old" not in statement
    reread(ann_prices, [15, 25])
    with fresh_context(), observe() as seen:
        assert bob_prices() == [30]
    assert seen.reasons == ["hit"]


@pytest.fixture
def author_rewriting_trigger(library: dict[str, Any]) -> Iterator[None]:
    """A BEFORE UPDATE row trigger that moves a book renamed "moved" to Bob."""
    from django_dbscale.backends.postgresql import compiler

    outside_django(
        "CREATE FUNCTION dbscale_test_move() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.title = 'moved' THEN NEW.author_id := {library['bob'].pk}; END IF; "
        "RETURN NEW; END $$",
        [],
    )
    outside_django(
        "CREATE TRIGGER dbscale_test_move BEFORE UPDATE ON testapp_cbook "
        "FOR EACH ROW EXECUTE FUNCTION dbscale_test_move()",
        [],
    )
    try:
        yield
    finally:
        outside_django("DROP TRIGGER dbscale_test_move ON testapp_cbook", [])
        outside_django("DROP FUNCTION dbscale_test_move()", [])
        compiler._rewritten_by_triggers.clear()


@pytest.mark.usefixtures(author_rewriting_trigger.__name__)
def test_a_trigger_moving_a_row_to_another_dimension_value_invalidates_both(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    # No dimension assigned: the statement finds the trigger and bumps the whole table.
    CBook.objects.filter(pk=library["b1"].pk).update(title="moved")
    assert truth("SELECT author_id FROM testapp_cbook WHERE id = %s", [library["b1"].pk]) == [
        (library["bob"].pk,)
    ]
    reread(ann_titles, ["A2"])
    reread(bob_titles, ["B1", "moved"])
    # From then on this table's updates read the old values by the join.
    primed(ann_titles, ["A2"])
    primed(bob_titles, ["B1", "moved"])
    with QueryCounter(["default"]) as counter:
        CBook.objects.filter(pk=library["b2"].pk).update(title="moved")
    assert "__dbscale_old" in counter.sql[-1][1]
    reread(ann_titles, [])
    reread(bob_titles, ["B1", "moved", "moved"])


@pytest.mark.usefixtures(author_rewriting_trigger.__name__)
def test_save_whose_dimension_a_trigger_changes_invalidates_both(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    book = CBook.objects.get(pk=library["b2"].pk)
    book.title = "moved"
    book.save()  # assigns author Ann; the trigger stores Bob
    reread(ann_titles, ["A1"])
    reread(bob_titles, ["B1", "moved"])


def test_update_moving_rows_by_an_unrelated_filter_invalidates_old_and_new(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    CBook.objects.filter(price=10).update(author=library["bob"])  # old author only known to PG
    reread(ann_titles, ["A2"])
    reread(bob_titles, ["A1", "B1"])


def test_delete_by_an_unrelated_filter_invalidates_the_deleted_rows_dimension(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    CBook.objects.filter(price=30).delete()
    reread(bob_titles, [])
    with fresh_context(), observe() as seen:
        assert ann_titles() == ["A1", "A2"]
    assert seen.reasons == ["hit"]


def test_update_pinning_the_old_dimension_invalidates_the_new_one(
    library: dict[str, Any],
) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    CBook.objects.filter(author=library["ann"]).update(author=library["bob"])  # WHERE + SET
    reread(ann_titles, [])
    reread(bob_titles, ["A1", "A2", "B1"])


def test_bulk_create_across_authors_invalidates_each_author(library: dict[str, Any]) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    CBook.objects.bulk_create(
        [CBook(title="A3", author=library["ann"]), CBook(title="B2", author=library["bob"])]
    )
    reread(ann_titles, ["A1", "A2", "A3"])
    reread(bob_titles, ["B1", "B2"])


@pytest.mark.parametrize(
    "not_pinned",
    [
        lambda ann: CBook.objects.cache().exclude(author=ann),
        lambda ann: CBook.objects.cache().filter(~Q(author=ann)),
        lambda ann: CBook.objects.cache().filter(Q(author=ann) | Q(title__startswith="B")),
    ],
    ids=["exclude", "negated-Q", "OR"],
)
def test_exclude_negation_and_or_do_not_pin_a_dimension(
    library: dict[str, Any], not_pinned: Callable[[Any], Any]
) -> None:
    def read() -> list[str]:
        return sorted(
            b.title for b in not_pinned(library["ann"]) if b.author_id != library["ann"].pk
        )

    primed(read, ["B1"])
    CBook.objects.create(title="B2", author=library["bob"])  # bumps Bob's dimension only
    reread(read, ["B1", "B2"])


# -- transactions -------------------------------------------------------------------------------


def test_invalidation_waits_for_commit_and_dirty_tables_bypass(library: dict[str, Any]) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    with transaction.atomic():
        CBook.objects.create(title="B2", author=library["bob"])
        with observe() as seen:
            assert read() == ["B1", "B2"]  # own uncommitted write, from the database
        assert seen.reasons == ["bypass:table written in this transaction"]
        box: list[Any] = []

        def other_reader() -> None:
            try:
                with fresh_context(), observe() as other:
                    box.append((read(), other.reasons))
            finally:
                connections.close_all()

        thread = threading.Thread(target=other_reader)
        thread.start()
        thread.join(30)
        # Nothing bumped yet: other readers keep hitting the committed entry.
        assert box == [(["B1"], ["hit"])]
    reread(read, ["B1", "B2"])


def test_rollback_invalidates_nothing_and_stores_nothing(library: dict[str, Any]) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    with invalidations() as seen, pytest.raises(RuntimeError), transaction.atomic():
        CBook.objects.create(title="B2", author=library["bob"])
        assert read() == ["B1", "B2"]
        raise RuntimeError("roll back")
    assert seen == []
    with fresh_context(), observe() as reads:
        assert read() == ["B1"]
    assert reads.reasons == ["hit"]


def test_nested_savepoint_rollback_then_commit(library: dict[str, Any]) -> None:
    ann_titles, bob_titles = titles_of(library["ann"]), titles_of(library["bob"])
    primed(ann_titles, ["A1", "A2"])
    primed(bob_titles, ["B1"])
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            CBook.objects.create(title="B2", author=library["bob"])
            raise RuntimeError("roll back the savepoint")
        with transaction.atomic():
            CBook.objects.create(title="A3", author=library["ann"])
            with transaction.atomic():
                CBook.objects.filter(title="A1").update(price=1)
    reread(ann_titles, ["A1", "A2", "A3"])
    # The rolled-back savepoint's write did not happen; invalidating Bob is allowed but
    # reading must give the committed data either way.
    with fresh_context():
        assert bob_titles() == ["B1"]


def test_a_savepoint_rollback_keeps_the_later_writes_invalidations(library: dict[str, Any]) -> None:
    read = titles_of(library["ann"])
    primed(read, ["A1", "A2"])
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            CBook.objects.create(title="Z", author=library["bob"])  # rolled back below
            raise RuntimeError("roll back this savepoint only")
        CBook.objects.create(title="A3", author=library["ann"])
    reread(read, ["A1", "A2", "A3"])


# -- cost ---------------------------------------------------------------------------------------


def _redis_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in delta.items() if v and k != "info"}


def test_a_write_costs_one_redis_round_trip(
    library: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # INFO commandstats also counts the GET/TTL/SET the bump script runs inside Redis; the
    # client sends one command: EVALSHA.
    monkeypatch.setattr(cache_stats_module, "FLUSH_INTERVAL", 1e9)
    before = commandstats()
    CBook.objects.filter(pk=library["b1"].pk).update(price=1)
    calls = _redis_calls(before, commandstats())
    assert calls["evalsha"] == 1
    assert set(calls) <= {"evalsha", "get", "set", "ttl"}, calls
    before = commandstats()
    with transaction.atomic():
        for i in range(5):
            CBook.objects.create(title=f"T{i}", author=library["ann"])
        CBook.objects.filter(price__lt=5).delete()
        library["b2"].tags.add(library["red"])
    calls = _redis_calls(before, commandstats())
    assert calls["evalsha"] == 1
    assert set(calls) <= {"evalsha", "get", "set", "ttl"}, calls


def test_invalidating_every_table_costs_one_round_trip_and_one_position_query(
    library: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # invalidate_all() names every installed table; it used to cost a WAL query and a Redis
    # round trip per table.
    from django.apps import apps
    from django.test.utils import CaptureQueriesContext

    from django_dbscale.cache import invalidate_all

    monkeypatch.setattr(cache_stats_module, "FLUSH_INTERVAL", 1e9)
    read = titles_of(library["ann"])
    primed(read, ["A1", "A2"])
    assert len({m._meta.db_table for m in apps.get_models(include_auto_created=True)}) > 10
    before = commandstats()
    with CaptureQueriesContext(connections["default"]) as queries:
        invalidate_all("default")
    calls = _redis_calls(before, commandstats())
    assert calls["evalsha"] == 1
    assert set(calls) <= {"evalsha", "get", "set", "ttl"}, calls
    assert [q["sql"] for q in queries] == ["SELECT pg_current_wal_insert_lsn()::text"]
    with fresh_context(), observe() as seen:
        assert read() == ["A1", "A2"]
    assert seen.reasons == ["miss"]


def test_migrate_and_flush_invalidate_every_cached_table(library: dict[str, Any]) -> None:
    read = titles_of(library["ann"])
    primed(read, ["A1", "A2"])
    primed(all_titles, ["A1", "A2", "B1"])
    with connection.cursor() as cursor:  # behind the ORM: no hook sees it
        cursor.execute(f"UPDATE {CBook._meta.db_table} SET title = 'A0' WHERE title = 'A1'")
    call_command("migrate", database="default", verbosity=0)  # nothing to apply
    reread(read, ["A0", "A2"])
    reread(all_titles, ["A0", "A2", "B1"])
    primed(read, ["A0", "A2"])
    call_command("flush", database="default", interactive=False, verbosity=0)
    reread(read, [])


def test_every_key_has_a_ttl(library: dict[str, Any]) -> None:
    from tests.test_cache_support import redis

    primed(titles_of(library["ann"]), ["A1", "A2"])
    CBook.objects.create(title="A3", author=library["ann"])
    cache_stats_module.FLUSH_INTERVAL, saved = 0.0, cache_stats_module.FLUSH_INTERVAL
    try:
        with fresh_context():
            titles_of(library["ann"])()
    finally:
        cache_stats_module.FLUSH_INTERVAL = saved
    keys = cache_keys()
    assert any(":e:" in k for k in keys) and any(":v:" in k for k in keys)
    assert all(redis().ttl(k) > 0 for k in keys), {k: redis().ttl(k) for k in keys}


def test_a_rolled_back_transaction_leaves_no_dirty_tables_behind(library: dict[str, Any]) -> None:
    read = titles_of(library["bob"])
    primed(read, ["B1"])
    with pytest.raises(RuntimeError), transaction.atomic():
        CBook.objects.create(title="B2", author=library["bob"])
        raise RuntimeError("roll back")
    with transaction.atomic(), observe() as seen:  # the very next thing is a transaction
        assert read() == ["B1"]
    assert seen.reasons == ["hit"]


def test_an_update_of_a_multi_table_child_costs_one_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_stats_module, "FLUSH_INTERVAL", 1e9)
    CRestaurant.objects.create(name="L", serves_pizza=True)

    def read() -> Any:
        return list(CRestaurant.objects.cache().values_list("name", "serves_pizza"))

    primed(read, [("L", True)])
    before = commandstats()
    with QueryCounter(["default"]) as counter:
        CRestaurant.objects.filter(name="L").update(name="M", serves_pizza=False)
    assert _redis_calls(before, commandstats())["evalsha"] == 1  # both tables, one call
    # Django selects the parent ids, then runs two UPDATEs (child and parent table), each
    # reading the WAL position in its own round trip (autocommit, a primary with replicas:
    # backends/positions.py): no separate position query.
    assert [sql.split(None, 1)[0] for _, sql in counter.sql] == ["SELECT", "UPDATE", "UPDATE"]
    assert not any("pg_current_wal" in sql for _, sql in counter.sql)
    reread(read, [("M", False)])

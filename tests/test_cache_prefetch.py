"""``Prefetch`` objects are keyed by their own queryset and invalidated by the child table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction
from django.db.models import Prefetch, QuerySet
from django.test import override_settings

from django_dbscale.cache import cache_stats
from django_dbscale.testing.harness import Services
from tests.test_cache_reads import books, twice
from tests.test_cache_support import QueryCounter, cache_env, fresh_context, observe
from tests.testapp.models_cache import CAuthor, CBook

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__, books.__name__),
]


def titles_by_author(prefetch: Any, attr: str = "books") -> Callable[[], list[Any]]:
    def read() -> list[Any]:
        rows = CAuthor.objects.cache().prefetch_related(prefetch).order_by("name")
        return [
            (a.name, [b.title for b in (getattr(a, attr) if attr != "books" else a.books.all())])
            for a in rows
        ]

    return read


FORMS: dict[str, tuple[Any, str, list[Any]]] = {
    "plain queryset": (
        Prefetch("books", queryset=QuerySet(CBook).filter(price__gte=20).order_by("-price")),
        "books",
        [("Ann", ["A2"]), ("Bob", ["B1"])],
    ),
    "cached queryset": (
        Prefetch("books", queryset=CBook.objects.filter(price__lt=25).order_by("title")),
        "books",
        [("Ann", ["A1", "A2"]), ("Bob", [])],
    ),
    "to_attr": (
        Prefetch("books", queryset=QuerySet(CBook).order_by("title"), to_attr="all_books"),
        "all_books",
        [("Ann", ["A1", "A2"]), ("Bob", ["B1"])],
    ),
    "no queryset": (Prefetch("books"), "books", [("Ann", ["A1", "A2"]), ("Bob", ["B1"])]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_prefetch_form_is_cached_and_a_child_write_invalidates_it(
    form: str, services: Services
) -> None:
    prefetch, attr, expected = FORMS[form]
    read = titles_by_author(prefetch, attr)
    value, reasons = twice(read)
    assert value == expected
    assert reasons[-1] in ("miss", "hit")
    with fresh_context(), observe() as seen, QueryCounter() as counter:
        assert read() == expected
    assert seen.reasons == ["hit"] and counter.total == 0  # stored, parents and children
    # A write to the child table invalidates it; the database says what is right.
    CBook.objects.filter(title="A2").update(price=21, title="A2x")
    rows = services.pg1.execute(
        "SELECT title FROM testapp_cbook WHERE price = 21", dbname="dbscale"
    )
    assert rows == [("A2x",)]
    with fresh_context(), observe() as seen:
        fresh = read()
    assert seen.reasons[0] != "hit"
    assert fresh == [(name, [t.replace("A2", "A2x") for t in titles]) for name, titles in expected]


def test_prefetches_with_different_querysets_have_different_keys() -> None:
    cheap = titles_by_author(Prefetch("books", queryset=QuerySet(CBook).filter(price__lt=15)))
    dear = titles_by_author(Prefetch("books", queryset=QuerySet(CBook).filter(price__gt=15)))
    assert twice(cheap)[0] == [("Ann", ["A1"]), ("Bob", [])]
    assert twice(dear)[0] == [("Ann", ["A2"]), ("Bob", ["B1"])]


def test_an_unkeyable_read_is_counted_and_warned_about_once_in_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    locking = Prefetch("books", queryset=QuerySet(CBook).select_for_update().order_by("id"))
    with (
        override_settings(DEBUG=True),
        caplog.at_level(logging.WARNING, "django_dbscale.cache"),
        transaction.atomic(),
    ):
        for _ in range(2):
            rows = CAuthor.objects.cache().prefetch_related(locking).order_by("name")
            assert [(a.name, [b.title for b in a.books.all()]) for a in rows] == [
                ("Ann", ["A1", "A2"]),
                ("Bob", ["B1"]),
            ]
    assert cache_stats(shared=False)["testapp.CAuthor"]["bypass"] == 2
    warned = [r for r in caplog.records if "is not cached" in r.getMessage()]
    assert len(warned) == 1 and "select_for_update" in warned[0].getMessage()
    explained = CAuthor.objects.cache().prefetch_related(locking).explain_cache()
    assert not explained.cacheable

"""The N+1 test helper names the repeated query and the select_related/prefetch that fixes it."""

from __future__ import annotations

import pytest

from django_dbscale.testing.nplusone import NPlusOneDetected, assert_no_n_plus_one
from tests.test_cache_reads import books
from tests.testapp.models_cache import CAuthor, CBook

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures(books.__name__)]


def test_a_foreign_key_followed_row_by_row_names_select_related() -> None:
    with pytest.raises(NPlusOneDetected) as caught, assert_no_n_plus_one(max_repeats=2):
        assert [b.author.name for b in CBook.objects.order_by("id")] == ["Ann", "Ann", "Bob"]
    message = str(caught.value)
    assert "ran 3 times (at most 2 allowed)" in message
    assert 'CBook: select_related("author")' in message


def test_a_reverse_relation_per_row_names_prefetch_related() -> None:
    with pytest.raises(NPlusOneDetected) as caught, assert_no_n_plus_one(max_repeats=1):
        titles = [[b.title for b in a.books.all()] for a in CAuthor.objects.order_by("id")]
    assert titles == [["A1", "A2"], ["B1"]]
    assert 'CAuthor: prefetch_related("books")' in str(caught.value)


def test_a_many_to_many_per_row_names_prefetch_related() -> None:
    with pytest.raises(NPlusOneDetected) as caught, assert_no_n_plus_one(max_repeats=2):
        tags = [[t.name for t in b.tags.all()] for b in CBook.objects.order_by("id")]
    assert tags == [["red"], [], []]
    assert 'CBook: prefetch_related("tags")' in str(caught.value)


def test_the_fixed_queries_pass_and_the_shapes_are_counted() -> None:
    with assert_no_n_plus_one(max_repeats=1) as shapes:
        rows = [(b.title, b.author.name) for b in CBook.objects.select_related("author")]
        authors = CAuthor.objects.prefetch_related("books").order_by("id")
        titles = [[b.title for b in a.books.all()] for a in authors]
    assert sorted(rows) == [("A1", "Ann"), ("A2", "Ann"), ("B1", "Bob")]
    assert titles == [["A1", "A2"], ["B1"]]
    assert sum(shapes.values()) == 3 and max(shapes.values()) == 1


def test_max_repeats_is_validated() -> None:
    with pytest.raises(ValueError, match="max_repeats"), assert_no_n_plus_one(max_repeats=0):
        pass

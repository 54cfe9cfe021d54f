"""Function and template-fragment caches are invalidated by the data they show."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction
from django.template import Context, Engine, TemplateSyntaxError

from django_dbscale.cache.fragments import cached_as
from django_dbscale.testing.harness import Services
from tests.test_cache_reads import books
from tests.test_cache_support import QueryCounter, cache_env, fresh_context, observe
from tests.testapp.models_cache import CAuthor, CBook

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]

ENGINE = Engine(libraries={"dbscale_cache": "django_dbscale.templatetags.dbscale_cache"})
FRAGMENT = ENGINE.from_string(
    "{% load dbscale_cache %}"
    '{% cachedas 600 "titles" books lang %}'
    "{% for b in books %}{{ b.title }};{% endfor %}{{ lang }}"
    "{% endcachedas %}"
)

CHEAP = CBook.objects.filter(price__lt=25).order_by("title")


@cached_as(CHEAP, timeout=300)
def cheap_titles(suffix: str) -> list[str]:
    return [b.title + suffix for b in CHEAP.all()]


@cached_as("testapp.CBook")
def titles_with_authors_forgetting_authors() -> list[str]:
    return [f"{b.title}/{b.author.name}" for b in CBook.objects.select_related("author")]


def call(fn: Any, *args: Any) -> tuple[Any, list[str], int]:
    with fresh_context(), observe() as seen, QueryCounter() as q:
        value = fn(*args)
    return value, seen.reasons, q.selects()


def render(books_qs: Any, lang: str) -> tuple[str, list[str], int]:
    return call(lambda: FRAGMENT.render(Context({"books": books_qs, "lang": lang})))


def primary_titles(services: Services) -> list[str]:
    rows = services.pg1.execute("SELECT title FROM testapp_cbook ORDER BY title", dbname="dbscale")
    return [r[0] for r in rows]


@pytest.mark.usefixtures(books.__name__)
def test_a_function_cached_as_a_queryset_is_refreshed_by_a_write_it_depends_on(
    services: Services,
) -> None:
    assert call(cheap_titles, "!")[:2] == (["A1!", "A2!"], ["miss"])
    assert call(cheap_titles, "!") == (["A1!", "A2!"], ["hit"], 0)
    assert call(cheap_titles, "?")[:2] == (["A1?", "A2?"], ["miss"])  # its arguments vary it
    CBook.objects.filter(title="A2").update(title="A2x")
    assert "A2x" in primary_titles(services)
    assert call(cheap_titles, "!")[:2] == (["A1!", "A2x!"], ["miss"])


@pytest.mark.usefixtures(books.__name__)
def test_a_forgotten_dependency_is_never_stored() -> None:
    value, reasons, _ = call(titles_with_authors_forgetting_authors)
    assert sorted(value) == ["A1/Ann", "A2/Ann", "B1/Bob"]
    assert reasons == ["bypass:read tables outside its versions: ['testapp_cauthor']"]
    assert call(titles_with_authors_forgetting_authors)[1][0].startswith("bypass:")


@pytest.mark.usefixtures(books.__name__)
def test_a_fragment_is_cached_per_queryset_and_value_and_refreshed_by_a_write(
    services: Services,
) -> None:
    ann = CAuthor.objects.get(name="Ann")
    bob = CAuthor.objects.get(name="Bob")
    anns = CBook.objects.filter(author=ann).order_by("title")
    assert render(anns, "en")[:2] == ("A1;A2;en", ["miss"])
    assert render(CBook.objects.filter(author=ann).order_by("title"), "en") == (
        "A1;A2;en",
        ["hit"],
        0,
    )
    assert render(anns, "fr")[:2] == ("A1;A2;fr", ["miss"])  # another vary value
    bobs = CBook.objects.filter(author=bob).order_by("title")
    assert render(bobs, "en")[:2] == ("B1;en", ["miss"])  # another queryset
    CBook.objects.create(title="A3", author=ann, price=5)
    assert "A3" in primary_titles(services)
    assert render(CBook.objects.filter(author=ann).order_by("title"), "en")[:2] == (
        "A1;A2;A3;en",
        ["miss"],
    )


@pytest.mark.usefixtures(books.__name__)
def test_a_fragment_inside_a_transaction_that_wrote_its_table_shows_the_own_write() -> None:
    ann = CAuthor.objects.get(name="Ann")
    assert render(CBook.objects.filter(author=ann).order_by("title"), "en")[0] == "A1;A2;en"
    with transaction.atomic():
        CBook.objects.create(title="A0", author=ann)
        text, reasons, _ = render(CBook.objects.filter(author=ann).order_by("title"), "en")
        assert text == "A0;A1;A2;en"
        assert reasons == ["bypass:table written in this transaction"]
        transaction.set_rollback(True)
    assert render(CBook.objects.filter(author=ann).order_by("title"), "en")[:2] == (
        "A1;A2;en",
        ["hit"],
    )


def test_bad_arguments_say_what_to_write() -> None:
    with pytest.raises(ValueError, match="needs what the function reads"):
        cached_as()
    with pytest.raises(ValueError, match="not an installed model"):
        cached_as("testapp.Nope")
    with pytest.raises(TemplateSyntaxError, match="timeout and a fragment name"):
        ENGINE.from_string("{% load dbscale_cache %}{% cachedas 5 %}{% endcachedas %}")
    bad = ENGINE.from_string('{% load dbscale_cache %}{% cachedas "x" "n" %}{% endcachedas %}')
    with pytest.raises(TemplateSyntaxError, match="positive int"):
        bad.render(Context({}))

"""The read API: what is cached, what bypasses, keys, explain(), the decorator, validation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import FieldError, ImproperlyConfigured
from django.db import connections, transaction
from django.db.models import Count, F, Max, Q, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now, Upper
from django.test import override_settings

from django_dbscale.cache import cached_queryset, keys
from django_dbscale.cache.options import options
from tests.test_cache_support import (
    QueryCounter,
    cache_env,
    cache_keys,
    entry_keys,
    fresh_context,
    observe,
    redis,
    settle,
)
from tests.testapp.models_cache import CAuthor, CBook, CCounter, CEvent, CPublisher, CTag

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]


@pytest.fixture
def books() -> dict[str, Any]:
    ann = CAuthor.objects.create(name="Ann")
    bob = CAuthor.objects.create(name="Bob")
    pub = CPublisher.objects.create(name="P")
    red = CTag.objects.create(name="red")
    b1 = CBook.objects.create(title="A1", author=ann, price=10, publisher=pub)
    b2 = CBook.objects.create(title="A2", author=ann, price=20)
    b3 = CBook.objects.create(title="B1", author=bob, price=30)
    b1.tags.add(red)
    return {"ann": ann, "bob": bob, "pub": pub, "red": red, "b1": b1, "b2": b2, "b3": b3}


def twice(read: Any) -> tuple[Any, list[str]]:
    """Read twice in fresh contexts; return the value and the reasons of both reads."""
    reasons: list[str] = []
    values = []
    for _ in range(2):
        with fresh_context(), observe() as seen:
            values.append(read())
        reasons.extend(seen.reasons)
    assert values[0] == values[1]
    return values[0], reasons


def hit_without_sql(read: Any) -> Any:
    twice(read)
    with fresh_context(), observe() as seen, QueryCounter() as counter:
        value = read()
    assert seen.reasons == ["hit"] and counter.total == 0, (seen.reasons, counter.sql)
    return value


CASES: dict[str, Any] = {
    "filter_chain": lambda b: [
        x.title
        for x in CBook.objects.cache()
        .filter(price__gt=5)
        .exclude(title="A2")
        .filter(Q(author__name="Ann") | Q(price=30))
    ],
    "values": lambda b: list(
        CBook.objects.cache().values("title", "author__name").order_by("-title")
    ),
    "values_list": lambda b: list(
        CBook.objects.cache().values_list("title", "price").order_by("price")
    ),
    "flat": lambda b: list(CBook.objects.cache().values_list("title", flat=True).order_by("title")),
    "named": lambda b: [
        tuple(r)
        for r in CBook.objects.cache().values_list("title", "price", named=True).order_by("title")
    ],
    "count": lambda b: CBook.objects.cache().filter(author=b["ann"]).count(),
    "exists": lambda b: CBook.objects.cache().filter(title="nope").exists(),
    "aggregate": lambda b: CBook.objects.cache().aggregate(Max("price"), n=Count("id")),
    "first": lambda b: CBook.objects.cache().order_by("-price").first().title,
    "last": lambda b: CBook.objects.cache().filter(author=b["ann"]).last().title,
    "first_unordered": lambda b: CTag.objects.cache().first().name,
    "slice": lambda b: [x.title for x in CBook.objects.cache().order_by("title")[1:3]],
    "index": lambda b: CBook.objects.cache().order_by("title")[2].title,
    "get": lambda b: CBook.objects.cache().get(title="B1").price,
    "in_bulk": lambda b: sorted(
        x.title for x in CBook.objects.cache().in_bulk([b["b1"].pk, b["b3"].pk]).values()
    ),
    "annotate": lambda b: [
        (a.name, a.n) for a in CAuthor.objects.cache().annotate(n=Count("books")).order_by("name")
    ],
    "expressions": lambda b: list(
        CBook.objects.cache()
        .annotate(up=Upper("title"), p2=F("price") * 2, v=Value(1))
        .values_list("up", "p2", "v")
        .order_by("up")
    ),
    "only": lambda b: [
        (x.title, x.price) for x in CBook.objects.cache().only("title", "price").order_by("id")
    ],
    "defer": lambda b: [x.title for x in CBook.objects.cache().defer("price").order_by("id")],
    "distinct": lambda b: list(
        CBook.objects.cache()
        .values_list("author__name", flat=True)
        .distinct()
        .order_by("author__name")
    ),
    "reverse": lambda b: [x.title for x in CBook.objects.cache().order_by("title").reverse()],
    "select_related": lambda b: [
        (x.title, x.author.name)
        for x in CBook.objects.cache().select_related("author").order_by("id")
    ],
    "prefetch": lambda b: [
        (a.name, [x.title for x in a.books.all()])
        for a in CAuthor.objects.cache().prefetch_related("books")
    ],
    "related_manager": lambda b: [x.title for x in b["ann"].books.cache().order_by("title")],
    "subquery_in": lambda b: sorted(
        x.title
        for x in CBook.objects.cache().filter(author__in=CAuthor.objects.cache().filter(name="Bob"))
    ),
    "bool": lambda b: bool(CBook.objects.cache().filter(price=20)),
    "len": lambda b: len(CBook.objects.cache().filter(price__lt=25)),
}

EXPECTED: dict[str, Any] = {
    "filter_chain": ["A1", "B1"],
    "values": [
        {"title": "B1", "author__name": "Bob"},
        {"title": "A2", "author__name": "Ann"},
        {"title": "A1", "author__name": "Ann"},
    ],
    "values_list": [("A1", 10), ("A2", 20), ("B1", 30)],
    "flat": ["A1", "A2", "B1"],
    "named": [("A1", 10), ("A2", 20), ("B1", 30)],
    "count": 2,
    "exists": False,
    "aggregate": {"price__max": 30, "n": 3},
    "first": "B1",
    "last": "A2",
    "first_unordered": "red",
    "slice": ["A2", "B1"],
    "index": "B1",
    "get": 30,
    "in_bulk": ["A1", "B1"],
    "annotate": [("Ann", 2), ("Bob", 1)],
    "expressions": [("A1", 20, 1), ("A2", 40, 1), ("B1", 60, 1)],
    "only": [("A1", 10), ("A2", 20), ("B1", 30)],
    "defer": ["A1", "A2", "B1"],
    "distinct": ["Ann", "Bob"],
    "reverse": ["B1", "A2", "A1"],
    "select_related": [("A1", "Ann"), ("A2", "Ann"), ("B1", "Bob")],
    "prefetch": [("Ann", ["A1", "A2"]), ("Bob", ["B1"])],
    "related_manager": ["A1", "A2"],
    "subquery_in": ["B1"],
    "bool": True,
    "len": 2,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_evaluations_return_the_database_result_and_then_hit(
    books: dict[str, Any], case: str
) -> None:
    assert hit_without_sql(lambda: CASES[case](books)) == EXPECTED[case]


def test_prefetched_rows_are_stored_with_their_parents(books: dict[str, Any]) -> None:
    def read() -> list[list[str]]:
        return [
            [t.name for t in b.tags.all()]
            for b in CBook.objects.cache().prefetch_related("tags").order_by("id")
        ]

    assert hit_without_sql(read) == [["red"], [], []]


def test_a_related_manager_hit_returns_the_live_parent(books: dict[str, Any]) -> None:
    ann = books["ann"]
    hit_without_sql(lambda: list(ann.books.cache().all()))
    ann.name = "changed in memory"
    rows = list(ann.books.cache().all())
    assert all(row.author is ann for row in rows)


def test_nocache_and_unopted_querysets_do_not_touch_the_cache(books: dict[str, Any]) -> None:
    with observe() as seen:
        assert CBook.objects.cache().nocache().count() == 3
        assert CBook.objects.count() == 3
        assert CBook.objects.filter(price=10).cache(timeout=5).nocache().exists()
    assert seen.events == []
    assert not entry_keys()


def test_models_listed_in_settings_are_cached_by_default(books: dict[str, Any]) -> None:
    cache = {**settings.DBSCALE["CACHE"], "MODELS": ["testapp.CPublisher"]}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        _, reasons = twice(lambda: CPublisher.objects.get(name="P").name)
        assert reasons == ["miss", "hit"]
        _, reasons = twice(lambda: CPublisher.objects.nocache().count())
        assert reasons == []
        _, reasons = twice(lambda: CBook.objects.count())  # not listed
        assert reasons == []


@pytest.mark.parametrize(
    ("read", "reason"),
    [
        (lambda: [b.title for b in CBook.objects.cache().order_by("?")][:0], "non-deterministic"),
        (
            lambda: list(CBook.objects.cache().annotate(at=Now()).values_list("id", "at"))[:0],
            "non-deterministic",
        ),
        (
            lambda: list(
                CBook.objects.cache().annotate(r=RawSQL("1", ())).values_list("r", flat=True)
            ),
            "RawSQL",
        ),
        (
            lambda: list(
                CBook.objects.cache().extra(select={"x": "1"}).values_list("x", flat=True)
            ),
            "extra()",
        ),
    ],
)
def test_uncacheable_sql_bypasses(books: dict[str, Any], read: Any, reason: str) -> None:
    for _ in range(2):
        with fresh_context(), observe() as seen:
            read()
        assert len(seen.reasons) == 1 and seen.reasons[0].startswith("bypass:")
        assert reason in seen.reasons[0]
    assert not entry_keys()


def test_iterator_select_for_update_and_get_or_create_never_use_the_cache(
    books: dict[str, Any],
) -> None:
    with observe() as seen:
        assert [b.title for b in CBook.objects.cache().order_by("id").iterator()] == [
            "A1",
            "A2",
            "B1",
        ]
        with transaction.atomic():
            assert CBook.objects.cache().select_for_update().get(title="A1").price == 10
        book, created = CBook.objects.cache().get_or_create(title="A1", defaults={"price": 1})
        assert not created and book.pk == books["b1"].pk
        book, created = CBook.objects.cache().update_or_create(title="A2", defaults={"price": 2})
        assert not created and book.price == 2
    assert seen.events == []


@pytest.fixture
def counter_on_shard0() -> Any:
    with connections["shard0"].schema_editor() as editor:
        editor.create_model(CCounter)
    yield
    with connections["shard0"].schema_editor() as editor:
        editor.delete_model(CCounter)


@pytest.mark.usefixtures("counter_on_shard0")
def test_two_databases_never_share_an_entry() -> None:
    CCounter.objects.using("default").create(id=1, name="x", value=100)
    CCounter.objects.using("shard0").create(id=1, name="x", value=200)
    read0: Callable[[], Any] = lambda: CCounter.objects.cache().using("default").get(pk=1).value  # noqa: E731
    read1: Callable[[], Any] = lambda: CCounter.objects.cache().using("shard0").get(pk=1).value  # noqa: E731
    assert hit_without_sql(read0) == 100
    assert hit_without_sql(read1) == 200
    CCounter.objects.using("shard0").filter(pk=1).update(value=201)
    assert twice(read1) == (201, ["miss", "hit"])
    assert twice(read0) == (100, ["hit", "hit"])  # shard0's write left default alone


def test_a_schema_or_format_change_makes_old_entries_unreachable(
    books: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: Callable[[], Any] = lambda: CBook.objects.cache().filter(title="A1").count()  # noqa: E731
    hit_without_sql(read)
    monkeypatch.setattr(keys, "_fingerprint", ["0000000000"])
    from django_dbscale.cache import planning

    planning.clear()
    with fresh_context(), observe() as seen:
        assert read() == 1
    assert seen.reasons == ["miss"]


def test_a_lost_version_key_never_revives_an_old_entry(books: dict[str, Any]) -> None:
    def read() -> Any:
        return [b.title for b in CBook.objects.cache().filter(author=books["bob"])]

    hit_without_sql(read)
    for key in cache_keys("v:*"):
        redis().delete(key)  # evicted, expired or flushed
    with fresh_context(), observe() as seen:
        assert read() == ["B1"]
    assert seen.reasons == ["miss"]
    versions = {k: redis().get(k) for k in cache_keys("v:*")}
    tables = [v for k, v in versions.items() if not k.endswith("~generation")]
    generations = [v for k, v in versions.items() if k.endswith("~generation")]
    assert tables and all(v.endswith(b":P") for v in tables)
    # A lost generation carries no position: the table versions beside it carry theirs.
    assert generations and all(v.endswith(b":" + b"0" * 16) for v in generations)


def test_an_invalid_lookup_raises_when_evaluated(books: dict[str, Any]) -> None:
    qs = CBook.objects.cache().filter(no_such_field=1)
    with pytest.raises(FieldError, match="no_such_field"):
        list(qs)


def test_a_queryset_whose_query_was_touched_is_keyed_by_its_sql(books: dict[str, Any]) -> None:
    def read() -> list[str]:
        qs = CBook.objects.cache().filter(price__gte=20)
        assert "testapp_cbook" in str(qs.query)  # the recipe is gone; the SQL keys it now
        return sorted(b.title for b in qs)

    assert hit_without_sql(read) == ["A2", "B1"]
    CBook.objects.filter(title="A1").update(price=25)
    assert twice(read) == (["A1", "A2", "B1"], ["miss", "hit"])


def test_async_evaluation_reads_through_the_cache(books: dict[str, Any]) -> None:
    async def read() -> tuple[int, str]:
        count = await CBook.objects.cache().filter(author=books["ann"]).acount()
        first = await CBook.objects.cache().order_by("title").afirst()
        assert first is not None
        return count, first.title

    def run() -> tuple[int, str]:
        with fresh_context():
            return asyncio.run(read())

    assert twice(run) == ((2, "A1"), ["miss", "miss", "hit", "hit"])


# -- explain -----------------------------------------------------------------------------------


def test_explain_says_why_a_read_missed(books: dict[str, Any]) -> None:
    qs = CBook.objects.cache().filter(author=books["bob"])
    first = qs.explain_cache()
    assert first.cacheable and first.state == "miss" and "no entry" in first.reason
    bob = books["bob"].pk
    assert first.depends_on == (f"default.testapp_cbook where author_id in ['{bob}']",)
    list(qs)
    assert CBook.objects.cache().filter(author=books["bob"]).explain_cache().state == "hit"
    CBook.objects.create(title="B2", author=books["bob"])
    after = CBook.objects.cache().filter(author=books["bob"]).explain_cache()
    assert after.state == "miss" and after.reason.startswith("invalidated")
    assert after.changed == (f"dbscale-test:v:default:testapp_cbook:d:author_id={books['bob'].pk}",)
    assert CBook.objects.filter(id=1).explain_cache().state == "uncacheable"
    assert "order_by" not in str(CBook.objects.cache().order_by("?").explain_cache())
    assert (
        CBook.objects.cache().order_by("?").explain_cache().reason.startswith("non-deterministic")
    )


# -- the decorator ----------------------------------------------------------------------------


@cached_queryset(timeout=60, depends_on=[CBook, "testapp.CAuthor"])
def titles_by(author_name: str) -> list[str]:
    return sorted(CBook.objects.filter(author__name=author_name).values_list("title", flat=True))


@cached_queryset(depends_on=[CBook])
def forgot_a_model() -> list[str]:
    return sorted(CBook.objects.filter(author__name="Ann").values_list("title", flat=True))


def test_decorated_functions_are_cached_and_invalidated_with_their_models(
    books: dict[str, Any],
) -> None:
    assert twice(lambda: titles_by("Ann")) == (["A1", "A2"], ["miss", "hit"])
    assert twice(lambda: titles_by("Bob")) == (["B1"], ["miss", "hit"])
    CAuthor.objects.filter(name="Bob").update(name="Rob")
    assert twice(lambda: titles_by("Bob")) == ([], ["miss", "hit"])
    assert twice(lambda: titles_by("Ann")) == (["A1", "A2"], ["miss", "hit"])


def test_a_decorated_function_reading_an_undeclared_table_is_never_stored(
    books: dict[str, Any],
) -> None:
    value, reasons = twice(forgot_a_model)
    assert value == ["A1", "A2"]
    assert len(reasons) == 2 and all("testapp_cauthor" in r for r in reasons)


def test_decorator_and_queryset_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="needs the models the function reads"):
        cached_queryset(depends_on=[])
    with pytest.raises(ValueError, match="positive int"):
        cached_queryset(timeout=0, depends_on=[CBook])
    with pytest.raises(TypeError, match="model classes or 'app_label.ModelName'"):
        cached_queryset(depends_on=[42])(lambda: None)  # type: ignore[list-item]
    with pytest.raises(
        ValueError, match=r"CBook.objects.cache\(\): timeout must be a positive int"
    ):
        CBook.objects.cache(timeout=-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"TIMEOUT": 0}, r"DBSCALE\['CACHE'\]\['TIMEOUT'\] must be a positive int"),
        ({"MODELS": "testapp.CBook"}, r"\['MODELS'\] must be a list of model labels"),
        ({"MODELS": ["CBook"]}, r"not a model label"),
        ({"CIRCUIT_BREAKER": 5}, r"\['CIRCUIT_BREAKER'\] must be \(failures_before_opening"),
        ({"VERSION_TIMEOUT": 10}, r"must be at least TIMEOUT"),
        ({"DIMENSIONS": {"testapp.CBook": [3]}}, r"must be a list of field names"),
        ({"TIMEOUT": "900"}, r"not '900'\. Example: 'TIMEOUT': 900\.$"),
        ({"MODELS": "auth.User"}, r"labels, not 'auth\.User'\. Example: \["),
        ({"MAX_RESULT_BYTES": "1MB"}, r"\(bytes\), not '1MB'\. Example: 1_048_576"),
        ({"ENABLED": 1}, r"True or False, not 1\. Example: True"),
        ({"LOCK_TIMEOUT": -1}, r"\['LOCK_TIMEOUT'\] must be a number >= 0 \(seconds\)"),
        ({"SOCKET_TIMEOUT": 0}, r"\['SOCKET_TIMEOUT'\] must be a number > 0 \(seconds\)"),
        ({"OUTBOX_POLL_INTERVAL": "10"}, r"\['OUTBOX_POLL_INTERVAL'\] must be None \(off\)"),
        ({"PREFIX": "app*"}, r"glob characters"),
        ({"PREFIX": "app[1]"}, r"glob characters"),
    ],
)
def test_bad_cache_settings_name_the_key_and_the_fix(change: dict[str, Any], message: str) -> None:
    cache = {**settings.DBSCALE["CACHE"], **change}
    with (
        override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}),
        pytest.raises(ImproperlyConfigured, match=message) as raised,
    ):
        options()
    assert not str(raised.value).endswith(". "), "the fix is missing"


def test_cache_clear_with_redis_down_is_a_command_error() -> None:
    from django.core.management import CommandError, call_command

    from django_dbscale.cache.client import gateway

    location = {**settings.CACHES["dbscale"], "LOCATION": "redis://127.0.0.1:1/0"}
    with override_settings(CACHES={**settings.CACHES, "dbscale": location}):
        gateway().close()
        with pytest.raises(CommandError, match="Redis is unreachable"):
            call_command("dbscale", "cache", "clear")
    gateway().close()


def test_a_bad_dimension_names_the_model_and_the_fields() -> None:
    from django_dbscale.cache.dimensions import dimension_fields

    cache = {**settings.DBSCALE["CACHE"], "DIMENSIONS": {"testapp.CBook": ["tags"]}}
    with (
        override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}),
        pytest.raises(ImproperlyConfigured, match="not a concrete column of testapp.CBook"),
    ):
        dimension_fields(CBook)


def test_connections_are_left_usable() -> None:
    connection = connections["default"]
    connection.ensure_connection()
    assert connection.is_usable()
    assert connection.get_autocommit() and not connection.in_atomic_block


def test_cached_reads_nested_in_a_fill_are_read_from_the_database(books: dict[str, Any]) -> None:
    """A prefetch of a model cached by default runs inside the parent's fill: it must add
    its table to the parent's dependencies rather than be served from the cache."""
    cache = {**settings.DBSCALE["CACHE"], "MODELS": ["testapp.CBook"]}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):

        def read() -> list[tuple[str, list[str]]]:
            authors = CAuthor.objects.cache().prefetch_related("books").order_by("name")
            return [(a.name, sorted(b.title for b in a.books.all())) for a in authors]

        assert hit_without_sql(lambda: list(CBook.objects.order_by("id"))) == [
            books["b1"],
            books["b2"],
            books["b3"],
        ]
        hit_without_sql(read)
        CBook.objects.filter(pk=books["b3"].pk).update(title="B0")
        with fresh_context():
            assert read() == [("Ann", ["A1", "A2"]), ("Bob", ["B0"])]


def test_a_query_that_reads_no_table_is_cached(books: dict[str, Any]) -> None:
    assert hit_without_sql(lambda: list(CBook.objects.cache().filter(id__in=[]))) == []


def test_a_sharded_models_default_dimension_is_its_shard_key() -> None:
    from django_dbscale.cache.dimensions import dimension_fields
    from tests.testapp.models_sharding import ShardOrder, ShardProduct

    assert [f.name for f in dimension_fields(ShardOrder)] == ["customer"]
    assert dimension_fields(ShardProduct) == ()


def test_lazy_querysets_raise_what_django_raises(books: dict[str, Any]) -> None:
    with pytest.raises(CBook.DoesNotExist, match="CBook matching query does not exist"):
        CBook.objects.cache().get(title="nope")
    with pytest.raises(CBook.MultipleObjectsReturned, match="it returned 2!"):
        CBook.objects.cache().get(author=books["ann"])
    with pytest.raises(TypeError, match="Cannot filter a query once a slice has been taken"):
        CBook.objects.cache()[:1].get(pk=1)
    with pytest.raises(TypeError, match="Cannot reorder a query once a slice has been taken"):
        CBook.objects.cache()[:1].order_by("id")
    with pytest.raises(TypeError, match="Cannot call select_related"):
        CBook.objects.cache().values("id").select_related("author")
    with pytest.raises(ValueError, match="Negative indexing"):
        CBook.objects.cache()[-1]
    assert CBook.objects.cache()[:1].get().title == "A1"  # a sliced get() keeps the order


# -- time zones and shards in keys --------------------------------------------------------------


def test_the_active_time_zone_is_part_of_the_key_of_zoned_queries() -> None:
    import datetime

    from django.utils import timezone

    # 23:30 UTC on January 1st is January 2nd in Tokyo.
    CEvent.objects.create(at=datetime.datetime(2024, 1, 1, 23, 30, tzinfo=datetime.UTC))
    day = datetime.date(2024, 1, 2)
    for _ in range(2):
        with fresh_context(), timezone.override("UTC"):
            assert CEvent.objects.cache().filter(at__date=day).count() == 0
    with fresh_context(), timezone.override("UTC"), observe() as seen:
        assert CEvent.objects.cache().filter(at__date=day).count() == 0
    assert seen.reasons == ["hit"]
    with fresh_context(), timezone.override("Asia/Tokyo"):
        assert CEvent.objects.cache().filter(at__date=day).count() == 1
        assert CEvent.objects.cache().filter(at__date=day).count() == 1


@cached_queryset(depends_on=["testapp.CEvent"])
def _events_on(day: Any) -> int:
    return CEvent.objects.filter(at__date=day).count()


def test_the_active_time_zone_is_part_of_a_decorated_functions_key() -> None:
    import datetime

    from django.utils import timezone

    CEvent.objects.create(at=datetime.datetime(2024, 1, 1, 23, 30, tzinfo=datetime.UTC))
    day = datetime.date(2024, 1, 2)
    for _ in range(2):
        with fresh_context(), timezone.override("UTC"):
            assert _events_on(day) == 0
    with fresh_context(), timezone.override("Asia/Tokyo"):
        assert _events_on(day) == 1


# -- time-to-live of leases and versions -------------------------------------------------------


def test_a_lease_outlives_the_waiters_wait_so_slow_fills_keep_it() -> None:
    from django_dbscale.cache import engine

    plan = CCounter.objects.cache().filter(name="lease")._dbscale_plan("rows")
    assert plan is not None
    reply = engine._read(plan, b"me")
    assert reply[0] == 0 and reply[2] == 1  # a miss, and the lease
    assert redis().pttl(plan.lease_key) > 10 * options().lock_timeout * 1000 - 100
    assert redis().pttl(plan.lease_key) >= 4900


def test_dimension_versions_live_about_as_long_as_the_entries_built_on_them() -> None:
    ann = CAuthor.objects.create(name="Ann")
    CBook.objects.create(title="A1", author=ann)  # bumps Ann's dimension version
    settle()  # the bump was sent without waiting; this test reads Redis on its own connection
    key = keys.version_key(options().prefix, "default", "testapp_cbook", "d", f"author_id={ann.pk}")
    assert 0 < redis().ttl(key) <= options().timeout + 60  # not VERSION_TIMEOUT (7 days)
    with fresh_context():
        assert [b.title for b in CBook.objects.cache(timeout=3600).filter(author=ann)] == ["A1"]
    settle()  # the fill, too, went out without waiting
    assert 3600 < redis().ttl(key) <= 3660  # extended to the entry's time-to-live
    CBook.objects.create(title="A2", author=ann)
    settle()
    assert 3600 < redis().ttl(key) <= 3660  # a bump never shortens it


def test_two_shards_never_share_a_decorated_functions_entry() -> None:
    from django_dbscale import using_shard
    from tests.testapp.models_sharding import ShardCustomer

    @cached_queryset(depends_on=[ShardCustomer])
    def names() -> list[str]:
        return sorted(ShardCustomer.objects.values_list("name", flat=True))

    for pk in range(1001, 1009):
        ShardCustomer.objects.create(id=pk, name=f"c{pk}")  # placed by their key
    expected = {}
    for shard in ("shard1", "shard2"):
        with using_shard("customers", shard=shard):
            expected[shard] = names.__wrapped__()  # type: ignore[attr-defined]
    assert expected["shard1"] != expected["shard2"]
    hit: set[str] = set()
    for shard in ("shard1", "shard2", "shard1", "shard2"):
        with fresh_context(), using_shard("customers", shard=shard), observe() as seen:
            assert names() == expected[shard]
        assert seen.reasons == ["miss"] if shard not in hit else ["hit"]
        hit.add(shard)
    assert len([k for k in cache_keys("f:*") if not k.endswith((":h", ":l"))]) == 2


# -- composing with other queryset classes ------------------------------------------------------


def test_an_eager_clone_runs_the_other_mixins_clone() -> None:
    from django.db.models import QuerySet

    from django_dbscale.cache import CachedQuerySet

    class TaggedQuerySet(QuerySet[Any]):
        tag: str | None = None

        def _clone(self) -> Any:
            clone = super()._clone()
            clone.tag = self.tag
            return clone

    combined: Any = type("CachedTagged", (CachedQuerySet, TaggedQuerySet), {})
    qs = combined(model=CCounter).cache()
    qs.tag = "kept"
    qs.query.clear_ordering(force=True)  # touching .query makes it eager
    assert qs.filter(name="x").tag == "kept"
    assert qs.filter(name="x").__dict__["_dbscale_timeout"] == options().timeout


def test_a_sharded_model_listed_in_models_is_cached_per_shard_and_invalidated() -> None:
    from django_dbscale.cache import install
    from tests.testapp.models_sharding import ShardCustomer, ShardOrder

    cache = {**settings.DBSCALE["CACHE"], "MODELS": ["testapp.ShardOrder"]}
    managers = [(m, type(m)) for m in ShardOrder._meta.managers]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [setattr(m, "__class__", cls) for m, cls in managers])
        stack.enter_context(override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}))
        install()
        customers = [ShardCustomer.objects.create(id=pk, name=f"c{pk}") for pk in range(1, 9)]
        for c in customers:
            ShardOrder.objects.create(customer=c, status="open")

        def statuses(key: int) -> tuple[list[str], list[str], list[str]]:
            with fresh_context(), observe() as seen:
                orders = ShardOrder.objects.for_key(key).filter(customer_id=key)
                got = list(orders.values_list("status", flat=True))
            return got, seen.reasons, [e["alias"] for e in seen.events]

        shards = {}
        for c in customers:
            assert statuses(c.pk)[:2] == (["open"], ["miss"])
            got, reasons, aliases = statuses(c.pk)
            assert (got, reasons) == (["open"], ["hit"])
            shards[c.pk] = aliases[0]
        assert len(set(shards.values())) > 1
        ShardOrder.objects.filter(customer_id=1).update(status="closed")
        assert statuses(1)[:2] == (["closed"], ["miss"])
        other = next(pk for pk, alias in shards.items() if alias != shards[1])
        assert statuses(other)[:2] == (["open"], ["hit"])  # another shard's entry, intact


def test_explain_says_bypass_while_this_process_has_not_verified_redis(
    books: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_dbscale.cache import continuity, wait_until_verified

    qs = CBook.objects.cache().filter(author=books["ann"])
    list(qs)
    settle()
    assert qs.explain_cache().state == "hit"
    with monkeypatch.context() as patched:
        patched.setattr(continuity, "kick", lambda: None)  # hold the verification back
        continuity.distrust()
        told = CBook.objects.cache().filter(author=books["ann"]).explain_cache()
        assert told.cacheable and told.state == "bypass", told
        assert "wait_until_verified()" in told.reason
        with observe() as seen:
            list(CBook.objects.cache().filter(author=books["ann"]))
        assert seen.reasons == ["bypass:unverified"]  # what the read really did
    assert wait_until_verified()

"""Queryset cache benchmark: hit latency against the floor, against cacheops and cachalot,
Redis round trips per write, and the hit-rate gain of invalidation dimensions.

Run: ``python -m bench.bench_cache`` (or ``python3 noxfile.py -s bench``). It boots the
harness's services, then:

1. **Hit latency vs the floor.** For three reads (``get(pk=...)``, a 10-row ``filter()``,
   ``count()``), time a cache hit against the *floor*: a raw django-redis ``get`` of the
   same rows (pickled by django-redis) plus unpickling. Blocks alternate floor/cache
   (A B B A ...) and the figure is the median of the paired per-block ratios, so machine
   drift (1.5-2x here) cancels out. Redis is reached directly, not through the harness's
   Python TCP proxy.
2. **Key derivation.** The cost of deriving the key of a repeated query shape (a recipe
   ``repr`` and a dict lookup) next to compiling the same queryset's SQL, which the cache
   never does on a hit.
3. **django-cacheops 7.2 and django-cachalot 2.9.1**, each installed into its own
   throwaway virtualenv under ``$TMPDIR`` (``--no-anchors`` skips them) and run in its own
   process, on the same models, rows and Redis, with the same floor measured in that
   process: their hit/floor ratios are comparable to ours across processes. The same
   process then times their miss and write costs (:func:`anchor_costs`), printed beside
   ours in sections 6 and 7: a miss (the read's own entry deleted before each call) against
   the same read with the anchor bypassed in that process (cacheops ``.nocache()``,
   cachalot ``cachalot_disabled()``), and a write against the same ORM write with no
   invalidation (cacheops: a second model on the same table, left out of ``CACHEOPS``;
   cachalot: the table made uncachable before each call of the "without" variant, since
   cachalot invalidates a cachable table on every write even with ``CACHALOT_ENABLED =
   False``). cacheops' ``update()`` does not invalidate: its row is ``invalidated_update()``.
4. **Redis traffic per write**: the commands each library sends for one ``update()``, one
   ``save()`` and one transaction of five ``create()`` (``INFO commandstats`` deltas, minus
   the commands Redis runs inside Lua scripts, counted separately with ``MONITOR``).
5. **Dimensions**: the hit rate of a mixed workload (95% reads of one author's books, 5%
   writes to a random book) with ``cache_dimensions = ("author",)`` and without.

Sections 6-9 (issue 12 §4, :mod:`bench._cachecost`) run in two more processes on the same
services, with databases and Redis reached directly: ``cache`` declares
``DBSCALE["CACHE"]``, ``plain`` does not (the cache is opt-in: that process runs the ORM as
a project without the cache). The parent alternates the variants block by block (A B ...,
then ... B A), each call timed alone with its setup outside the timed region, and quotes
the median of the per-block ratios.

6. **Miss cost**: a miss (the entry evicted before each call) of the three reads above
   against the same read uncached in the ``plain`` process, with the hit and ``.nocache()``
   in the same blocks; and a miss right after a write (``invalidate_model()`` before each
   call). Target: miss <= 1.3x uncached.
7. **Write cost**: ``save()`` of an existing row and ``update()`` of a 10-row filter, cache
   on vs the ``plain`` process. Target: <= 1.2x plain.
8. **Break-even hit ratio** of the 10-row filter: the h where h*hit + (1-h)*miss = uncached.
9. **Correctness**: a cached query's rows changed by raw SQL through Django's cursor
   (autocommit, ``atomic()``, a data-modifying CTE) and by an external connection (without
   change capture, then with ``manage.py dbscale cache capture`` and a relay): is the next
   cached read fresh? Then a breakdown of a miss's and a write's time (wrapped functions and
   SQL statements; ``--profile`` adds cProfile listings).

The targets (and hits <= 1.15x the floor, from section 1) are printed met / NOT MET; like
every figure here they are reported, not asserted: the exit status is 0 whenever it ran.

``BENCH_QUICK=1`` in the environment shortens every timing (few, short blocks: sections 1,
3, 6 and 7, ours and the anchors'), to try a change in a minute or two; its figures are
noisy and not to be quoted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import _cachecost

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = {
    "cacheops": ["django-cacheops==7.2"],
    "cachalot": ["django-cachalot==2.9.1"],
}
BASE_REQUIREMENTS = ["Django>=5.2,<5.3", "psycopg[binary]>=3.1", "django-redis>=5.4"]
AUTHORS = 20
BOOKS_PER_AUTHOR = 10
# BENCH_QUICK=1: few short blocks everywhere (hits, anchors, sections 6-9), to try changes.
QUICK = bool(os.environ.get("BENCH_QUICK"))
BLOCKS = 10 if QUICK else 60
PER_BLOCK = 30 if QUICK else 200
# The anchors' miss and write blocks: as many, as long, as sections 6-9 time ours.
COST_BLOCKS = 6 if QUICK else _cachecost.BLOCKS
COST_PER_BLOCK = 20 if QUICK else _cachecost.PER_BLOCK


def seed_books(author_model: Any, book_model: Any) -> list[Any]:
    """Create the benchmark's rows: AUTHORS authors with BOOKS_PER_AUTHOR books each.

    One function for every process that times the cache (ours, the anchors', the cost
    workers of :mod:`bench._cachecost`), so they all read the same rows. Returns the authors.
    """
    authors = [author_model.objects.create(name=f"a{i}") for i in range(AUTHORS)]
    for author in authors:
        book_model.objects.bulk_create(
            [
                book_model(title=f"{author.name}-{j}", author=author, price=j)
                for j in range(BOOKS_PER_AUTHOR)
            ]
        )
    return authors


def paired(
    a: Callable[[], Any], b: Callable[[], Any], blocks: int, per_block: int
) -> dict[str, float]:
    """Median per-call seconds of *a* and *b* over alternating blocks, and paired ratios."""
    a_times: list[float] = []
    b_times: list[float] = []

    def per_call(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        return (time.perf_counter() - start) / per_block

    for i in range(blocks):
        if i % 2:
            tb, ta = per_call(b), per_call(a)
        else:
            ta, tb = per_call(a), per_call(b)
        a_times.append(ta)
        b_times.append(tb)
    ratios = [tb / ta for ta, tb in zip(a_times, b_times, strict=True)]
    return {
        "floor_us": statistics.median(a_times) * 1e6,
        "cache_us": statistics.median(b_times) * 1e6,
        "ratio": statistics.median(ratios),
        "ratio_p10": statistics.quantiles(ratios, n=10)[0],
        "ratio_p90": statistics.quantiles(ratios, n=10)[-1],
    }


Timed = tuple[Callable[[], Any] | None, Callable[[], Any]]


def paired_setup(
    variants: list[Timed], blocks: int, per_block: int, warm: int = 2
) -> list[dict[str, float]]:
    """:func:`paired` with a per-call setup outside the timed region, for several variants.

    Each variant is ``(setup, fn)``: every call of *fn* is timed alone, after its *setup*
    (evicting an entry, say), as ``op_time`` of :mod:`bench._cachecost` does. Blocks
    alternate the order (A B, then B A, ...), the first *warm* blocks are not kept, and each
    variant's ratio is the median of its per-block ratios to variant 0 (p10-p90 beside).
    """

    def time_block(j: int) -> float:
        return _cachecost.seconds_per_call(*variants[j], per_block)

    return _cachecost.alternate(time_block, len(variants), blocks, warm)


class Monitor:
    """Count commands clients send, and those Lua scripts run, with Redis ``MONITOR``."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.sent: list[str] = []
        self.in_lua: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for event in monitor.listen():
                command = event["command"].split(" ", 1)[0].upper()
                if command == "ECHO" and "dbscale-bench-stop" in event["command"]:
                    return
                if event.get("client_type") == "lua" or event.get("client_address") == "lua":
                    self.in_lua.append(command)
                else:
                    self.sent.append(command)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self.client.echo("dbscale-bench-stop")
        self._thread.join(5)


def write_traffic(
    url: str, update: Callable[[], Any], save: Callable[[], Any], tx: Callable[[], Any]
) -> dict[str, Any]:
    """Return the Redis commands sent (and run inside Lua) by each kind of write."""
    result: dict[str, Any] = {}
    for name, fn in (("update()", update), ("save()", save), ("5 creates in atomic()", tx)):
        fn()  # warm (script loading, connections)
        with Monitor(url) as monitor:
            fn()
        # Connection handshakes (a new pooled connection) are not per-write traffic.
        sent = [c for c in monitor.sent if c not in ("ECHO", "HELLO", "SELECT", "CLIENT", "AUTH")]
        result[name] = {
            "sent": len(sent),
            "commands": sorted(set(sent)),
            "in_lua": len(monitor.in_lua),
        }
    return result


# -- our side -------------------------------------------------------------------------------


def ours(redis_url: str) -> dict[str, Any]:
    # Every database and Redis reached directly, as in the miss/write workers. With the
    # test settings (the harness's TCP proxies, whose threads run in this process, in the
    # path of the databases and of connections made before the override below) hits
    # measured 1.3-1.4x the floor on 2026-12-07, against 1.1x with these.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings_cachecost")
    import django

    django.setup()
    from django.conf import settings
    from django.core.cache import caches
    from django.core.management import call_command
    from django.db import connections, transaction
    from django.test.utils import override_settings

    from django_dbscale import consistency
    from django_dbscale.cache import planning
    from django_dbscale.cache.client import gateway
    from django_dbscale.cache.signals import cache_read
    from tests.testapp.models_cache import CAuthor, CBook

    call_command("migrate", database="default", run_syncdb=True, verbosity=0)
    caches_setting = {**settings.CACHES}
    caches_setting["dbscale"] = {**caches_setting["dbscale"], "LOCATION": redis_url}
    override_settings(
        CACHES=caches_setting, DBSCALE={**settings.DBSCALE, "REPLICA_CHECK_INTERVAL": 1.0}
    ).enable()
    client = gateway().client
    client.flushdb()
    CBook.objects.all().delete()
    CAuthor.objects.all().delete()
    authors = seed_books(CAuthor, CBook)
    book = CBook.objects.order_by("id").first()
    assert book is not None
    author_id = authors[3].pk
    consistency.open_context()

    workloads: dict[str, Callable[[], Any]] = {
        "get(pk=...)": lambda: CBook.objects.cache().get(pk=book.pk),
        "filter() 10 rows": lambda: list(
            CBook.objects.cache().filter(author_id=author_id).order_by("id")
        ),
        "count()": lambda: CBook.objects.cache().filter(author_id=author_id).count(),
    }
    floor_values: dict[str, Any] = {
        "get(pk=...)": CBook.objects.get(pk=book.pk),
        "filter() 10 rows": list(CBook.objects.filter(author_id=author_id).order_by("id")),
        "count()": CBook.objects.filter(author_id=author_id).count(),
    }
    django_redis = caches["dbscale"]
    results: dict[str, Any] = {"hits": {}}
    hits = [0]

    def on_read(sender: Any, hit: bool, **kwargs: Any) -> None:
        hits[0] += hit

    for name, read in workloads.items():
        key = f"bench:floor:{name}"
        django_redis.set(key, floor_values[name], timeout=3600)
        for _ in range(3):
            read()
        cache_read.connect(on_read)
        hits[0] = 0
        read()
        cache_read.disconnect(on_read)
        assert hits[0] == 1, f"{name} is not a hit"
        results["hits"][name] = paired(
            lambda key=key: django_redis.get(key), read, BLOCKS, PER_BLOCK
        )
        results["hits"][name]["bytes"] = len(
            pickle.dumps(floor_values[name], pickle.HIGHEST_PROTOCOL)
        )

    # Key derivation of a repeated shape vs compiling its SQL.
    def derive() -> Any:
        return (
            CBook.objects.cache().filter(author_id=author_id).order_by("id")._dbscale_plan("rows")
        )

    def compile_sql() -> Any:
        qs = CBook.objects.filter(author_id=author_id).order_by("id")
        return qs.query.get_compiler("default").as_sql()

    derive()
    results["key"] = {
        "derive_us": statistics.median(_repeat(derive)) * 1e6,
        "compile_us": statistics.median(_repeat(compile_sql)) * 1e6,
        "memoised_plans": len(planning._plans),
    }

    counter = [0]

    def update() -> None:
        counter[0] += 1
        CBook.objects.filter(pk=book.pk).update(price=counter[0])

    def save() -> None:
        obj = CBook.objects.get(pk=book.pk)
        obj.price += 1
        obj.save()

    def tx() -> None:
        with transaction.atomic():
            for i in range(5):
                CBook.objects.create(title=f"tx{i}", author_id=author_id)

    results["writes"] = write_traffic(redis_url, update, save, tx)
    results["dimensions"] = dimension_gain(authors)
    connections.close_all()
    return results


def _repeat(fn: Callable[[], Any], rounds: int = 30, n: int = 300) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n)
    return times


def dimension_gain(authors: list[Any]) -> dict[str, Any]:
    """Hit rate of 95% author-filtered reads / 5% single-book writes, with and without dims."""
    from django.conf import settings
    from django.test.utils import override_settings

    from django_dbscale.cache import planning, stats
    from django_dbscale.cache.client import gateway
    from tests.testapp.models_cache import CBook

    book_ids = list(CBook.objects.values_list("id", flat=True))
    rates: dict[str, Any] = {}
    for label, dims in (("with dimension author", None), ("table-wide only", [])):
        cache = dict(settings.DBSCALE["CACHE"])
        if dims is not None:
            cache["DIMENSIONS"] = {"testapp.CBook": dims}
        with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
            gateway().client.flushdb()
            planning.clear()
            stats.reset()
            rng = random.Random(42)
            reads = writes = 0
            for _ in range(6000):
                if rng.random() < 0.05:
                    CBook.objects.filter(pk=rng.choice(book_ids)).update(price=rng.randrange(1000))
                    writes += 1
                else:
                    list(CBook.objects.cache().filter(author_id=rng.choice(authors).pk))
                    reads += 1
            counts = stats.local_counts()
            hit = counts.get(("testapp.CBook", "hit"), 0)
            rates[label] = {"reads": reads, "writes": writes, "hits": hit, "hit_rate": hit / reads}
    return rates


# -- the anchors, each in its own virtualenv and process --------------------------------------


def anchor_worker(name: str, out: str) -> None:
    """Run inside the anchor's venv: same models, rows and workloads; write JSON to *out*."""
    import django
    from django.conf import settings

    pg_host, pg_port = os.environ["DBSCALE_TEST_PG1"].split(":")
    app = "cacheops" if name == "cacheops" else "cachalot"
    conf: dict[str, Any] = {
        "INSTALLED_APPS": ["django.contrib.contenttypes", "bench", app],
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": os.environ["BENCH_ANCHOR_DB"],
                "USER": os.environ.get("DBSCALE_TEST_PG_USER", "postgres"),
                "PASSWORD": os.environ.get("DBSCALE_TEST_PG_PASSWORD", ""),
                "HOST": pg_host,
                "PORT": pg_port,
            }
        },
        "CACHES": {
            "default": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": os.environ["BENCH_REDIS_URL"],
            }
        },
        "USE_TZ": True,
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "SECRET_KEY": "bench",
    }
    if name == "cacheops":
        conf["CACHEOPS_REDIS"] = os.environ["BENCH_REDIS_URL"]
        # The cached models by name: BenchBookPlain (the "without" of the write costs)
        # shares BenchBook's table and must stay out of cacheops.
        profile = {"ops": "all", "timeout": 900}
        conf["CACHEOPS"] = {"bench.benchauthor": profile, "bench.benchbook": profile}
    settings.configure(**conf)
    django.setup()
    from django.core.cache import caches
    from django.db import connection, models, transaction
    from django.test.utils import CaptureQueriesContext

    class BenchAuthor(models.Model):  # noqa: DJ008 - benchmark rows are never printed
        name = models.CharField(max_length=100)

        class Meta:
            app_label = "bench"

    class BenchBook(models.Model):  # noqa: DJ008 - benchmark rows are never printed
        title = models.CharField(max_length=100)
        price = models.IntegerField(default=0)
        author = models.ForeignKey(BenchAuthor, null=True, on_delete=models.SET_NULL)
        publisher_id = models.BigIntegerField(null=True)
        shelf_id = models.BigIntegerField(null=True)

        class Meta:
            app_label = "bench"
            ordering = ["id"]

    class BenchBookPlain(models.Model):  # noqa: DJ008 - benchmark rows are never printed
        """BenchBook's table under a model the anchor does not handle (cacheops)."""

        title = models.CharField(max_length=100)
        price = models.IntegerField(default=0)
        author = models.ForeignKey(
            BenchAuthor, null=True, on_delete=models.DO_NOTHING, related_name="+"
        )
        publisher_id = models.BigIntegerField(null=True)
        shelf_id = models.BigIntegerField(null=True)

        class Meta:
            app_label = "bench"
            ordering = ["id"]
            managed = False
            db_table = BenchBook._meta.db_table

    with connection.schema_editor() as editor:
        for model in (BenchBook, BenchAuthor):
            editor.execute(f"DROP TABLE IF EXISTS {model._meta.db_table} CASCADE")
        editor.create_model(BenchAuthor)
        editor.create_model(BenchBook)
    redis_client = caches["default"].client.get_client(write=True)
    redis_client.flushdb()
    authors = seed_books(BenchAuthor, BenchBook)
    book = BenchBook.objects.order_by("id").first()
    assert book is not None
    author_id = authors[3].pk

    def qs() -> Any:
        return BenchBook.objects.cache() if name == "cacheops" else BenchBook.objects.all()

    workloads: dict[str, Callable[[], Any]] = {
        "get(pk=...)": lambda: qs().get(pk=book.pk),
        "filter() 10 rows": lambda: list(qs().filter(author_id=author_id).order_by("id")),
        "count()": lambda: qs().filter(author_id=author_id).count(),
    }
    floor_values = {
        "get(pk=...)": book,
        "filter() 10 rows": list(BenchBook.objects.filter(author_id=author_id).order_by("id")),
        "count()": 10,
    }
    django_redis = caches["default"]
    results: dict[str, Any] = {"hits": {}}
    for wname, read in workloads.items():
        key = f"bench:floor:{wname}"
        django_redis.set(key, floor_values[wname], timeout=3600)
        for _ in range(3):
            read()
        with CaptureQueriesContext(connection) as queries:
            read()
        assert len(queries) == 0, f"{name}: {wname} is not a hit: {queries.captured_queries}"
        results["hits"][wname] = paired(
            lambda key=key: django_redis.get(key), read, BLOCKS, PER_BLOCK
        )

    counter = [0]

    def update() -> None:
        counter[0] += 1
        BenchBook.objects.filter(pk=book.pk).update(price=counter[0])

    def save() -> None:
        obj = BenchBook.objects.get(pk=book.pk)
        obj.price += 1
        obj.save()

    def tx() -> None:
        with transaction.atomic():
            for i in range(5):
                BenchBook.objects.create(title=f"tx{i}", author_id=author_id)

    results["writes"] = write_traffic(os.environ["BENCH_REDIS_URL"], update, save, tx)
    try:
        results["costs"] = anchor_costs(
            name,
            BenchBook,
            BenchBookPlain,
            {
                "book": book.pk,
                "author": author_id,
                "save_author": authors[5].pk,
                "write_author": authors[7].pk,
                "create_author": authors[9].pk,
            },
        )
    except Exception:  # reported beside the others; the hit figures above still stand
        import traceback

        results["costs"] = f"miss/write costs failed:\n{traceback.format_exc()}"
    import importlib.metadata

    results["version"] = importlib.metadata.version(f"django-{app}")
    Path(out).write_text(json.dumps(results))


def anchor_costs(
    name: str, book_model: Any, plain_model: Any, ids: dict[str, int]
) -> dict[str, Any]:
    """The anchor's miss and write costs (sections 6-7 of ours), in the anchor's process.

    Reads: *uncached* is the same read with the anchor bypassed in this process, *miss* the
    read after deleting just its own entry (outside the timed region), *hit* as it comes.
    Writes: the anchor's write against the same ORM write with no invalidation at all.
    Timed with :func:`paired_setup`, as many blocks as ours.
    """
    from django.core.cache import caches
    from django.db import connection
    from django.db.models import F
    from django.test.utils import CaptureQueriesContext

    book_id, author_id = ids["book"], ids["author"]
    reads: dict[str, Callable[[Any], Any]] = {
        "get(pk=...)": lambda qs: qs.get(pk=book_id),
        "filter() 10 rows": lambda qs: list(qs.filter(author_id=author_id).order_by("id")),
        "count()": lambda qs: qs.filter(author_id=author_id).count(),
    }
    cached: dict[str, Callable[[], Any]] = {}
    uncached: dict[str, Callable[[], Any]] = {}
    keys: dict[str, str] = {}
    notes: dict[str, str] = {}
    if name == "cacheops":
        import cacheops.query  # type: ignore[import-not-found]  # only in its venv
        from cacheops.redis import redis_client  # type: ignore[import-not-found]

        for rname, read in reads.items():

            def through(read: Callable[[Any], Any] = read) -> Any:
                return read(book_model.objects.cache())

            def bypass(read: Callable[[Any], Any] = read) -> Any:
                return read(book_model.objects.nocache())

            cached[rname], uncached[rname] = through, bypass
        # The key of a read is the one cacheops computes for it (qs._cache_key() for a fetch,
        # cached_as()'s key for count()): recorded from the getting() it reads through.
        original_getting = cacheops.query.getting
        seen: list[str] = []

        def spy(key: str, *args: Any, **kwargs: Any) -> Any:
            seen.append(key)
            return original_getting(key, *args, **kwargs)

        cacheops.query.getting = spy
        try:
            for rname, fn in cached.items():
                seen.clear()
                fn()
                assert len(seen) == 1, f"cacheops: {rname} read {len(seen)} keys"
                keys[rname] = seen[0]
        finally:
            cacheops.query.getting = original_getting
        filter_qs = book_model.objects.cache().filter(author_id=author_id).order_by("id")
        assert keys["filter() 10 rows"] == filter_qs._cache_key()

        def delete(key: str) -> Any:
            return redis_client.delete(key)

        notes["uncached"] = ".nocache() (cacheops' QuerySet with caching off)"
        notes["miss"] = "DEL of the read's own key (qs._cache_key(); cached_as key for count())"
    else:
        from cachalot.api import cachalot_disabled  # type: ignore[import-not-found]
        from cachalot.settings import cachalot_settings  # type: ignore[import-not-found]

        for rname, read in reads.items():

            def through(read: Callable[[Any], Any] = read) -> Any:
                return read(book_model.objects.all())

            def bypass(read: Callable[[Any], Any] = read) -> Any:
                with cachalot_disabled():
                    return read(book_model.objects.all())

            cached[rname], uncached[rname] = through, bypass
        # cachalot keys a query by CACHALOT_QUERY_KEYGEN(compiler) (sha1 of alias, SQL and
        # params): recorded from one call; the table's invalidation stamp is left alone.
        original_keygen = cachalot_settings.CACHALOT_QUERY_KEYGEN
        made: list[str] = []

        def keygen(compiler: Any) -> str:
            key: str = original_keygen(compiler)
            made.append(key)
            return key

        cachalot_settings.CACHALOT_QUERY_KEYGEN = keygen
        try:
            for rname, fn in cached.items():
                made.clear()
                fn()
                assert len(made) == 1, f"cachalot: {rname} made {len(made)} keys"
                keys[rname] = made[0]
        finally:
            cachalot_settings.CACHALOT_QUERY_KEYGEN = original_keygen
        cache = caches[cachalot_settings.CACHALOT_CACHE]

        def delete(key: str) -> Any:
            return cache.delete(key)

        notes["uncached"] = "inside cachalot_disabled() (its read wrapper runs the query)"
        notes["miss"] = "delete of the read's own entry (CACHALOT_QUERY_KEYGEN key)"

    checks: dict[str, str] = {}
    results: dict[str, Any] = {"reads": {}, "writes": {}, "notes": notes, "checks": checks}
    for rname in reads:
        fn, key = cached[rname], keys[rname]

        def evict(key: str = key) -> None:
            delete(key)

        for kind, setup, want in (("miss", evict, 1), ("hit", None, 0), ("uncached", None, 1)):
            call = uncached[rname] if kind == "uncached" else fn
            got = []
            for _ in range(3):
                if setup is not None:
                    setup()
                with CaptureQueriesContext(connection) as queries:
                    call()
                got.append(len(queries))
            checks[f"{kind}:{rname}"] = "ok" if got == [want] * 3 else f"queries {got}"
        figures = paired_setup(
            [(None, uncached[rname]), (evict, fn), (None, fn)], COST_BLOCKS, COST_PER_BLOCK
        )
        results["reads"][rname] = dict(zip(("uncached", "miss", "hit"), figures, strict=True))

    save_id = book_model.objects.filter(author_id=ids["save_author"]).order_by("id")[0].pk
    save_obj = book_model.objects.get(pk=save_id)
    plain_obj = plain_model.objects.get(pk=save_id)

    def save(obj: Any) -> None:
        obj.price += 1
        obj.save()

    write_author, create_author = ids["write_author"], ids["create_author"]
    names = itertools.count()
    if name == "cacheops":
        # cacheops' update() does not invalidate (its entries would read stale): a project
        # keeping them fresh calls invalidated_update().
        writes: dict[str, tuple[Timed, Timed]] = {
            "save()": ((None, lambda: save(plain_obj)), (None, lambda: save(save_obj))),
            "update() 10 rows": (
                (
                    None,
                    lambda: plain_model.objects.filter(author_id=write_author).update(
                        price=F("price") + 1
                    ),
                ),
                (
                    None,
                    lambda: book_model.objects.filter(author_id=write_author).invalidated_update(
                        price=F("price") + 1
                    ),
                ),
            ),
            "create()": (
                (
                    None,
                    lambda: plain_model.objects.create(
                        title=f"w{next(names)}", author_id=create_author
                    ),
                ),
                (
                    None,
                    lambda: book_model.objects.create(
                        title=f"w{next(names)}", author_id=create_author
                    ),
                ),
            ),
        }
        notes["without"] = (
            "the same write through BenchBookPlain (same table, left out of CACHEOPS: no "
            "signals, no invalidation)"
        )
        notes["update() 10 rows"] = (
            "cacheops: .invalidated_update() (its .update() does not invalidate)"
        )

        def restore() -> None:
            """Nothing to restore: cacheops' variants change no setting."""
    else:
        # cachalot invalidates on every write compiler of a cachable table, even with
        # CACHALOT_ENABLED = False (only reads go unpatched then), and a table's
        # cachability is per table: "without" makes the table uncachable for its calls
        # (set in the per-call setup, outside the timed region); its write wrapper then
        # checks the table and runs the write.
        table = book_model._meta.db_table
        cachable = cachalot_settings.CACHALOT_UNCACHABLE_TABLES
        uncachable = frozenset(cachable | {table})

        def on() -> None:
            cachalot_settings.CACHALOT_UNCACHABLE_TABLES = cachable

        def off() -> None:
            cachalot_settings.CACHALOT_UNCACHABLE_TABLES = uncachable

        def update() -> Any:
            return book_model.objects.filter(author_id=write_author).update(price=F("price") + 1)

        def create() -> Any:
            return book_model.objects.create(title=f"w{next(names)}", author_id=create_author)

        writes = {
            "save()": ((off, lambda: save(save_obj)), (on, lambda: save(save_obj))),
            "update() 10 rows": ((off, update), (on, update)),
            "create()": ((off, create), (on, create)),
        }
        notes["without"] = (
            "the same write with the table in CACHALOT_UNCACHABLE_TABLES (set before each "
            "call, untimed): no invalidation; cachalot's write wrapper still runs"
        )

        def restore() -> None:
            on()

    # Does each variant invalidate? A whole-table count() cached before the write is read
    # again after it: a query means its entry was invalidated.
    probe = book_model.objects.cache if name == "cacheops" else book_model.objects.all

    def invalidates(setup: Callable[[], Any] | None, fn: Callable[[], Any]) -> bool:
        restore()  # the last timed call may have left the table uncachable (cachalot)
        probe().count()
        if setup is not None:
            setup()
        fn()
        restore()
        with CaptureQueriesContext(connection) as queries:
            probe().count()
        return len(queries) > 0

    try:
        for wname, (without, with_) in writes.items():
            for kind, variant, want in (("without", without, False), ("with", with_, True)):
                did = invalidates(*variant)
                checks[f"write {kind}:{wname}"] = (
                    "ok" if did == want else f"invalidated: {'yes' if did else 'no'}"
                )
            plain, cache_on = paired_setup([without, with_], COST_BLOCKS, COST_PER_BLOCK)
            results["writes"][wname] = {"plain": plain, "cache": cache_on}
    finally:
        restore()
    return results


def run_anchor(name: str, services: Any, redis_url: str) -> dict[str, Any] | str:
    """Create the anchor's venv (cached under $TMPDIR), run the worker, return its JSON."""
    venv = Path(tempfile.gettempdir()) / f"dbscale-bench-{name}"
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", *BASE_REQUIREMENTS, *ANCHORS[name]],
                check=True,
            )
        dbname = f"dbscale_bench_{name}"
        existing = services.pg1.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if not existing:
            services.pg1.execute(f'CREATE DATABASE "{dbname}"')
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = handle.name
        env = {
            **os.environ,
            **services.env(),
            "BENCH_ANCHOR_DB": dbname,
            "BENCH_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/3",
            "PYTHONPATH": str(ROOT),
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)
        subprocess.run(
            [str(python), "-m", "bench.bench_cache", "--anchor", name, "--out", out],
            check=True,
            env=env,
            cwd=str(ROOT),
        )
        return json.loads(Path(out).read_text())  # type: ignore[no-any-return]
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"could not run: {exc}"


# -- report --------------------------------------------------------------------------------------


def report(mine: dict[str, Any], anchors: dict[str, Any]) -> None:
    print("\n== Cache hit latency: median of paired per-block ratios to the floor")
    print("   floor = raw django-redis get of the same rows + unpickle, same process, same Redis")
    print(
        f"{'read':<18} {'library':<22} {'floor':>10} {'hit':>10} {'hit/floor':>10} {'p10-p90':>13}"
    )
    libraries = [("django_dbscale", mine)] + [
        (f"cacheops {a['version']}" if n == "cacheops" else f"cachalot {a['version']}", a)
        for n, a in anchors.items()
        if isinstance(a, dict)
    ]
    for read in mine["hits"]:
        for label, data in libraries:
            h = data["hits"][read]
            print(
                f"{read:<18} {label:<22} {h['floor_us']:>8.1f}µs {h['cache_us']:>8.1f}µs "
                f"{h['ratio']:>10.2f} {h['ratio_p10']:>6.2f}-{h['ratio_p90']:<6.2f}"
            )
    for name, data in anchors.items():
        if not isinstance(data, dict):
            print(f"{name}: {data}")
    key = mine["key"]
    print("\n== Key derivation of a repeated query shape (no SQL compiled on a hit)")
    print(
        f"   derive plan from the recipe: {key['derive_us']:.1f} µs; "
        f"compiling the SQL: {key['compile_us']:.1f} µs"
    )
    print("\n== Redis commands per write (sent by the client; run inside Lua in parentheses)")
    print(f"{'write':<24} " + " ".join(f"{label:<26}" for label, _ in libraries))
    for write in mine["writes"]:
        cells = []
        for _, data in libraries:
            w = data["writes"][write]
            cells.append(f"{w['sent']} {','.join(w['commands'])} ({w['in_lua']})"[:26])
        print(f"{write:<24} " + " ".join(f"{c:<26}" for c in cells))
    print("\n== Invalidation dimensions: 95% reads of one author's books, 5% writes to one book")
    for label, d in mine["dimensions"].items():
        print(
            f"   {label:<24} hit rate {d['hit_rate'] * 100:5.1f}%  "
            f"({d['hits']}/{d['reads']} reads, {d['writes']} writes)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--anchor", choices=sorted(ANCHORS))
    parser.add_argument("--out")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--json", help="Also write all figures to this file.")
    parser.add_argument(
        "--costs-only", action="store_true", help="Run only sections 6-9 (miss/write cost)."
    )
    parser.add_argument("--no-costs", action="store_true", help="Skip sections 6-9.")
    parser.add_argument("--profile", action="store_true", help="Add cProfile listings (6-9).")
    args = parser.parse_args()
    if args.anchor:
        anchor_worker(args.anchor, args.out)
        return 0
    sys.path.insert(0, str(ROOT))
    from django_dbscale.testing.harness import get_services

    services = get_services()
    redis_url = services.redis.direct_url
    mine: dict[str, Any] = {}
    anchors: dict[str, Any] = {}
    if not args.costs_only:
        mine = ours(redis_url)
        if not args.no_anchors:
            for name in ANCHORS:
                anchors[name] = run_anchor(name, services, redis_url)
        report(mine, anchors)
    if not args.no_costs:
        mine["costs"] = _cachecost.run(
            services, blocks=COST_BLOCKS, per_block=COST_PER_BLOCK, profile=args.profile
        )
        # The anchors' miss and write figures go in the same tables ("-" where not run).
        mine["costs"]["verdicts"] = _cachecost.report(
            mine["costs"],
            mine.get("hits"),
            {name: anchors.get(name) for name in ANCHORS},
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"dbscale": mine, "anchors": anchors}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

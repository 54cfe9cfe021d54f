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
   process: their hit/floor ratios are comparable to ours across processes.
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
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = {
    "cacheops": ["django-cacheops==7.2"],
    "cachalot": ["django-cachalot==2.9.1"],
}
BASE_REQUIREMENTS = ["Django>=5.2,<5.3", "psycopg[binary]>=3.1", "django-redis>=5.4"]
AUTHORS = 20
BOOKS_PER_AUTHOR = 10
BLOCKS = 60
PER_BLOCK = 200


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
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
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
        conf["CACHEOPS"] = {"bench.*": {"ops": "all", "timeout": 900}}
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
    import importlib.metadata

    results["version"] = importlib.metadata.version(f"django-{app}")
    Path(out).write_text(json.dumps(results))


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
        from bench import _cachecost

        mine["costs"] = _cachecost.run(services, profile=args.profile)
        mine["costs"]["verdicts"] = _cachecost.report(mine["costs"], mine.get("hits"))
    if args.json:
        Path(args.json).write_text(json.dumps({"dbscale": mine, "anchors": anchors}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

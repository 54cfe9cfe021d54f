"""Throughput of a mixed workload with and without the library, and routing overhead
side by side with django-multidb-router.

Run: ``python -m bench.bench_throughput [--duration S] [--blocks B] [--short]`` (or
``python3 noxfile.py -s bench``). It boots the harness's services once, then:

1. **Throughput.** For N = 1, 2 and 4 worker processes and two variants, the same mixed
   workload runs for ``--duration`` seconds per block:

   - ``plain``: Django's own ``django.db.backends.postgresql``, no routers, one database
     (the primary), a plain ``models.Model`` on the same table: the floor, a project
     without the library;
   - ``dbscale``: the library's backend, ``ShardRouter`` + ``ReplicaRouter`` with the
     primary's streaming replica, the queryset cache in Redis, a consistency context per
     operation (what ``ConsistencyMiddleware`` opens per request).

   One operation is one of: 40% a repeated read of one of 5 "hot" authors' 10 books
   (``.cache()`` in ``dbscale``: cache hits unless a write invalidated them), 40% a
   ``get(pk=...)`` of a random book among 200 (not cached: the replica), 15% a single-row
   ``update()``, 5% read-after-own-write (update a row's title, read it back in the same
   context; a read that does not return the value just written is counted as stale).
   Blocks alternate the variants (A B B A ...) so machine drift cancels; the figure is the
   median of the paired per-block ratios dbscale / plain, next to the median ops/s of each.
   Where ``dbscale``'s reads were served (replica, cache, primary) is counted by the
   library's own counters (``consistency.route_counts``, ``cache.stats``) in each worker
   and summed.
2. **Routing overhead against django-multidb-router 0.11** (``PinningReplicaRouter``,
   installed with ``pip --target`` into ``$TMPDIR/dbscale-bench-multidb``, imported by a
   process of this interpreter so both sides run the same Django and psycopg;
   ``--no-anchor`` skips it). Two processes read the same ``Note`` row from the same
   streaming replica, reached directly: (A) ``Note.objects.using(replica).get(pk=...)``,
   routing skipped; (B) ``Note.objects.get(pk=...)`` through the router. Rounds run the
   four (process, read) blocks back to back in alternating order; the figures are medians
   of the per-round B - A in each process (the router's cost on a real read) and of the
   paired difference and ratio between the two processes' B - A.

Figures are reported, not asserted; the exit status is 1 only when a read-after-own-write
returned stale data or a worker failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "dbscale")
WORKER_COUNTS = (1, 2, 4)
MULTIDB = "django-multidb-router==0.11"
MULTIDB_DIR = Path(tempfile.gettempdir()) / "dbscale-bench-multidb"
HOT_AUTHORS = 5
#: Cumulative shares of the operation kinds (the rest: read-after-own-write).
MIX = (("hot_read", 0.40), ("cold_read", 0.80), ("write", 0.95))


# -- worker side ------------------------------------------------------------------------------


def _configure_plain(replica: bool = False, routers: list[str] | None = None) -> None:
    """Settings of a project without the library: Django's backend on the harness's servers."""
    from django.conf import settings

    def database(server: str) -> dict[str, Any]:
        host, port = os.environ[f"DBSCALE_TEST_{server}"].split(":")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "dbscale",
            "USER": os.environ.get("DBSCALE_TEST_PG_USER", "postgres"),
            "PASSWORD": os.environ.get("DBSCALE_TEST_PG_PASSWORD", ""),
            "HOST": host,
            "PORT": port,
        }

    databases = {"default": database("PG1")}
    if replica:
        databases["replica"] = {**database("PG1_REPLICA"), "TEST": {"MIRROR": "default"}}
    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "bench"],
        DATABASES=databases,
        DATABASE_ROUTERS=routers or [],
        REPLICA_DATABASES=["replica"] if replica else [],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        SECRET_KEY="bench",
    )


def _plain_models() -> tuple[Any, Any]:
    """Plain ``models.Model`` classes on the tables of ``CBook`` and ``Note`` (unmanaged)."""
    from django.db import models

    class PBook(models.Model):  # noqa: DJ008 - benchmark rows are never printed
        title = models.CharField(max_length=100)
        price = models.IntegerField(default=0)
        author_id = models.BigIntegerField(null=True)
        publisher_id = models.BigIntegerField(null=True)
        shelf_id = models.BigIntegerField(null=True)

        class Meta:
            app_label = "bench"
            db_table = "testapp_cbook"
            managed = False
            ordering = ["id"]

    class PNote(models.Model):  # noqa: DJ008 - benchmark rows are never printed
        title = models.CharField(max_length=200)
        body = models.TextField(default="")

        class Meta:
            app_label = "bench"
            db_table = "testapp_note"
            managed = False

    return PBook, PNote


def _setup_dbscale(*, cache: bool, replica: str = "default_replica") -> None:
    """The test settings with every server reached directly, production check interval."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings_cachecost"
    os.environ["BENCH_CACHE"] = "on" if cache else "off"
    import django

    django.setup()
    from django.conf import settings
    from django.test.utils import override_settings

    override_settings(
        DBSCALE={
            **settings.DBSCALE,
            "REPLICA_CHECK_INTERVAL": 1.0,  # the production default
            "REPLICAS": {**settings.DBSCALE["REPLICAS"], "default": [replica]},
        }
    ).enable()


def _wait_for_replica(timeout: float = 15.0) -> None:
    """Wait until the default primary's replica has replayed its current WAL position."""
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()")
        (target,) = cursor.fetchone()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connections["default_replica"].cursor() as cursor:
            cursor.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [str(target)])
            (ok,) = cursor.fetchone()
        if ok:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the replica did not replay {target} within {timeout} s")


class ThroughputWorker:
    """One worker process of a variant: runs the mixed workload between two wall times."""

    def __init__(self, variant: str, slot: int) -> None:
        self.variant = variant
        self.slot = slot
        if variant == "plain":
            _configure_plain()
            import django

            django.setup()
            self.book, _ = _plain_models()
            self.context: Callable[[], contextlib.AbstractContextManager[Any]] = (
                contextlib.nullcontext
            )
        else:
            _setup_dbscale(cache=True)
            from django_dbscale import consistency
            from tests.testapp.models_cache import CBook

            self.book = CBook
            self.context = consistency.consistency_context
        self.book_ids: list[int] = []
        self.own_ids: list[int] = []
        self.hot_authors: list[int] = []

    def op_seed(self) -> dict[str, Any]:
        """Recreate the rows and flush Redis (a ``dbscale`` worker); wait for the replica."""
        from django.core.management import call_command

        from bench.bench_cache import seed_books
        from django_dbscale import replicas
        from django_dbscale.cache.client import gateway
        from tests.testapp.models_cache import CAuthor, CBook

        call_command("migrate", database="default", run_syncdb=True, verbosity=0)
        gateway().client.flushdb()
        CBook.objects.all().delete()
        CAuthor.objects.all().delete()
        authors = seed_books(CAuthor, CBook)
        _wait_for_replica()
        replicas.monitor.refresh()
        return {
            "books": sorted(CBook.objects.values_list("id", flat=True)),
            "hot_authors": [a.pk for a in authors[:HOT_AUTHORS]],
        }

    def op_prepare(self, books: list[int], hot_authors: list[int], warm: float) -> dict[str, Any]:
        """Take the row ids; warm connections and the cache for *warm* seconds."""
        self.book_ids = books
        self.hot_authors = hot_authors
        # Rows only this worker's read-after-own-write touches (per slot, across variants
        # the blocks never overlap): a concurrent worker's write is never taken for staleness.
        self.own_ids = books[self.slot :: 4]
        if self.variant == "dbscale":
            from django_dbscale import replicas

            replicas.monitor.refresh()
        now = time.time()
        return self.op_run(now, now + warm, seed=-1 - self.slot)

    def _operations(self, rng: random.Random) -> dict[str, Callable[[], bool]]:
        from django.db.models import F

        book = self.book
        cached = self.variant == "dbscale"

        def hot_read() -> bool:
            qs = book.objects.cache() if cached else book.objects.all()
            return len(list(qs.filter(author_id=rng.choice(self.hot_authors)).order_by("id"))) > 0

        def cold_read() -> bool:
            book.objects.get(pk=rng.choice(self.book_ids))
            return True

        def write() -> bool:
            book.objects.filter(pk=rng.choice(self.book_ids)).update(price=F("price") + 1)
            return True

        def read_own_write() -> bool:
            pk = rng.choice(self.own_ids)
            title = f"w{rng.randrange(10**9)}"
            book.objects.filter(pk=pk).update(title=title)
            return bool(book.objects.get(pk=pk).title == title)

        return {
            "hot_read": hot_read,
            "cold_read": cold_read,
            "write": write,
            "read_own_write": read_own_write,
        }

    def op_run(self, start: float, end: float, seed: int) -> dict[str, Any]:
        """Run operations from wall time *start* to *end*; return counts and counter deltas.

        An operation is counted when it finished before *end*. Each runs in its own
        consistency context (``dbscale``), as a request does under the middleware.
        """
        rng = random.Random(seed * 10 + self.slot)
        ops = self._operations(rng)
        done: Counter[str] = Counter()
        stale = 0
        routes_before, cache_before = self._counters()
        delay = start - time.time()
        if delay > 0:
            time.sleep(delay)
        while True:
            r = rng.random()
            kind = next((k for k, share in MIX if r < share), "read_own_write")
            with self.context():
                fresh = ops[kind]()
            if time.time() > end:
                break
            done[kind] += 1
            stale += not fresh
        routes_after, cache_after = self._counters()
        return {
            "ops": dict(done),
            "stale": stale,
            "routes": {k: routes_after[k] - routes_before.get(k, 0) for k in routes_after},
            "cache": {k: cache_after[k] - cache_before.get(k, 0) for k in cache_after},
        }

    def _counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """Reads routed by kind of alias (replica / primary), and cache events of CBook."""
        if self.variant != "dbscale":
            return {}, {}
        from django_dbscale import consistency
        from django_dbscale.cache import stats
        from django_dbscale.conf import dbscale_settings

        replica_aliases = dbscale_settings.primary_of
        routes: Counter[str] = Counter()
        for (alias, reason), n in list(consistency.route_counts.items()):
            where = "replica" if alias in replica_aliases else "primary"
            routes[f"{where}:{reason}"] += n
        cache = {
            event: n
            for (label, event), n in stats.local_counts().items()
            if label.endswith("CBook")
        }
        return dict(routes), cache


class OverheadWorker:
    """One process reading the same ``Note`` row through one router (dbscale or multidb)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        if variant == "multidb":
            sys.path.insert(0, str(MULTIDB_DIR))
            _configure_plain(replica=True, routers=["multidb.PinningReplicaRouter"])
            import django

            django.setup()
            _, self.note = _plain_models()
            self.replica = "replica"
        else:
            self.replica = "default_replica"
            _setup_dbscale(cache=False, replica=self.replica)
            from django_dbscale import consistency
            from tests.testapp.models import Note

            self.note = Note
            consistency.open_context()
        self.pk = 0

    def op_seed(self) -> dict[str, Any]:
        """Create the row (dbscale worker); wait until the replica has it."""
        from django.core.management import call_command

        from django_dbscale import replicas

        call_command("migrate", database="default", run_syncdb=True, verbosity=0)
        pk = self.note.objects.create(title="bench-throughput").pk
        _wait_for_replica()
        replicas.monitor.refresh()
        return {"pk": pk}

    def op_prepare(self, pk: int) -> dict[str, Any]:
        """Warm both reads; say which database a routed read used and the statements each ran."""
        from django.db import connections
        from django.test.utils import CaptureQueriesContext

        self.pk = pk
        for _ in range(300):
            self._skipped()
            self._routed()
        with (
            CaptureQueriesContext(connections[self.replica]) as on_replica,
            CaptureQueriesContext(connections["default"]) as on_primary,
        ):
            for _ in range(100):
                self._routed()
        row = self.note.objects.filter(pk=pk).first()
        version = "django_dbscale"
        if self.variant == "multidb":
            import importlib.metadata

            version = f"django-multidb-router {importlib.metadata.version('django-multidb-router')}"
        return {
            "routed_to": row._state.db if row is not None else None,
            "replica": self.replica,
            "statements": {
                "replica": len(on_replica.captured_queries) / 100,
                "primary": len(on_primary.captured_queries) / 100,
            },
            "version": version,
        }

    def _skipped(self) -> None:
        self.note.objects.using(self.replica).get(pk=self.pk)

    def _routed(self) -> None:
        self.note.objects.get(pk=self.pk)

    def op_decide(self, n: int) -> dict[str, float]:
        """Mean seconds of the routing decision alone (``router.db_for_read``), *n* calls."""
        from django.db import router

        model = self.note
        start = time.perf_counter()
        for _ in range(n):
            router.db_for_read(model)
        return {"s": (time.perf_counter() - start) / n}

    def op_time(self, read: str, n: int) -> dict[str, float]:
        """Mean seconds per call of *read* (``skipped`` or ``routed``) over *n* calls."""
        fn = self._skipped if read == "skipped" else self._routed
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return {"s": (time.perf_counter() - start) / n}


def worker_main(kind: str, variant: str, slot: int) -> None:
    """Serve JSON requests on stdin; answer on the original stdout (other output: stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    state: Any = (
        ThroughputWorker(variant, slot) if kind == "throughput" else OverheadWorker(variant)
    )
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            out.write("{}\n")
            break
        try:
            reply = getattr(state, f"op_{op}")(**request)
        except Exception:
            reply = {"error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")


# -- parent side ------------------------------------------------------------------------------


class Worker:
    """A worker process driven over pipes; ``send`` and ``receive`` split so N run at once."""

    def __init__(self, kind: str, variant: str, slot: int, env: dict[str, str]) -> None:
        self.name = f"{kind}:{variant}:{slot}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_throughput", "--worker", kind, variant, str(slot)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )

    def send(self, op: str, **kwargs: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (rc {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}")
        return reply

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        self.send(op, **kwargs)
        return self.receive()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            self.call("quit")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def workers(specs: list[tuple[str, str, int]], env: dict[str, str]) -> Iterator[list[Worker]]:
    """Start the workers (booting in parallel), wait until each is ready, close them at exit."""
    started = [Worker(kind, variant, slot, env) for kind, variant, slot in specs]
    try:
        for worker in started:
            worker.receive()
        yield started
    finally:
        for worker in started:
            worker.close()


def _summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def throughput(env: dict[str, str], *, duration: float, blocks: int) -> dict[str, Any]:
    """Run the throughput section; return every figure."""
    most = max(WORKER_COUNTS)
    specs = [("throughput", v, slot) for v in VARIANTS for slot in range(most)]
    result: dict[str, Any] = {"duration": duration, "blocks": blocks, "by_workers": {}}
    with workers(specs, env) as started:
        pool = {v: [w for w in started if f":{v}:" in w.name] for v in VARIANTS}
        ids = pool["dbscale"][0].call("seed")
        for worker in started:
            worker.send("prepare", **ids, warm=0.5)
        for worker in started:
            worker.receive()
        seed = 0
        for n in WORKER_COUNTS:
            rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
            totals: dict[str, Counter[str]] = {v: Counter() for v in VARIANTS}
            routes: Counter[str] = Counter()
            cache: Counter[str] = Counter()
            stale = 0
            for block in range(blocks):
                # A B B A A B B A ...: each pair of blocks holds one block of each variant.
                pair = VARIANTS if (block // 2) % 2 == 0 else VARIANTS[::-1]
                variant = pair[block % 2]
                seed += 1
                start = time.time() + 0.05
                for worker in pool[variant][:n]:
                    worker.send("run", start=start, end=start + duration, seed=seed)
                replies = [worker.receive() for worker in pool[variant][:n]]
                ops = sum(sum(r["ops"].values()) for r in replies)
                rates[variant].append(ops / duration)
                for reply in replies:
                    totals[variant].update(reply["ops"])
                    stale += reply["stale"]
                    routes.update(reply["routes"])
                    cache.update(reply["cache"])
            pairs = list(zip(rates["plain"], rates["dbscale"], strict=True))
            result["by_workers"][n] = {
                "ops_per_s": {v: _summarise(rates[v]) for v in VARIANTS},
                "ratio": _summarise([d / p for p, d in pairs]),
                "ops": {v: dict(totals[v]) for v in VARIANTS},
                "routes": dict(routes),
                "cache": dict(cache),
                "stale": stale,
            }
    return result


def overhead(env: dict[str, str], *, rounds: int, per_block: int) -> dict[str, Any] | str:
    """Run the routing-overhead section against django-multidb-router; return its figures."""
    if not (MULTIDB_DIR / "multidb" / "__init__.py").exists():
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                + ["--no-deps", "--target", str(MULTIDB_DIR), MULTIDB],
                check=True,
            )
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"could not install {MULTIDB}: {exc}"
    specs = [("overhead", "dbscale", 0), ("overhead", "multidb", 0)]
    with workers(specs, env) as (dbscale, multidb):
        pk = dbscale.call("seed")["pk"]
        checks = {
            "dbscale": dbscale.call("prepare", pk=pk),
            "multidb": multidb.call("prepare", pk=pk),
        }
        blocks = [
            (dbscale, "skipped"),
            (dbscale, "routed"),
            (multidb, "skipped"),
            (multidb, "routed"),
        ]
        times: dict[tuple[str, str], list[float]] = {}
        for i in range(rounds + 2):
            order = blocks if i % 2 == 0 else blocks[::-1]
            if i % 4 >= 2:  # alternate which process goes first, too
                order = order[2:] + order[:2]
            for worker, read in order:
                seconds = worker.call("time", read=read, n=per_block)["s"]
                if i >= 2:  # two warm rounds
                    times.setdefault((worker.name.split(":")[1], read), []).append(seconds)
        # The decision alone, a tight loop: no query, so far less noise than the reads.
        decide: dict[str, list[float]] = {"dbscale": [], "multidb": []}
        for i in range(rounds):
            pair = [(dbscale, "dbscale"), (multidb, "multidb")]
            for worker, name in pair if i % 2 == 0 else pair[::-1]:
                decide[name].append(worker.call("decide", n=2000)["s"])
    cost = {
        v: [r - s for s, r in zip(times[(v, "skipped")], times[(v, "routed")], strict=True)]
        for v in ("dbscale", "multidb")
    }
    return {
        "rounds": rounds,
        "per_block": per_block,
        "checks": checks,
        "us": {f"{v} {r}": statistics.median(t) * 1e6 for (v, r), t in times.items()},
        "cost_us": {v: _summarise([c * 1e6 for c in cost[v]]) for v in cost},
        "cost_diff_us": _summarise(
            [(d - m) * 1e6 for d, m in zip(cost["dbscale"], cost["multidb"], strict=True)]
        ),
        "decision_us": {v: _summarise([t * 1e6 for t in decide[v]]) for v in decide},
        "decision_ratio": _summarise(
            [d / m for d, m in zip(decide["dbscale"], decide["multidb"], strict=True)]
        ),
        "routed_ratio": _summarise(
            [
                d / m
                for d, m in zip(
                    times[("dbscale", "routed")], times[("multidb", "routed")], strict=True
                )
            ]
        ),
    }


def report(tp: dict[str, Any] | None, oh: dict[str, Any] | str | None) -> None:
    if tp is not None:
        print(
            f"\n== Throughput: mixed workload, {tp['blocks']} blocks of {tp['duration']:g} s "
            "per N, variants alternating (A B B A ...)"
        )
        print(
            "   ops: 40% hot cached read, 40% get(pk) of a random row, 15% update, "
            "5% read-own-write"
        )
        print(
            f"{'N':>2} {'plain ops/s':>14} {'dbscale ops/s':>15} {'dbscale/plain':>14} "
            f"{'range':>12}   reads served by (dbscale)"
        )
        for n, figures in tp["by_workers"].items():
            rate = figures["ops_per_s"]
            ratio = figures["ratio"]
            ops = figures["ops"]["dbscale"]
            reads = ops.get("hot_read", 0) + ops.get("cold_read", 0) + ops.get("read_own_write", 0)
            hits = figures["cache"].get("hit", 0)
            replica = sum(v for k, v in figures["routes"].items() if k.startswith("replica:"))
            primary = sum(v for k, v in figures["routes"].items() if k.startswith("primary:"))
            served = hits + replica + primary
            share = (
                f"replica {replica / served:5.1%}, cache {hits / served:5.1%}, "
                f"primary {primary / served:5.1%} ({served} of {reads} reads counted)"
                if served
                else "no counts"
            )
            print(
                f"{n:>2} {rate['plain']['median']:>14,.0f} {rate['dbscale']['median']:>15,.0f} "
                f"{ratio['median']:>14.2f} {ratio['min']:>5.2f}-{ratio['max']:<5.2f}   {share}"
            )
        for n, figures in tp["by_workers"].items():
            primary_reasons = {
                k.split(":", 1)[1]: v
                for k, v in figures["routes"].items()
                if k.startswith("primary:")
            }
            print(
                f"   N={n}: primary reads by reason {primary_reasons or '{}'}; cache events "
                f"{figures['cache']}; stale read-own-write: {figures['stale']}"
            )
    if oh is None:
        return
    print("\n== Routing overhead: Note.objects.get(pk=...) on the same streaming replica")
    if isinstance(oh, str):
        print(f"   django-multidb-router: {oh}")
        return
    checks = oh["checks"]
    for v in ("dbscale", "multidb"):
        c = checks[v]
        print(
            f"   {c['version']:<30} routed to {c['routed_to']} (replica {c['replica']}); "
            f"statements per read: replica {c['statements']['replica']:.2f}, "
            f"primary {c['statements']['primary']:.2f}"
        )
    print(
        f"   {oh['rounds']} rounds of 4 blocks x {oh['per_block']} reads, "
        "each library in its own process"
    )
    print(
        f"   dbscale  A .using() {oh['us']['dbscale skipped']:7.1f} µs  B routed "
        f"{oh['us']['dbscale routed']:7.1f} µs   "
        f"B - A median {oh['cost_us']['dbscale']['median']:5.2f} µs"
    )
    print(
        f"   multidb  A .using() {oh['us']['multidb skipped']:7.1f} µs  B routed "
        f"{oh['us']['multidb routed']:7.1f} µs   "
        f"B - A median {oh['cost_us']['multidb']['median']:5.2f} µs"
    )
    decision = oh["decision_us"]
    print(
        f"   decision alone (router.db_for_read, tight loop): dbscale "
        f"{decision['dbscale']['median']:.2f} µs, multidb {decision['multidb']['median']:.2f} µs, "
        f"paired ratio {oh['decision_ratio']['median']:.2f}"
    )
    diff = oh["cost_diff_us"]
    ratio = oh["routed_ratio"]
    print(
        f"   router cost dbscale - multidb, paired median {diff['median']:5.2f} µs per read; "
        f"routed read dbscale / multidb {ratio['median']:.3f} "
        f"(range {ratio['min']:.3f}-{ratio['max']:.3f}; includes the backends' own difference)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--worker", nargs=3, metavar=("KIND", "VARIANT", "SLOT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--duration", type=float, default=3.0, help="Seconds per block (3).")
    parser.add_argument("--blocks", type=int, default=8, help="Blocks per N, even (8).")
    parser.add_argument(
        "--short", action="store_true", help="Quick check: 1 s blocks, 4 per N, 10 overhead rounds."
    )
    parser.add_argument("--no-anchor", action="store_true", help="Skip django-multidb-router.")
    parser.add_argument("--json", help="Also write all figures to this file.")
    args = parser.parse_args()
    if args.worker:
        kind, variant, slot = args.worker
        worker_main(kind, variant, int(slot))
        return 0
    if args.short:
        args.duration, args.blocks = min(args.duration, 1.0), 4
    if args.blocks < 2 or args.blocks % 2:
        parser.error("--blocks must be an even number >= 2 (one block of each variant per pair)")
    if args.duration <= 0:
        parser.error("--duration must be > 0 seconds")
    sys.path.insert(0, str(ROOT))
    from django_dbscale.testing.harness import get_services

    services = get_services()
    env = {**os.environ, **services.env(), "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    tp = throughput(env, duration=args.duration, blocks=args.blocks)
    oh: dict[str, Any] | str | None = None
    if not args.no_anchor:
        oh = overhead(env, rounds=10 if args.short else 40, per_block=100 if args.short else 200)
    report(tp, oh)
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": tp, "overhead": oh}, indent=2))
    stale = sum(f["stale"] for f in tp["by_workers"].values())
    if stale:
        print(f"\nFAIL: {stale} read-after-own-write read(s) returned stale data")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

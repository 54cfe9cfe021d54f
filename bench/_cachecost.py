"""What a cache miss and a write cost, and whether the cache reads fresh after any write.

Used by :mod:`bench.bench_cache` (sections 6-9). Two worker processes run on the same
services with :mod:`bench.settings_cachecost`: one with ``DBSCALE["CACHE"]`` declared
(``cache``), one without (``plain``: the cache is opt-in, so that process runs the ORM as a
project without the cache does). The parent drives them over pipes, one block at a time,
alternating the variants (A B ... B A ...), so each block of one variant has a neighbour
of the other measured back to back, and quotes the median of the per-block ratios.

Inside a block every call is timed alone: the per-call setup (evicting a cache entry,
bumping a version, opening a fresh consistency context) runs outside the timed region.
"""

from __future__ import annotations

import cProfile
import io
import itertools
import json
import os
import pickle
import pstats
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READS = ("get(pk=...)", "filter() 10 rows", "count()")
WRITES = ("save()", "update() 10 rows", "save(), no dimensions", "create()")
BLOCKS = 30
PER_BLOCK = 100
WARM_BLOCKS = 2
TARGETS = {"miss": 1.3, "write": 1.2, "hit": 1.15}

Workload = tuple[Callable[[], Any] | None, Callable[[], Any]]


def seconds_per_call(setup: Callable[[], Any] | None, fn: Callable[[], Any], n: int) -> float:
    """Return the mean seconds of *n* calls of *fn*, each timed alone after its *setup*."""
    total = 0.0
    clock = time.perf_counter
    for _ in range(n):
        if setup is not None:
            setup()
        start = clock()
        fn()
        total += clock() - start
    return total / n


# -- worker side ----------------------------------------------------------------------------


class _Pieces:
    """Inclusive time and calls of wrapped functions, while installed."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        if isinstance(owner, type):
            original = owner.__dict__[name]
        seconds, calls = self.seconds, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def replace(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def remove(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


class _Worker:
    def __init__(self) -> None:
        import django

        django.setup()
        from django.conf import settings

        from django_dbscale.conf import dbscale_settings

        self.cache_on = dbscale_settings.cache_declared
        self.aliases = list(settings.DATABASES)
        self.workloads: dict[str, Workload] = {}
        self.ids: dict[str, int] = {}

    # -- data -------------------------------------------------------------------------------
    def op_seed(self) -> dict[str, Any]:
        """Recreate the rows (cache worker); wait until the replica has replayed them."""
        from django.core.management import call_command

        from bench.bench_cache import seed_books
        from django_dbscale.cache.client import gateway
        from tests.testapp.models_cache import CAuthor, CBook, CCounter

        call_command("migrate", database="default", run_syncdb=True, verbosity=0)
        gateway().client.flushdb()
        CBook.objects.all().delete()
        CAuthor.objects.all().delete()
        CCounter.objects.filter(name__startswith="bench-").delete()
        authors = seed_books(CAuthor, CBook)

        def first_book(author: Any) -> int:
            return int(CBook.objects.filter(author=author).order_by("id")[0].pk)

        ids = {
            "book": first_book(authors[3]),
            "author": authors[3].pk,
            "save_book": first_book(authors[5]),
            "write_author": authors[7].pk,
            "raw_author": authors[9].pk,
            "atomic_author": authors[10].pk,
            "cte_author": authors[11].pk,
            "ext_author": authors[13].pk,
            "capture_author": authors[15].pk,
        }
        _wait_for_replica()
        return ids

    def op_prepare(self, ids: dict[str, int]) -> dict[str, Any]:
        """Define the workloads, warm them, check each is what it claims; say where it read."""
        from django.db.models import F, QuerySet

        from tests.testapp.models_cache import CBook, CCounter

        self.ids = ids
        book_id, author_id = ids["book"], ids["author"]
        reads: dict[str, Callable[[Any], Any]] = {
            "get(pk=...)": lambda qs: qs.get(pk=book_id),
            "filter() 10 rows": lambda qs: list(qs.filter(author_id=author_id).order_by("id")),
            "count()": lambda qs: qs.filter(author_id=author_id).count(),
        }
        for name, read in reads.items():
            # Django's own QuerySet: the read a project without the cache makes.
            self.workloads[f"plain:{name}"] = (None, lambda read=read: read(QuerySet(CBook)))
            # The model's CachedQuerySet, not read through the cache.
            self.workloads[f"all:{name}"] = (None, lambda read=read: read(CBook.objects.all()))
        save_obj = CBook.objects.get(pk=ids["save_book"])

        def save() -> None:
            save_obj.price += 1
            save_obj.save()

        write_author = ids["write_author"]
        self.workloads["write:save()"] = (None, save)
        # A model without dimensions: save() is a plain UPDATE (no CTE for old values).
        counter = CCounter.objects.get_or_create(name="bench-save")[0]

        def save_counter() -> None:
            counter.value += 1
            counter.save()

        self.workloads["write:save(), no dimensions"] = (None, save_counter)
        names = itertools.count()
        tag = f"bench-{os.getpid()}-"
        self.workloads["write:create()"] = (
            None,
            lambda: CCounter.objects.create(name=f"{tag}{next(names)}"),
        )
        self.workloads["write:update() 10 rows"] = (
            None,
            lambda: CBook.objects.filter(author_id=write_author).update(price=F("price") + 1),
        )
        checks: dict[str, Any] = {}
        if self.cache_on:
            checks = self._prepare_cache(reads)
        return {"routing": self.op_routing(), "checks": checks}

    def op_routing(self) -> dict[str, Any]:
        """Warm every read workload; count its statements per alias (setup not counted)."""
        from django.db import connections

        from django_dbscale import consistency

        fresh_context = consistency.open_context
        routing: dict[str, dict[str, float]] = {}
        for name, (setup, fn) in self.workloads.items():
            if name.startswith("write:"):
                continue  # warmed by their own first blocks: their bumps would move fills
            fresh_context()
            for _ in range(20):
                if setup is not None:
                    setup()
                fn()
            seen: Counter[str] = Counter()
            active = [False]  # the setup's statements (a WAL position query) are not counted

            def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
                if active[0]:  # noqa: B023 - used inside the loop
                    seen[context["connection"].alias] += 1  # noqa: B023
                return execute(sql, params, many, context)

            fresh_context()
            with ExitStack() as stack:
                for alias in self.aliases:
                    stack.enter_context(connections[alias].execute_wrapper(count))
                for _ in range(10):
                    if setup is not None:
                        setup()
                    active[0] = True
                    fn()
                    active[0] = False
            routing[name] = {alias: n / 10 for alias, n in sorted(seen.items())}
        return {"routing": routing}

    def _prepare_cache(self, reads: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
        from django_dbscale import consistency
        from django_dbscale.cache import invalidate_model
        from django_dbscale.cache.client import gateway
        from django_dbscale.cache.signals import cache_read
        from tests.testapp.models_cache import CBook

        client = gateway().client
        events: list[tuple[str, bool, bool, str]] = []

        def on_read(sender: Any, key: str, hit: bool, stored: bool, reason: str, **kw: Any) -> None:
            events.append((key, hit, stored, reason))

        cache_read.connect(on_read)
        checks: dict[str, Any] = {}
        try:
            for name, read in reads.items():
                self.workloads[f"nocache:{name}"] = (
                    None,
                    lambda read=read: read(CBook.objects.nocache()),
                )

                def cached(read: Callable[[Any], Any] = read) -> Any:
                    return read(CBook.objects.cache())

                consistency.open_context()
                events.clear()
                cached()
                key = events[-1][0]

                def evict(key: str = key) -> None:
                    client.delete(key)
                    consistency.open_context()

                def bump() -> None:
                    invalidate_model(CBook)
                    consistency.open_context()

                self.workloads[f"hit:{name}"] = (None, cached)
                self.workloads[f"miss:{name}"] = (evict, cached)
                self.workloads[f"miss after invalidate_model():{name}"] = (bump, cached)
                for kind, setup, want in (
                    ("miss", evict, (False, True)),
                    ("miss after invalidate_model()", bump, (False, True)),
                    ("hit", None, (True, False)),
                ):
                    events.clear()
                    for _ in range(5):
                        if setup is not None:
                            setup()
                        cached()
                    got = {(hit, stored, reason) for _, hit, stored, reason in events}
                    ok = len(events) == 5 and {(h, s) for h, s, _ in got} == {want}
                    checks[f"{kind}:{name}"] = "ok" if ok else f"NOT a {kind}: {sorted(got)}"
        finally:
            cache_read.disconnect(on_read)
        return checks

    # -- timing ------------------------------------------------------------------------------
    def op_time(self, workload: str, n: int) -> dict[str, Any]:
        from django_dbscale import consistency

        setup, fn = self.workloads[workload]
        consistency.open_context()
        return {"s": seconds_per_call(setup, fn, n)}

    def op_pieces(self, workload: str, n: int) -> dict[str, Any]:
        """Per-call inclusive time of the pieces of *workload* (wrapped functions, SQL)."""
        from django.db import connections

        from django_dbscale import consistency

        pieces = _Pieces()
        if self.cache_on:
            self._wrap_cache(pieces)

        def on_sql(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            kind = "WAL position query" if "pg_current_wal" in sql else sql.split(None, 1)[0]
            label = f"db: {kind} ({context['connection'].alias})"
            start = time.perf_counter()
            try:
                return execute(sql, params, many, context)
            finally:
                pieces.seconds[label] += time.perf_counter() - start
                pieces.calls[label] += 1

        setup, fn = self.workloads[workload]
        total = 0.0
        acc: defaultdict[str, float] = defaultdict(float)
        cnt: Counter[str] = Counter()
        try:
            with ExitStack() as stack:
                for alias in self.aliases:
                    stack.enter_context(connections[alias].execute_wrapper(on_sql))
                for _ in range(n):
                    if setup is not None:
                        setup()
                    # Setup (evict, invalidate) runs wrapped functions too: count only fn.
                    pieces.seconds.clear()
                    pieces.calls.clear()
                    start = time.perf_counter()
                    fn()
                    total += time.perf_counter() - start
                    for label, seconds in pieces.seconds.items():
                        acc[label] += seconds
                        cnt[label] += pieces.calls[label]
        finally:
            pieces.remove()
            consistency.open_context()
        return {
            "total_us": total / n * 1e6,
            "pieces": {
                label: {"us": acc[label] / n * 1e6, "calls": cnt[label] / n}
                for label in sorted(acc, key=lambda k: -acc[k])
            },
        }

    @staticmethod
    def _wrap_cache(pieces: _Pieces) -> None:
        from django_dbscale import consistency
        from django_dbscale.cache import engine, invalidation
        from django_dbscale.cache.client import Gateway

        for name, label in (
            ("read_through", "cache: read_through (all of it)"),
            ("_read", "cache: read script (pack + round trip)"),
            ("_fill", "cache: _fill (query + store)"),
            ("_verdict", "cache: _verdict"),
            ("_entry_floor", "cache: _entry_floor"),
            ("_required_positions", "cache: _required_positions"),
            ("Collector", "cache: Collector()"),
        ):
            pieces.wrap(engine, name, label)
        shim = types.SimpleNamespace(
            dumps=pickle.dumps, loads=pickle.loads, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL
        )
        pieces.wrap(shim, "dumps", "pickle.dumps (fill payload)")
        pieces.wrap(shim, "loads", "pickle.loads")
        pieces.replace(engine, "pickle", shim)
        for name, label in (
            ("run_packed", "redis: run_packed (read script round trip)"),
            ("evalsha", "redis: evalsha (fill script round trip)"),
            ("pipeline", "redis: pipeline (version bumps)"),
        ):
            pieces.wrap(Gateway, name, label)
        pieces.wrap(consistency, "fetch_primary_lsn", "consistency.fetch_primary_lsn")
        for name, label in (
            ("record_write", "invalidation: record_write"),
            ("write_keys", "invalidation: write_keys"),
            ("deliver", "invalidation: deliver (position + flush)"),
            ("_position", "invalidation: _position (WAL position)"),
            ("flush_pending", "invalidation: flush_pending"),
        ):
            pieces.wrap(invalidation, name, label)
        for name in ("fields", "canonical", "pinned"):
            pieces.wrap(
                invalidation._DimensionAnalysis, name, f"write analysis: dimensions .{name}()"
            )

    def op_profile(self, workload: str, n: int, top: int, sort: str = "tottime") -> dict[str, Any]:
        from django_dbscale import consistency

        setup, fn = self.workloads[workload]
        profiler = cProfile.Profile()
        for _ in range(n):
            if setup is not None:
                setup()
            profiler.enable()
            fn()
            profiler.disable()
        consistency.open_context()
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats(sort).print_stats(top)
        return {"text": buffer.getvalue()}

    # -- correctness --------------------------------------------------------------------------
    def op_correctness(self) -> dict[str, Any]:
        """Change rows behind a cached query by raw SQL / from outside; is the next read fresh?"""
        from django.db import connections, transaction

        from django_dbscale import consistency
        from django_dbscale.cache.signals import cache_read
        from tests.settings import _services
        from tests.testapp.models_cache import CBook

        table = CBook._meta.db_table
        pg1 = _services.pg1

        def truth(author: int) -> list[tuple[int, int]]:
            return [
                (int(i), int(p))
                for i, p in pg1.execute(
                    f"SELECT id, price FROM {table} WHERE author_id = %s ORDER BY id",
                    (author,),
                    dbname="dbscale",
                )
            ]

        hits: list[bool] = []

        def on_read(sender: Any, hit: bool, **kw: Any) -> None:
            hits.append(hit)

        def cached(author: int) -> list[tuple[int, int]]:
            consistency.open_context()  # a new request: no read-your-writes pinning
            qs = CBook.objects.cache().filter(author_id=author).order_by("id")
            return [(b.id, b.price) for b in qs]

        def primed(author: int) -> bool:
            cached(author)
            hits.clear()
            cached(author)
            return hits == [True]

        rows: list[dict[str, Any]] = []
        cache_read.connect(on_read)
        try:

            def raw_case(label: str, author: int, write: Callable[[int], None]) -> None:
                was_hit = primed(author)
                before = cached(author)
                write(author)
                after = cached(author)
                expected = truth(author)
                always = all(cached(author) == expected for _ in range(20))
                rows.append(
                    {
                        "case": label,
                        "primed hit": was_hit,
                        "changed": before != expected,
                        "fresh": after == expected,
                        "fresh_within_ms": 0.0 if after == expected else None,
                        "stays_fresh": always,
                        "note": "",
                    }
                )

            def raw_update(author: int) -> None:
                with connections["default"].cursor() as cursor:
                    cursor.execute(
                        f"UPDATE {table} SET price = price + 100 WHERE author_id = %s", [author]
                    )

            def raw_in_atomic(author: int) -> None:
                with transaction.atomic(using="default"):
                    raw_update(author)

            def raw_cte(author: int) -> None:
                with connections["default"].cursor() as cursor:
                    cursor.execute(
                        f"WITH changed AS (UPDATE {table} SET price = price + 7 "
                        "WHERE author_id = %s RETURNING id) SELECT count(*) FROM changed",
                        [author],
                    )
                    cursor.fetchall()

            raw_case("raw UPDATE, Django cursor, autocommit", self.ids["raw_author"], raw_update)
            raw_case(
                "raw UPDATE, Django cursor, atomic()", self.ids["atomic_author"], raw_in_atomic
            )
            raw_case("raw data-modifying CTE, Django cursor", self.ids["cte_author"], raw_cte)
            rows.append(self._external(cached, primed, truth, table, capture=False))
            rows.append(self._external(cached, primed, truth, table, capture=True))
        finally:
            cache_read.disconnect(on_read)
        return {"rows": rows}

    def _external(
        self,
        cached: Callable[[int], Any],
        primed: Callable[[int], bool],
        truth: Callable[[int], Any],
        table: str,
        *,
        capture: bool,
    ) -> dict[str, Any]:
        from django.core.management import call_command

        from django_dbscale.cache import capture as capture_mod
        from tests.settings import _services

        author = self.ids["capture_author" if capture else "ext_author"]
        label = (
            "external UPDATE (psql-like), capture + relay"
            if capture
            else "external UPDATE (psql-like), no capture"
        )
        stop = threading.Event()
        relay: threading.Thread | None = None
        if capture:
            call_command(
                "dbscale", "cache", "capture", "--database", "default", stdout=io.StringIO()
            )
            relay = threading.Thread(
                target=capture_mod.relay, args=(["default"], stop), kwargs={"poll": 1.0}
            )
            relay.start()
            time.sleep(0.5)  # listening, heartbeat written
        try:
            was_hit = primed(author)
            before = cached(author)
            expected = [(i, p + 1000) for i, p in truth(author)]
            _services.pg1.execute(
                f"UPDATE {table} SET price = price + 1000 WHERE author_id = %s",
                (author,),
                dbname="dbscale",
            )
            committed = time.perf_counter()
            first = cached(author) == expected
            waited = None
            while time.perf_counter() - committed < 2.0:
                if cached(author) == expected:
                    waited = time.perf_counter() - committed
                    break
                time.sleep(0.001)
            always = waited is not None and all(cached(author) == expected for _ in range(50))
        finally:
            if relay is not None:
                stop.set()
                relay.join(10)
                capture_mod.remove("default")
        if waited is None:
            note = "still stale 2 s after COMMIT"
        else:
            note = f"fresh {waited * 1000:.1f} ms after COMMIT" + ("" if always else ", then stale")
        return {
            "case": label,
            "primed hit": was_hit,
            "changed": before != expected,
            "fresh": first,
            "fresh_within_ms": None if waited is None else waited * 1000,
            "stays_fresh": always,
            "note": note,
        }

    def op_quit(self) -> dict[str, Any]:
        return {}


def _wait_for_replica(timeout: float = 10.0) -> None:
    from tests.settings import _services

    deadline = time.monotonic() + timeout
    (target,) = _services.pg1.execute("SELECT pg_current_wal_lsn()")[0]
    while time.monotonic() < deadline:
        (ok,) = _services.pg1_replica.execute(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(target),)
        )[0]
        if ok:
            time.sleep(1.5)  # and the replica monitors of the workers have seen it
            return
        time.sleep(0.05)


def worker_main() -> None:
    """Serve JSON requests on stdin; answer on the original stdout (other output: stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    state = _Worker()
    out.write(json.dumps({"ready": True, "cache": state.cache_on}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = getattr(state, f"op_{op}")(**request)
        except Exception:
            reply = {"error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        if op == "quit":
            break


# -- parent side ------------------------------------------------------------------------------


class Worker:
    """A worker process (``cache`` or ``plain``), driven one request at a time."""

    def __init__(self, role: str, env: dict[str, str]) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._cachecost"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "BENCH_CACHE": "on" if role == "cache" else "off"},
            cwd=str(ROOT),
        )
        hello = self._reply()
        if hello.get("cache") != (role == "cache"):
            raise RuntimeError(f"worker {role}: cache declared = {hello.get('cache')}")

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.role} exited (rc {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.role}: {reply['error']}")
        return reply

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        with suppress(RuntimeError, OSError):
            self.call("quit")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def alternate(
    time_block: Callable[[int], float], count: int, blocks: int, warm: int = WARM_BLOCKS
) -> list[dict[str, float]]:
    """Time *count* variants in alternating blocks; ratios are to variant 0, block by block.

    ``time_block(j)`` times one block of variant *j* and returns seconds per call. Blocks
    alternate the order (A B ..., then ... B A), the first *warm* are not kept, and each
    variant's ratio is the median of its per-block ratios to variant 0 (p10-p90 beside).
    """
    times: list[list[float]] = [[] for _ in range(count)]
    for i in range(warm + blocks):
        order = list(range(count))
        if i % 2:
            order.reverse()
        for j in order:
            seconds = time_block(j)
            if i >= warm:
                times[j].append(seconds)
    out = []
    for series in times:
        ratios = [b / a for a, b in zip(times[0], series, strict=True)]
        deciles = statistics.quantiles(ratios, n=10) if len(set(ratios)) > 1 else [1.0] * 9
        out.append(
            {
                "us": statistics.median(series) * 1e6,
                "ratio": statistics.median(ratios),
                "ratio_p10": deciles[0],
                "ratio_p90": deciles[-1],
            }
        )
    return out


def interleave(
    variants: list[tuple[Worker, str]], blocks: int, per_block: int
) -> list[dict[str, float]]:
    """Time each worker's workload in alternating blocks (see :func:`alternate`)."""

    def time_block(j: int) -> float:
        worker, name = variants[j]
        return float(worker.call("time", workload=name, n=per_block)["s"])

    return alternate(time_block, len(variants), blocks)


def run(
    services: Any, *, blocks: int = BLOCKS, per_block: int = PER_BLOCK, profile: bool = False
) -> dict[str, Any]:
    """Run sections 6-9 in two worker processes; return every figure."""
    env = {
        **os.environ,
        **services.env(),
        "DJANGO_SETTINGS_MODULE": "bench.settings_cachecost",
        "PYTHONPATH": str(ROOT),
    }
    cache = Worker("cache", env)
    plain = Worker("plain", env)
    result: dict[str, Any] = {"blocks": blocks, "per_block": per_block}
    try:
        ids = cache.call("seed")
        prep_cache = cache.call("prepare", ids=ids)
        prep_plain = plain.call("prepare", ids=ids)
        result["checks"] = prep_cache["checks"]
        result["routing"] = {"cache": prep_cache["routing"], "plain": prep_plain["routing"]}
        reads: dict[str, Any] = {}
        for name in READS:
            kinds = ("miss", "hit", "nocache")
            figures = interleave(
                [
                    (plain, f"plain:{name}"),
                    *((cache, f"{k}:{name}") for k in kinds),
                    (plain, f"all:{name}"),
                ],
                blocks,
                per_block,
            )
            reads[name] = {
                "uncached": figures[0],
                **dict(zip(kinds, figures[1:4], strict=True)),
                "all() cache off": figures[4],
            }
            after = interleave(
                [(plain, f"plain:{name}"), (cache, f"miss after invalidate_model():{name}")],
                blocks,
                per_block,
            )
            reads[name]["miss after invalidate_model()"] = after[1]
        result["reads"] = reads
        # Where the reads went, re-checked after the timed blocks (the prepare-time check
        # ran before the invalidations of the "after invalidate_model()" blocks).
        result["routing"] = {
            "cache": cache.call("routing")["routing"],
            "plain": plain.call("routing")["routing"],
        }
        writes: dict[str, Any] = {}
        for name in WRITES:
            figures = interleave(
                [(plain, f"write:{name}"), (cache, f"write:{name}")], blocks, per_block
            )
            writes[name] = {"plain": figures[0], "cache": figures[1]}
        result["writes"] = writes
        filt = reads["filter() 10 rows"]
        m, h = filt["miss"]["ratio"], filt["hit"]["ratio"]
        result["break_even"] = max(0.0, (m - 1) / (m - h)) if m > h else None
        result["pieces"] = {
            f"miss {name}": {
                "cache": cache.call("pieces", workload=f"miss:{name}", n=400),
                "plain": plain.call("pieces", workload=f"plain:{name}", n=400),
            }
            for name in ("filter() 10 rows", "get(pk=...)")
        }
        for name in WRITES:
            result["pieces"][name] = {
                "cache": cache.call("pieces", workload=f"write:{name}", n=400),
                "plain": plain.call("pieces", workload=f"write:{name}", n=400),
            }
        if profile:
            result["profiles"] = {
                w: cache.call("profile", workload=w, n=1000, top=25)["text"]
                for w in ("miss:filter() 10 rows", "write:update() 10 rows")
            }
        result["correctness"] = cache.call("correctness")["rows"]
    finally:
        cache.close()
        plain.close()
    return result


# -- report --------------------------------------------------------------------------------------


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return "met" if value <= target else "NOT MET"


def _anchor_costs(anchors: dict[str, Any] | None) -> dict[str, dict[str, Any] | str]:
    """Each anchor's miss/write figures (``costs`` of its JSON), or why there are none."""
    out: dict[str, dict[str, Any] | str] = {}
    for name, data in (anchors or {}).items():
        if data is None:
            out[name] = "not run"
        elif not isinstance(data, dict):
            out[name] = str(data)
        elif not isinstance(data.get("costs"), dict):
            out[name] = str(data.get("costs", "no miss/write figures"))
        else:
            out[name] = data["costs"]
    return out


def _anchor_cell(costs: dict[str, Any] | str, section: str, row: str, variant: str) -> str:
    """The anchor's ratio for one row of a table, or "-"."""
    if not isinstance(costs, dict) or row not in costs[section]:
        return "-"
    return f"{costs[section][row][variant]['ratio']:.2f}"


def _anchor_details(
    others: dict[str, dict[str, Any] | str],
    section: str,
    base: str,
    variant: str,
    extra: str | None,
) -> None:
    """Per anchor: base and variant µs, variant/base with p10-p90, *extra* ratio; notes."""
    if not others:
        return
    for name, costs in others.items():
        if not isinstance(costs, dict):
            print(f"   {name}: {costs.splitlines()[0] if costs else '-'}")
            for line in costs.splitlines()[1:]:
                print(f"     {line}")
            continue
        for row, fig in costs[section].items():
            b, v = fig[base], fig[variant]
            bl, vl = (base, variant) if section == "reads" else ("without", "with")
            line = (
                f"   {name:<9} {row:<18} {bl} {b['us']:>8.1f}µs  {vl} {v['us']:>8.1f}µs"
                f"  ratio {v['ratio']:.2f} ({v['ratio_p10']:.2f}-{v['ratio_p90']:.2f})"
            )
            if extra is not None and extra in fig:
                line += f"  {extra} {fig[extra]['us']:.1f}µs ({fig[extra]['ratio']:.2f})"
            print(line)
        notes = costs.get("notes", {})
        keys = ("uncached", "miss") if section == "reads" else ("without", "update() 10 rows")
        for key in keys:
            if key in notes:
                print(f"     {name} {key}: {notes[key]}")
        for check, state in costs.get("checks", {}).items():
            if state != "ok" and check.startswith("write") == (section == "writes"):
                print(f"   CHECK FAILED {name} {check}: {state}")


def report(
    costs: dict[str, Any],
    hits: dict[str, Any] | None,
    anchors: dict[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """Print sections 6-9; return (target, verdict) pairs.

    *anchors* maps each anchor's name to its worker's JSON (its ``costs``: miss and write
    figures measured in its own process), an error string, or None when it did not run;
    their ratios are printed as extra columns ("-" when absent), with details below.
    """
    verdicts: list[tuple[str, str]] = []
    reads, writes = costs["reads"], costs["writes"]
    others = _anchor_costs(anchors)
    anchor_head = "".join(f" {name:>8}" for name in others)
    print(
        f"\n== Miss cost: cache miss vs the same read uncached, paired blocks "
        f"({costs['blocks']} x {costs['per_block']} calls)"
    )
    print("   uncached = the read with Django's QuerySet(CBook), in a process without")
    print("   DBSCALE['CACHE']; miss = entry evicted (DEL) before each timed call, outside the")
    print("   timed region; nocache = .nocache() in the cache process; all() = CBook.objects")
    print("   (CachedQuerySet) in the process without the cache. Ratios are to uncached.")
    if others:
        print("   cacheops / cachalot: their miss/uncached, each in its own process, uncached =")
        print("   the read with the anchor bypassed there, miss = its own entry deleted before")
        print("   each call (untimed); same blocks and calls (details below the table).")
    print(
        f"{'read':<18} {'uncached':>10} {'miss':>10} {'miss/unc':>9} {'p10-p90':>11} "
        f"{'hit':>9} {'hit/unc':>8} {'nocache':>8} {'all()':>6}{anchor_head}"
        f"  miss <= {TARGETS['miss']}x"
    )
    for name, r in reads.items():
        miss = r["miss"]
        verdict = _verdict(miss["ratio"], TARGETS["miss"])
        verdicts.append((f"miss {name} <= {TARGETS['miss']}x uncached", verdict))
        print(
            f"{name:<18} {r['uncached']['us']:>8.1f}µs {miss['us']:>8.1f}µs {miss['ratio']:>9.2f} "
            f"{miss['ratio_p10']:>5.2f}-{miss['ratio_p90']:<5.2f} {r['hit']['us']:>7.1f}µs "
            f"{r['hit']['ratio']:>8.2f} {r['nocache']['ratio']:>8.2f} "
            f"{r['all() cache off']['ratio']:>6.2f}"
            + "".join(f" {_anchor_cell(c, 'reads', name, 'miss'):>8}" for c in others.values())
            + f"  {verdict}"
        )
    _anchor_details(others, "reads", "uncached", "miss", "hit")
    print("   a miss right after a write (invalidate_model() before each call: the fill must")
    print("   read a source that has replayed the invalidation, and record the entry's floor)")
    for name, r in reads.items():
        after = r["miss after invalidate_model()"]
        print(
            f"{name:<18} {after['us']:>8.1f}µs  ratio to uncached {after['ratio']:.2f} "
            f"({after['ratio_p10']:.2f}-{after['ratio_p90']:.2f})"
        )
    routing = costs.get("routing") or {}
    if routing:
        print("   statements per call, by alias (where each variant read, after the blocks):")
        for role, table in routing.items():
            for workload, aliases in table.items():
                if workload.startswith("write:"):
                    continue
                where = ", ".join(f"{a} {n:g}" for a, n in aliases.items()) or "none"
                print(f"     {role:<6} {workload:<48} {where}")
    for check, state in costs.get("checks", {}).items():
        if state != "ok":
            print(f"   CHECK FAILED {check}: {state}")

    print("\n== Write cost: the same write with the cache on vs a process without the cache")
    if others:
        print("   cacheops / cachalot: their write with vs without them (no invalidation at")
        print("   all), each in its own process, same blocks and calls (details below).")
    print(
        f"{'write':<18} {'plain':>10} {'cache on':>10} {'ratio':>7} {'p10-p90':>11}"
        f"{anchor_head}  target"
    )
    for name, w in writes.items():
        verdict = _verdict(w["cache"]["ratio"], TARGETS["write"])
        verdicts.append((f"{name} <= {TARGETS['write']}x plain", verdict))
        print(
            f"{name:<18} {w['plain']['us']:>8.1f}µs {w['cache']['us']:>8.1f}µs "
            f"{w['cache']['ratio']:>7.2f} {w['cache']['ratio_p10']:>5.2f}-"
            f"{w['cache']['ratio_p90']:<5.2f}"
            + "".join(f" {_anchor_cell(c, 'writes', name, 'cache'):>8}" for c in others.values())
            + f"  <= {TARGETS['write']}x {verdict}"
        )
    _anchor_details(others, "writes", "plain", "cache", None)

    filt = reads["filter() 10 rows"]
    be = costs["break_even"]
    print("\n== Break-even hit ratio, filter() 10 rows: h*hit + (1-h)*miss = uncached")
    print(
        f"   miss {filt['miss']['ratio']:.2f}x, hit {filt['hit']['ratio']:.2f}x uncached -> "
        + (f"break-even at {be * 100:.1f}% hits" if be is not None else "no break-even")
    )

    print("\n== Correctness: rows changed behind a cached query (primed: a hit before the write)")
    print("   next read = the first cached read after the write (external: right after COMMIT)")
    print(
        f"{'write':<46} {'primed':>6} {'changed':>7} {'next read':>9} {'fresh after':>11} "
        f"{'then':>6}  verdict"
    )
    for row in costs["correctness"]:
        within = row["fresh_within_ms"]
        if "no capture" in row["case"]:
            verdict = "(expected stale: nothing tells the cache)"
        elif "external" in row["case"]:
            ok = within is not None and within < 50 and row["stays_fresh"]
            verdict = "met (< 50 ms, then always)" if ok else "NOT MET"
            verdicts.append((f"fresh after {row['case']}", verdict.split(" ")[0]))
        else:
            verdict = "met" if row["fresh"] and row["stays_fresh"] else "NOT MET"
            verdicts.append((f"fresh after {row['case']}", verdict))
        print(
            f"{row['case']:<46} {'yes' if row['primed hit'] else 'NO':>6} "
            f"{'yes' if row['changed'] else 'no':>7} {'fresh' if row['fresh'] else 'STALE':>9} "
            f"{'never' if within is None else f'{within:.1f} ms':>11} "
            f"{'fresh' if row['stays_fresh'] else 'STALE':>6}  {verdict}"
        )

    print("\n== Where the time goes (inclusive µs per call, pieces nest; 400 calls, wrapped)")
    for name, sides in costs["pieces"].items():
        c, p = sides["cache"], sides["plain"]
        print(
            f"-- {name}: cache on {c['total_us']:.1f} µs, plain {p['total_us']:.1f} µs "
            f"(+{c['total_us'] - p['total_us']:.1f} µs)"
        )
        for side, data in (("cache", c), ("plain", p)):
            for label, piece in data["pieces"].items():
                print(f"     {side:<5} {label:<46} {piece['us']:>8.1f} µs  x{piece['calls']:g}")
    for name, text in costs.get("profiles", {}).items():
        print(f"\n-- cProfile, {name} (cache process, 1000 calls, by own time)")
        print("\n".join(line for line in text.splitlines() if line.strip())[:6000])

    if hits:
        for name, h in hits.items():
            verdicts.append(
                (
                    f"hit {name} <= {TARGETS['hit']}x floor",
                    _verdict(h["ratio"], TARGETS["hit"]),
                )
            )
    print("\n== Targets of issue 12 §4 (reported only: the exit status does not depend on them)")
    for target, verdict in verdicts:
        print(f"   {target:<58} {verdict}")
    return verdicts


if __name__ == "__main__":
    worker_main()

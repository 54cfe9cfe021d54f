"""The sharding part of ``manage.py demo``: keys to shards, rows where the ring says, fan-out.

Self-contained: it declares two colocated sharded models in a private app registry, creates
their tables on every shard of the ``customers`` group, shows where rows land (checked with
direct SQL on each server, not through the library), reads them back through the shards'
replicas, runs a fan-out, shows the refusals, and drops the tables again. It assumes the
databases are migrated (the ID function is installed on every shard by ``migrate``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from demo_support import problem, wrap
from django.db import connections, models
from django.db.models import Count, Sum
from django.test.utils import isolate_apps

from django_dbscale import consistency_context, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import (
    ShardedIDField,
    ShardingError,
    decode_id,
    get_ring,
    prefetch_by_shard,
    shard_for_key,
)
from django_dbscale.sharding.models import ShardedModel
from django_dbscale.testing.harness import get_services

GROUP = "customers"


def run(out: Callable[[str], None]) -> str:
    """Print the sharding demo with *out* (one line per call); return its summary line."""
    with isolate_apps("shop"):

        class DemoCustomer(ShardedModel):
            shard_group = GROUP
            shard_key = "id"
            id = models.BigIntegerField(primary_key=True)
            name = models.CharField(max_length=50)

            class Meta:
                app_label = "shop"

        class DemoOrder(ShardedModel):
            shard_group = GROUP
            shard_key = "customer"
            id = ShardedIDField(primary_key=True)
            customer = models.ForeignKey(DemoCustomer, models.CASCADE, related_name="orders")
            total = models.DecimalField(max_digits=10, decimal_places=2)

            class Meta:
                app_label = "shop"

        shards = get_ring(GROUP).nodes
        for alias in shards:
            with connections[alias].schema_editor() as editor:
                editor.create_model(DemoCustomer)
                editor.create_model(DemoOrder)
        try:
            return _show(out, DemoCustomer, DemoOrder, shards)
        finally:
            for alias in shards:
                with connections[alias].schema_editor() as editor:
                    editor.delete_model(DemoOrder)
                    editor.delete_model(DemoCustomer)


def _show(
    out: Callable[[str], None], customer_model: Any, order_model: Any, shards: tuple[str, ...]
) -> str:
    services = get_services()
    ring = get_ring(GROUP)
    out(f"  group {GROUP!r}: ring {ring.fingerprint}, {ring.vnodes} vnodes per shard")
    for number, alias in enumerate(shards):
        server = services.alias_server(alias)
        out(
            f"    #{number} {alias:<7} on {server.name} ({services.alias_dbname(alias)}), "
            f"replicas {[r.alias for r in dbscale_settings.replicas.get(alias, ())]}"
        )

    spread = Counter(shard_for_key(GROUP, key) for key in range(10_000))
    out("  10,000 customer ids over the ring: " + ", ".join(f"{a} {spread[a]}" for a in shards))
    out(f"  key 42 and '42' both map to {shard_for_key(GROUP, 42)} / {shard_for_key(GROUP, '42')}")

    customers = [customer_model(id=key, name=f"customer {key}") for key in range(1, 13)]
    customer_model.objects.bulk_create(customers)
    orders = [
        order_model(customer_id=c.id, total=Decimal(c.id) + Decimal("0.99"))
        for c in customers
        for _ in range(2)
    ]
    order_model.objects.bulk_create(orders)
    out("  created 12 customers and 24 orders with bulk_create (split by shard)")

    out("  where the rows are, by direct SQL on each server:")
    misplaced = 0
    for alias in shards:
        server = services.alias_server(alias)
        rows = server.execute(
            f"SELECT customer_id, count(*) FROM {order_model._meta.db_table} GROUP BY 1 ORDER BY 1",
            dbname=services.alias_dbname(alias),
        )
        keys = [row[0] for row in rows]
        expected = sorted(c.id for c in customers if shard_for_key(GROUP, c.id) == alias)
        if keys == expected:
            out(f"    {alias}: orders of customers {keys} -- as the ring says")
        else:
            misplaced += 1
            problem(out, f"{alias} holds orders of customers {keys}; the ring says {expected}")

    first = orders[0]
    parts = decode_id(first.pk)
    out(
        f"  order id {first.pk}: made {parts.created:%H:%M:%S.%f} UTC on shard number "
        f"{parts.shard_number} ({shards[parts.shard_number]}), sequence {parts.sequence}"
    )

    key = customers[4].id
    for server in (services.pg1_replica, services.pg2_replica):
        server.wait_for_replay()
    replicas.monitor.refresh()
    with consistency_context():
        got = list(order_model.objects.filter(customer_id=key))
    out(
        wrap(
            f"another context: filter(customer_id={key}) -> {len(got)} orders read from "
            f"{got[0]._state.db!r} (shard {shard_for_key(GROUP, key)}'s replica)"
        )
    )
    mine = order_model.objects.create(customer_id=key, total=Decimal("1.00"))
    again = order_model.objects.filter(customer_id=key).get(pk=mine.pk)
    out(f"  the writer reads its new order back from {again._state.db!r} (read-your-writes)")

    fan = order_model.objects.order_by("-total", "id").all_shards()
    top = [(o.customer_id, str(o.total), o._state.db) for o in fan[:4]]
    out(wrap(f"fan-out top 4 by total over {len(shards)} shards: {top}"))
    totals = order_model.objects.all_shards().aggregate(Sum("total"), n=Count("id"))
    out(f"  fan-out aggregate: {totals['n']} orders, sum {totals['total__sum']}")

    other = next(c.id for c in customers if shard_for_key(GROUP, c.id) != shard_for_key(GROUP, key))
    rows = list(order_model.objects.filter(customer_id__in=[key, other]).all_shards())
    prefetch_by_shard(rows, "customer")
    out(
        wrap(
            f"prefetch_by_shard over {len(rows)} orders of two shards: customers "
            f"{sorted({(o.customer.id, o.customer._state.db) for o in rows})}"
        )
    )
    out("  queries the library refuses (raised on purpose; each message says what to do):")
    attempts = 0
    refused = 0
    for label, attempt in (
        ("order_model.objects.all()", lambda: list(order_model.objects.all())),
        ("save with customer_id=None", lambda: order_model(total=1).save()),
        (
            "for_key(a) | for_key(b) on two shards",
            lambda: list(order_model.objects.for_key(key) | order_model.objects.for_key(other)),
        ),
        ("for_key(4.5)", lambda: order_model.objects.for_key(4.5)),
        (
            "Avg over shards",
            lambda: order_model.objects.all_shards().aggregate(models.Avg("total")),
        ),
    ):
        attempts += 1
        try:
            attempt()
        except ShardingError as exc:
            refused += 1
            out(f"    {label}")
            out(wrap(f"-> {type(exc).__name__}: {exc}", "      ", "         "))
        else:
            problem(out, f"{label} was not refused with a ShardingError")
    placed = "each where the ring says" if not misplaced else f"{misplaced} shard(s) MISPLACED"
    return (
        f"{len(customers)} customers and {totals['n']} orders on {len(shards)} shards, {placed} "
        f"(direct SQL); fan-out sum/count/top-N; {refused} of {attempts} unsafe queries refused"
    )

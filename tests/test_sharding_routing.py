"""Sharded reads and writes against real PostgreSQL: shard0 on pg1, shard1 and shard2 on pg2.

Where a row landed is always checked with direct SQL on the server behind each alias, never
through the library; where a read went is checked with ``_state.db``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import IntegrityError, connections
from django.db.models import Q, prefetch_related_objects
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_dbscale import consistency_context, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import (
    CrossShardRelation,
    InvalidShardKey,
    RingChangeRefused,
    ShardedManager,
    ShardKeyChanged,
    ShardKeyMissing,
    ShardKeyRequired,
    ShardMismatch,
    UnknownShard,
    prefetch_by_shard,
    shard_for_key,
    shard_of_id,
    using_shard,
)
from django_dbscale.sharding.ids import verify_ring_once
from django_dbscale.testing.harness import Services
from tests.testapp.models import (
    Note,
    ShardCoupon,
    ShardCustomer,
    ShardOrder,
    ShardOrderLine,
    ShardProduct,
    ShardTag,
)

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SHARDS = ("shard0", "shard1", "shard2")
PRIMARIES = ("default", *SHARDS)


def keys_on(shard: str, count: int = 1, start: int = 1000) -> list[int]:
    """Return the first *count* customer ids from *start* that the ring maps to *shard*."""
    found: list[int] = []
    key = start
    while len(found) < count:
        if shard_for_key("customers", key) == shard:
            found.append(key)
        key += 1
    return found


def sql(services: Services, alias: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run *query* directly on the database behind *alias* (no Django, no router)."""
    return services.alias_server(alias).execute(query, params, dbname=services.alias_dbname(alias))


def table_exists(services: Services, alias: str, table: str) -> bool:
    return bool(sql(services, alias, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0])


def holders(services: Services, table: str, pk: Any) -> list[str]:
    """Return the primaries whose *table* holds a row with id *pk*."""
    return [
        alias
        for alias in PRIMARIES
        if table_exists(services, alias, table)
        and sql(services, alias, f"SELECT 1 FROM {table} WHERE id = %s", (pk,))
    ]


def primary(alias: str | None) -> str | None:
    return dbscale_settings.primary_of.get(alias or "", alias)


@contextmanager
def no_queries(prime: bool = True) -> Iterator[None]:
    """Assert that the block runs no query on any database.

    The once-per-process ring stamp check of each shard is primed first: it is a read made
    by the first query routed to a shard, not by the refused call.
    """
    for shard in SHARDS if prime else ():
        verify_ring_once(shard)
    with ExitStack() as stack:
        captured = [
            stack.enter_context(CaptureQueriesContext(connections[alias])) for alias in connections
        ]
        yield
    assert [q for c in captured for q in c.captured_queries] == []


def customer_with_orders(key: int, n: int = 2) -> tuple[ShardCustomer, list[ShardOrder]]:
    customer = ShardCustomer.objects.create(id=key, name=f"c{key}")
    orders = [
        ShardOrder.objects.create(customer=customer, total=Decimal(i), rank=i) for i in range(n)
    ]
    return customer, orders


# -- placement -------------------------------------------------------------------------------


def test_rows_land_on_the_shard_the_ring_names(services: Services) -> None:
    placed: dict[str, list[int]] = {s: [] for s in SHARDS}
    for key in range(1, 61):
        customer = ShardCustomer.objects.create(id=key, name=f"c{key}")
        order = ShardOrder.objects.create(customer=customer, total=Decimal("1.50"))
        placed[shard_for_key("customers", key)].append(key)
        assert holders(services, "testapp_shardcustomer", key) == [shard_for_key("customers", key)]
        assert holders(services, "testapp_shardorder", order.pk) == [
            shard_for_key("customers", key)
        ]
    for shard in SHARDS:
        stored = sql(services, shard, "SELECT id FROM testapp_shardcustomer ORDER BY id")
        assert [row[0] for row in stored] == placed[shard]
        assert len(placed[shard]) > 5  # every shard really got rows


def test_sharded_tables_exist_only_on_their_shards(services: Services) -> None:
    for table in ("testapp_shardcustomer", "testapp_shardorder", "testapp_shardorderline"):
        assert [a for a in PRIMARIES if table_exists(services, a, table)] == list(SHARDS)
    for table in ("testapp_shardproduct", "testapp_note", "django_content_type"):
        assert [a for a in PRIMARIES if table_exists(services, a, table)] == ["default"]
    # Every shard records the same applied migrations, so drift is visible per shard.
    for shard in SHARDS:
        assert table_exists(services, shard, "django_migrations")


# -- reads --------------------------------------------------------------------------------------


def test_shard_key_filters_read_from_the_key_shard() -> None:
    key = keys_on("shard1")[0]
    other = keys_on("shard2")[0]
    customer, orders = customer_with_orders(key)
    customer_with_orders(other)
    expected = sorted(o.pk for o in orders)
    cases = {
        "customer_id=": ShardOrder.objects.filter(customer_id=key),
        "customer=obj": ShardOrder.objects.filter(customer=customer),
        "customer__id=": ShardOrder.objects.filter(customer__id=key),
        "str key": ShardOrder.objects.filter(customer_id=str(key)),
        "__in one shard": ShardOrder.objects.filter(customer__in=[key, *keys_on("shard1", 2)[1:]]),
        "nested Q and": ShardOrder.objects.filter(Q(status="open") & Q(customer_id=key)),
        "for_key": ShardOrder.objects.for_key(key),
        "for_key str": ShardOrder.objects.for_key(str(key)),
        "related manager": customer.orders.all(),
        "using_shard": ShardOrder.objects.filter(status="open"),
    }
    for name, qs in cases.items():
        with using_shard("customers", key) if name == "using_shard" else ExitStack():
            got = list(qs.order_by("pk"))
        assert [o.pk for o in got] == expected, name
        assert {primary(o._state.db) for o in got} == {"shard1"}, name
    assert ShardOrder.objects.get(pk=orders[0].pk, customer_id=key).total == Decimal(0)
    assert ShardOrder.objects.filter(customer_id=key).count() == 2
    assert ShardOrder.objects.filter(customer_id=other).count() == 2


def test_read_without_a_shard_key_raises_and_queries_nothing() -> None:
    spans = [*keys_on("shard0", 1), *keys_on("shard1", 1)]
    unroutable: dict[str, Callable[[], object]] = {
        "all": lambda: list(ShardOrder.objects.all()),
        "other field": lambda: list(ShardOrder.objects.filter(status="open")),
        "count": lambda: ShardOrder.objects.count(),
        "exists": lambda: ShardOrder.objects.filter(total__gt=1).exists(),
        "or": lambda: list(ShardOrder.objects.filter(Q(customer_id=1) | Q(customer_id=2))),
        "exclude": lambda: list(ShardOrder.objects.exclude(customer_id=1)),
        "in across shards": lambda: list(ShardOrder.objects.filter(customer__in=spans)),
        "join filter": lambda: list(ShardOrder.objects.filter(lines__customer_id=1)),
        "get by pk": lambda: ShardOrder.objects.get(pk=1),
        "delete": lambda: ShardOrder.objects.filter(status="x").delete(),
        "update": lambda: ShardOrder.objects.filter(status="x").update(status="y"),
    }
    for name, call in unroutable.items():
        with no_queries(), pytest.raises(ShardKeyRequired) as caught:
            call()
        message = str(caught.value)
        assert "ShardOrder" in message, name
        assert "for_key" in message or "all_shards" in message, name


def test_using_shard_pins_unfiltered_queries_and_writes() -> None:
    key0, key2 = keys_on("shard0")[0], keys_on("shard2")[0]
    customer_with_orders(key0, 3)
    customer_with_orders(key2, 1)
    with using_shard("customers", key2):
        assert ShardOrder.objects.count() == 1
        assert ShardOrder.objects.filter(status="open").update(status="paid") == 1
        # An explicit key in the query wins over the pin.
        assert ShardOrder.objects.filter(customer_id=key0).count() == 3
    with using_shard("customers", shard="shard0"):
        assert sorted(ShardOrder.objects.values_list("status", flat=True)) == ["open"] * 3


def test_following_relations_stays_on_the_row_shard(services: Services) -> None:
    key = keys_on("shard2")[0]
    customer, orders = customer_with_orders(key, 2)
    ShardOrderLine.objects.create(order=orders[0], customer_id=key, sku="a", qty=2)
    order = ShardOrder.objects.filter(customer_id=key).order_by("rank").first()
    assert order is not None
    assert order.customer.name == f"c{key}"
    assert primary(order.customer._state.db) == "shard2"
    order.status = "stale"
    order.refresh_from_db()
    assert order.status == "open" and primary(order._state.db) == "shard2"
    assert [line.sku for line in order.lines.all()] == ["a"]
    fetched = list(
        ShardOrder.objects.filter(customer_id=key)
        .select_related("customer")
        .prefetch_related("lines")
        .order_by("rank")
    )
    assert [len(o.lines.all()) for o in fetched] == [1, 0]
    assert fetched[0].customer.pk == key
    assert sorted(o.pk for o in customer.orders.all()) == sorted(o.pk for o in orders)


def test_many_to_many_links_live_on_the_shard_of_both_rows(services: Services) -> None:
    key = keys_on("shard2")[0]
    other = keys_on("shard0")[0]
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name=str(k)) for k in (key, other)])
    order = ShardOrder.objects.create(customer_id=key)
    tags = [ShardTag.objects.create(customer_id=key, label=label) for label in ("a", "b")]
    order.tags.add(*tags)
    assert sorted(t.label for t in order.tags.all()) == ["a", "b"]
    assert [o.pk for o in tags[0].orders.all()] == [order.pk]
    links = "SELECT shardorder_id, shardtag_id FROM testapp_shardorder_tags ORDER BY 2"
    assert sql(services, "shard2", links) == [(order.pk, tags[0].pk), (order.pk, tags[1].pk)]
    assert sql(services, "shard0", links) == sql(services, "shard1", links) == []
    assert not table_exists(services, "default", "testapp_shardorder_tags")
    order.tags.remove(tags[0])
    assert sql(services, "shard2", links) == [(order.pk, tags[1].pk)]
    elsewhere = ShardTag.objects.create(customer_id=other, label="far")
    with pytest.raises(CrossShardRelation, match="'shard0'"):
        order.tags.add(elsewhere)
    assert sql(services, "shard2", links) == [(order.pk, tags[1].pk)]
    fetched = ShardOrder.objects.filter(customer_id=key).prefetch_related("tags").get()
    assert [t.label for t in fetched.tags.all()] == ["b"]


def test_reference_rows_are_read_from_default_not_from_the_shard(services: Services) -> None:
    product = ShardProduct.objects.create(name="widget")
    key = keys_on("shard1")[0]
    ShardCustomer.objects.create(id=key, name="c")
    order = ShardOrder.objects.create(customer_id=key, product=product)
    loaded = ShardOrder.objects.for_key(key).get(pk=order.pk)
    assert primary(loaded._state.db) == "shard1"
    assert loaded.product is not None and loaded.product.name == "widget"
    assert primary(loaded.product._state.db) == "default"
    assert holders(services, "testapp_shardproduct", product.pk) == ["default"]
    # The reverse direction needs the shard key: the product does not know it.
    assert list(product.shard_orders.filter(customer_id=key)) == [loaded]
    with pytest.raises(ShardKeyRequired):
        list(product.shard_orders.all())


def test_for_id_routes_by_the_shard_number_inside_the_id() -> None:
    for shard in SHARDS:
        key = keys_on(shard)[0]
        _, (order,) = customer_with_orders(key, 1)
        assert shard_of_id("customers", order.pk) == shard
        got = ShardOrder.objects.for_id(order.pk).get()
        assert got.pk == order.pk and primary(got._state.db) == shard


def test_async_queries_route_by_key_and_pins_stay_in_their_task() -> None:
    key1, key2 = keys_on("shard1")[0], keys_on("shard2")[0]
    customer_with_orders(key1, 1)
    customer_with_orders(key2, 2)

    async def count_pinned(key: int) -> int:
        with using_shard("customers", key):
            await asyncio.sleep(0.01)
            return int(await ShardOrder.objects.acount())

    async def main() -> tuple[int, ...]:
        first = await ShardOrder.objects.filter(customer_id=key2).afirst()
        assert first is not None and primary(first._state.db) == "shard2"
        return tuple(await asyncio.gather(count_pinned(key1), count_pinned(key2)))

    assert asyncio.run(main()) == (1, 2)


# -- writes -------------------------------------------------------------------------------------


def test_bulk_create_splits_rows_by_shard(services: Services) -> None:
    keys = {shard: keys_on(shard, 3) for shard in SHARDS}
    for shard_keys in keys.values():
        ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name=str(k)) for k in shard_keys])
    orders = [ShardOrder(customer_id=k, total=k) for ks in keys.values() for k in ks for _ in "ab"]
    created = ShardOrder.objects.bulk_create(orders)
    assert created == orders and all(isinstance(o.pk, int) for o in orders)
    for shard, shard_keys in keys.items():
        stored = sql(services, shard, "SELECT id, customer_id FROM testapp_shardorder ORDER BY id")
        expected = sorted((o.pk, o.customer_id) for o in orders if o.customer_id in shard_keys)
        assert stored == expected
        assert all(o._state.db == shard for o in orders if o.customer_id in shard_keys)


def test_get_or_create_and_update_or_create_use_the_key_shard(services: Services) -> None:
    key = keys_on("shard2")[0]
    customer, created = ShardCustomer.objects.get_or_create(id=key, defaults={"name": "new"})
    assert created and holders(services, "testapp_shardcustomer", key) == ["shard2"]
    again, created = ShardCustomer.objects.get_or_create(id=key, defaults={"name": "other"})
    assert not created and again.name == "new"
    updated, created = ShardCustomer.objects.update_or_create(id=key, defaults={"name": "upd"})
    assert not created
    assert sql(services, "shard2", "SELECT name FROM testapp_shardcustomer WHERE id = %s", (key,))
    assert sql(
        services, "shard2", "SELECT name FROM testapp_shardcustomer WHERE id = %s", (key,)
    ) == [("upd",)]
    order, created = customer.orders.get_or_create(status="rare")
    assert created and holders(services, "testapp_shardorder", order.pk) == ["shard2"]


def test_delete_runs_on_the_row_shard_and_cascades_there(services: Services) -> None:
    key = keys_on("shard0")[0]
    keep = keys_on("shard1")[0]
    customer, orders = customer_with_orders(key, 3)
    customer_with_orders(keep, 1)
    ShardOrderLine.objects.create(order=orders[0], customer_id=key, sku="x")
    count, per_model = customer.delete()
    assert per_model == {
        "testapp.ShardCustomer": 1,
        "testapp.ShardOrder": 3,
        "testapp.ShardOrderLine": 1,
    }
    assert sql(services, "shard0", "SELECT count(*) FROM testapp_shardorder") == [(0,)]
    assert sql(services, "shard1", "SELECT count(*) FROM testapp_shardorder") == [(1,)]
    assert ShardOrder.objects.filter(customer_id=keep).delete()[0] == 1


def test_full_clean_checks_uniqueness_on_the_row_shard() -> None:
    key = keys_on("shard1")[0]
    ShardCustomer.objects.create(id=key, name="first")
    ShardCustomer(id=keys_on("shard1", 2)[1], name="ok").full_clean()
    with pytest.raises(ValidationError, match="already exists"):
        ShardCustomer(id=key, name="dup").full_clean()


# -- bad input: refused before anything is written --------------------------------------------


def count_everywhere(services: Services, table: str) -> int:
    return sum(sql(services, s, f"SELECT count(*) FROM {table}")[0][0] for s in SHARDS)


def test_none_shard_key_is_refused_before_any_write(services: Services) -> None:
    with no_queries(), pytest.raises(ShardKeyMissing, match=r"ShardOrder\.customer is None"):
        ShardOrder(total=1).save()
    with no_queries(), pytest.raises(ShardKeyMissing, match="customer"):
        ShardOrder.objects.create(total=1)
    key = keys_on("shard0")[0]
    ShardCustomer.objects.create(id=key, name="c")
    with no_queries(), pytest.raises(ShardKeyMissing):
        ShardOrder.objects.bulk_create([ShardOrder(customer_id=key), ShardOrder(total=2)])
    assert count_everywhere(services, "testapp_shardorder") == 0
    with pytest.raises(InvalidShardKey, match="None cannot be a shard key"):
        ShardOrder.objects.for_key(None)


def test_changing_the_shard_key_of_a_stored_row_is_refused(services: Services) -> None:
    old, new = keys_on("shard0")[0], keys_on("shard1")[0]
    same_shard = keys_on("shard0", 2)[1]
    for key in (old, new, same_shard):
        ShardCustomer.objects.create(id=key, name=str(key))
    order = ShardOrder.objects.create(customer_id=old, total=3)
    loaded = ShardOrder.objects.for_key(old).get(pk=order.pk)
    for target in (new, same_shard):
        loaded.customer_id = target
        with no_queries(), pytest.raises(ShardKeyChanged, match=f"from {old} to {target}"):
            loaded.save()
        with no_queries(), pytest.raises(ShardKeyChanged):
            loaded.delete()
    with no_queries(), pytest.raises(ShardKeyChanged, match="shard key"):
        ShardOrder.objects.filter(customer_id=old).update(customer_id=new)
    with no_queries(), pytest.raises(ShardKeyChanged):
        ShardOrder.objects.bulk_update([loaded], ["customer"])
    with no_queries(), pytest.raises(ShardKeyChanged):
        ShardOrder.objects.update_or_create(
            pk=order.pk, customer_id=old, defaults={"customer_id": new}
        )
    assert sql(services, "shard0", "SELECT id, customer_id FROM testapp_shardorder") == [
        (order.pk, old)
    ]
    assert sql(services, "shard1", "SELECT count(*) FROM testapp_shardorder") == [(0,)]
    # Unchanged key: saving works and stays on shard0.
    loaded.customer_id = old
    loaded.status = "paid"
    loaded.save()
    assert sql(services, "shard0", "SELECT status FROM testapp_shardorder") == [("paid",)]


def test_explicit_alias_that_is_not_the_key_shard_is_refused(services: Services) -> None:
    key = keys_on("shard0")[0]
    ShardCustomer.objects.create(id=key, name="c")
    with no_queries(), pytest.raises(ShardMismatch, match="maps to shard 'shard0'"):
        ShardOrder(customer_id=key).save(using="shard1")
    with no_queries(), pytest.raises(ShardMismatch):
        ShardOrder.objects.using("shard2").bulk_create([ShardOrder(customer_id=key)])
    with no_queries(), pytest.raises(ShardMismatch):
        ShardOrder.objects.for_key(keys_on("shard1")[0]).create(customer_id=key)
    with no_queries(), pytest.raises(ShardMismatch, match="Drop one"):
        list(ShardOrder.objects.for_key(keys_on("shard1")[0]).filter(customer_id=key))
    with pytest.raises(UnknownShard, match="not a shard of group 'customers'"):
        ShardOrder.objects.on_shard("default")
    assert count_everywhere(services, "testapp_shardorder") == 0


def test_relations_across_shards_are_refused(services: Services) -> None:
    key0, key1 = keys_on("shard0")[0], keys_on("shard1")[0]
    c0 = ShardCustomer.objects.create(id=key0, name="zero")
    c1 = ShardCustomer.objects.create(id=key1, name="one")
    order = ShardOrder.objects.create(customer=c0)
    with pytest.raises(CrossShardRelation, match="'shard1'.*'shard0'|'shard0'.*'shard1'"):
        order.customer = c1
    line = ShardOrderLine(order=order, sku="x", customer_id=key1)
    with no_queries(), pytest.raises(CrossShardRelation, match="must share the shard key"):
        line.save()
    assert count_everywhere(services, "testapp_shardorderline") == 0
    # A sharded row may point to an unsharded reference row.
    order.product = ShardProduct.objects.create(name="p")
    order.save()
    # A model of another database entirely is no sharding concern.
    assert Note.objects.create(title="n").pk


def test_database_constraints_back_the_colocation_rule(services: Services) -> None:
    key0, key1 = keys_on("shard0")[0], keys_on("shard1")[0]
    ShardCustomer.objects.create(id=key0, name="zero")
    order = ShardOrder.objects.create(customer_id=key0)
    # Bypassing the Python-side check (ids only, no cached instances) still cannot create a
    # dangling cross-shard reference: shard1 has no such order.
    with pytest.raises(IntegrityError):
        ShardOrderLine.objects.create(order_id=order.pk, customer_id=key1, sku="x")


# -- replicas per shard -------------------------------------------------------------------------


def test_shard_reads_honour_read_your_writes_with_replay_paused(
    services: Services, paused: Any
) -> None:
    key = keys_on("shard1")[0]
    ShardCustomer.objects.create(id=key, name="c")
    services.pg2_replica.wait_for_replay()
    replicas.monitor.refresh()
    assert replicas.monitor.status("shard1_replica").usable(time.monotonic())
    paused(services.pg2_replica)
    order = ShardOrder.objects.create(customer_id=key, total=7)
    # The shard's replica really does not have the row.
    assert (
        sql(
            services,
            "shard1_replica",
            "SELECT 1 FROM testapp_shardorder WHERE id = %s",
            (order.pk,),
        )
        == []
    )
    got = ShardOrder.objects.filter(customer_id=key).get()
    assert got.pk == order.pk and got._state.db == "shard1"
    # A context that did not write reads the shard's replica (and so does not see it yet).
    with consistency_context():
        stale = list(ShardOrder.objects.filter(customer_id=key))
        customer = ShardCustomer.objects.for_key(key).get()
    assert stale == []
    assert customer._state.db == "shard1_replica"


# -- combined querysets, prefetching, fixtures ---------------------------------------------------


def test_querysets_combined_across_shards_are_refused_not_read_from_one_shard() -> None:
    (key1,), (key2,) = keys_on("shard1", 1), keys_on("shard2", 1)
    key1b = keys_on("shard1", 2)[1]
    c1, orders1 = customer_with_orders(key1, 1)
    customer_with_orders(key2, 1)
    _, orders1b = customer_with_orders(key1b, 1)
    spanning: dict[str, Callable[[], object]] = {
        "for_key | for_key": lambda: list(
            ShardOrder.objects.for_key(key1) | ShardOrder.objects.for_key(key2)
        ),
        "filter | filter": lambda: list(
            ShardOrder.objects.filter(customer_id=key1)
            | ShardOrder.objects.filter(customer_id=key2)
        ),
        "filter ^ filter": lambda: list(
            ShardOrder.objects.filter(customer_id=key1)
            ^ ShardOrder.objects.filter(customer_id=key2)
        ),
        "related manager | filter": lambda: list(
            c1.orders.all() | ShardOrder.objects.filter(customer_id=key2)
        ),
        "union of filters": lambda: list(
            ShardOrder.objects.filter(customer_id=key1).union(
                ShardOrder.objects.filter(customer_id=key2)
            )
        ),
        "union of for_key": lambda: list(
            ShardOrder.objects.for_key(key1).union(ShardOrder.objects.for_key(key2))
        ),
        "union with an unrouted part": lambda: list(
            ShardOrder.objects.for_key(key1).union(ShardOrder.objects.filter(status="open"))
        ),
        "count of a difference": lambda: (
            ShardOrder.objects.for_key(key1).difference(ShardOrder.objects.for_key(key2)).count()
        ),
    }
    for name, call in spanning.items():
        with no_queries(), pytest.raises(ShardKeyRequired, match="ShardOrder") as caught:
            call()
        expected = "combined with" if ("|" in name or "^" in name) else "union"
        if "difference" in name:
            expected = "difference"
        assert expected in str(caught.value), name
    with no_queries(), pytest.raises(ShardMismatch, match="combined with &"):
        ShardOrder.objects.for_key(key1) & ShardOrder.objects.filter(customer_id=key2)
    # Parts that all live on one shard combine, on that shard.
    both = {orders1[0].pk, orders1b[0].pk}
    same_shard = {
        "filter | filter": ShardOrder.objects.filter(customer_id=key1)
        | ShardOrder.objects.filter(customer_id=key1b),
        "related manager | filter": c1.orders.all() | ShardOrder.objects.filter(customer_id=key1b),
        "union": ShardOrder.objects.filter(customer_id=key1).union(
            ShardOrder.objects.for_key(key1b).filter(customer_id=key1b)
        ),
    }
    for name, qs in same_shard.items():
        got = list(qs)
        assert {o.pk for o in got} == both, name
        assert {primary(o._state.db) for o in got} == {"shard1"}, name
    narrowed = c1.orders.all() & ShardOrder.objects.filter(status="open")
    assert [o.pk for o in narrowed] == [orders1[0].pk]


def test_prefetch_over_rows_of_several_shards_is_refused_or_done_per_shard() -> None:
    key1, key2 = keys_on("shard1")[0], keys_on("shard2")[0]
    rows: dict[int, ShardOrder] = {}
    for key in (key1, key2):
        _, (order,) = customer_with_orders(key, 1)
        ShardOrderLine.objects.create(order=order, customer_id=key, sku=f"s{key}")
        order.tags.add(ShardTag.objects.create(customer_id=key, label=f"t{key}"))
        rows[key] = order

    def loaded() -> list[ShardOrder]:
        return list(ShardOrder.objects.all_shards().order_by("customer_id"))

    for lookup in ("lines", "tags"):
        with pytest.raises(CrossShardRelation, match="prefetch_by_shard"):
            prefetch_related_objects(loaded(), lookup)
    orders = loaded()
    prefetch_by_shard(orders, "lines", "tags")
    assert [(o.customer_id, [x.sku for x in o.lines.all()]) for o in orders] == [
        (k, [f"s{k}"]) for k in sorted(rows)
    ]
    assert [[t.label for t in o.tags.all()] for o in orders] == [[f"t{k}"] for k in sorted(rows)]
    # A fan-out's own prefetch runs on each shard.
    fanned = list(ShardOrder.objects.prefetch_related("lines").order_by("customer_id").all_shards())
    assert [[x.sku for x in o.lines.all()] for o in fanned] == [[f"s{k}"] for k in sorted(rows)]


def test_loaddata_refuses_rows_of_another_shard(services: Services, tmp_path: Any) -> None:
    key0, key1 = keys_on("shard0")[0], keys_on("shard1")[0]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(
        json.dumps(
            [
                {"model": "testapp.shardcustomer", "pk": key0, "fields": {"name": "zero"}},
                {"model": "testapp.shardcustomer", "pk": key1, "fields": {"name": "one"}},
            ]
        )
    )
    with pytest.raises(ShardMismatch, match=r"maps to shard 'shard1'.*loaddata"):
        call_command("loaddata", str(mixed), database="shard0", verbosity=0)
    assert count_everywhere(services, "testapp_shardcustomer") == 0
    own = tmp_path / "own.json"
    own.write_text(
        json.dumps([{"model": "testapp.shardcustomer", "pk": key0, "fields": {"name": "zero"}}])
    )
    call_command("loaddata", str(own), database="shard0", verbosity=0)
    assert sql(services, "shard0", "SELECT id, name FROM testapp_shardcustomer") == [(key0, "zero")]


def test_none_reads_no_database_and_needs_no_key() -> None:
    product = ShardProduct.objects.create(name="p")
    with no_queries():
        assert list(ShardOrder.objects.none()) == []
        assert ShardOrder.objects.none().count() == 0
        assert not ShardOrder.objects.none().exists()
        assert list(ShardOrder.objects.filter(status="x").none()) == []
        assert list(product.shard_orders.none()) == []


def test_base_manager_routes_like_the_default_manager() -> None:
    key = keys_on("shard2")[0]
    _, (order,) = customer_with_orders(key, 1)
    assert isinstance(ShardOrder._base_manager, ShardedManager)
    assert ShardOrder._base_manager.name != "objects"  # unfiltered, not a custom objects
    got = ShardOrder._base_manager.filter(customer_id=key).get()
    assert got.pk == order.pk and primary(got._state.db) == "shard2"
    with no_queries(), pytest.raises(ShardKeyRequired):
        list(ShardOrder._base_manager.filter(status="open"))


def test_using_a_shard_that_does_not_hold_the_filtered_key_is_refused() -> None:
    key1 = keys_on("shard1")[0]
    _, (order,) = customer_with_orders(key1, 1)
    with no_queries(), pytest.raises(ShardMismatch, match=r"'shard0'.*\['shard1'\]"):
        list(ShardOrder.objects.using("shard0").filter(customer_id=key1))
    with no_queries(), pytest.raises(ShardMismatch):
        ShardOrder.objects.using("shard2").filter(customer__in=[key1]).count()
    # The shard itself, or its replica, is fine; so is a per-shard job over several keys.
    assert [o.pk for o in ShardOrder.objects.using("shard1").filter(customer_id=key1)] == [order.pk]
    assert ShardOrder.objects.using("shard1_replica").filter(customer_id=key1).count() in (0, 1)
    spanning = [key1, keys_on("shard0")[0]]
    assert ShardOrder.objects.using("shard1").filter(customer__in=spanning).count() == 1


# -- writes that must not go astray ----------------------------------------------------------


def test_bulk_update_of_rows_of_another_shard_is_refused(services: Services) -> None:
    key1, key2 = keys_on("shard1")[0], keys_on("shard2")[0]
    customer_with_orders(key1, 1)
    _, (order,) = customer_with_orders(key2, 1)
    loaded = ShardOrder.objects.filter(customer_id=key2).get()
    loaded.status = "changed"
    for qs in (ShardOrder.objects.for_key(key1), ShardOrder.objects.using("shard1")):
        with no_queries(), pytest.raises(ShardMismatch, match="maps to shard 'shard2'"):
            qs.bulk_update([loaded], ["status"])
    stored = "SELECT status FROM testapp_shardorder WHERE id = %s"
    assert sql(services, "shard2", stored, (order.pk,)) == [("open",)]
    assert ShardOrder.objects.for_key(key2).bulk_update([loaded], ["status"]) == 1
    assert sql(services, "shard2", stored, (order.pk,)) == [("changed",)]


def test_bulk_update_of_a_row_whose_key_changed_is_refused(services: Services) -> None:
    old, new = keys_on("shard0")[0], keys_on("shard1")[0]
    customer_with_orders(old, 1)
    ShardCustomer.objects.create(id=new, name="new")
    loaded = ShardOrder.objects.filter(customer_id=old).get()
    loaded.customer_id = new
    loaded.status = "moved"
    # Only "status" is written, but the row would be looked for on the new key's shard.
    with no_queries(), pytest.raises(ShardKeyChanged, match=f"from {old} to {new}"):
        ShardOrder.objects.bulk_update([loaded], ["status"])
    assert sql(services, "shard0", "SELECT customer_id, status FROM testapp_shardorder") == [
        (old, "open")
    ]


def test_key_change_is_refused_after_only_defer_and_bulk_create(services: Services) -> None:
    key, same_shard = keys_on("shard0", 2)
    other = keys_on("shard1")[0]
    for k in (key, same_shard, other):
        ShardCustomer.objects.create(id=k, name=str(k))
    (created,) = ShardOrder.objects.bulk_create([ShardOrder(customer_id=key)])
    cases = {
        "only()": ShardOrder.objects.filter(customer_id=key).only("status").get(),
        "defer()": ShardOrder.objects.filter(customer_id=key).defer("customer", "total").get(),
        "bulk_create()": created,
    }
    for name, row in cases.items():
        assert "customer_id" in row.__dict__, name  # the key is never deferred
        for target in (same_shard, other):
            row.customer_id = target
            with no_queries(), pytest.raises(ShardKeyChanged, match=f"from {key} to {target}"):
                row.save()
    assert sql(services, "shard0", "SELECT customer_id FROM testapp_shardorder") == [(key,)]
    # refresh_from_db() of the key re-reads it: saving the original key again works.
    row = cases["only()"]
    row.refresh_from_db(fields=["customer"])
    row.status = "kept"
    row.save()
    assert sql(services, "shard0", "SELECT status FROM testapp_shardorder") == [("kept",)]


def test_a_row_read_before_the_ring_changed_is_not_written_elsewhere(
    services: Services, no_shard_map: None
) -> None:
    keys = [k for shard in SHARDS for k in keys_on(shard, 4)]
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="c") for k in keys])
    rows = {c.pk: c for c in ShardCustomer.objects.all_shards()}
    changed = {
        **settings.DBSCALE,
        "SHARD_GROUPS": {"customers": {"SHARDS": list(SHARDS), "VNODES": 16}},
    }
    with override_settings(DBSCALE=changed):
        moved = next(
            c for c in rows.values() if shard_for_key("customers", c.pk) != primary(c._state.db)
        )
        home = primary(moved._state.db)
        changed_ring = pytest.raises(ShardKeyChanged, match="ring of group 'customers' changed")
        with no_queries(prime=False), changed_ring:
            moved.save(using=home)
        with pytest.raises(RingChangeRefused, match="VNODES=8, now 16"):
            moved.save()
    assert sql(
        services, home, "SELECT count(*) FROM testapp_shardcustomer WHERE id = %s", (moved.pk,)
    ) == [(1,)]


def test_create_through_a_reference_rows_manager_routes_by_the_key(services: Services) -> None:
    product = ShardProduct.objects.create(name="p")
    key = keys_on("shard2")[0]
    ShardCustomer.objects.create(id=key, name="c")
    order = product.shard_orders.create(customer_id=key)
    assert holders(services, "testapp_shardorder", order.pk) == ["shard2"]
    again, created = product.shard_orders.get_or_create(customer_id=key, status="open")
    assert not created and again.pk == order.pk
    with pytest.raises(ShardKeyMissing):
        product.shard_orders.create()


def test_full_clean_checks_unique_fields_and_constraints_on_the_row_shard() -> None:
    key, same_shard = keys_on("shard1", 2)
    elsewhere = keys_on("shard2")[0]
    ShardCoupon.objects.create(customer_id=key, code="WELCOME", label="Spring")
    # The same code and label on another shard are fine: uniqueness is per shard.
    ShardCoupon(customer_id=elsewhere, code="WELCOME", label="spring").full_clean()
    with pytest.raises(ValidationError, match="Code already exists"):
        ShardCoupon(customer_id=same_shard, code="WELCOME").full_clean()
    with pytest.raises(ValidationError, match="testapp_shardcoupon_label_ci"):
        ShardCoupon(customer_id=same_shard, code="OTHER", label="SPRING").full_clean()
    ShardCoupon(customer_id=same_shard, code="OTHER", label="summer").full_clean()


def test_error_messages_name_the_model_and_a_fix_that_exists() -> None:
    through = ShardOrder.tags.through
    with pytest.raises(ShardKeyRequired) as caught:
        list(through.objects.all())
    message = str(caught.value)
    assert "link table of ShardOrder.tags" in message and "for_key" not in message
    with pytest.raises(InvalidShardKey, match=r"for_key\(None\).*ShardOrder\.customer"):
        ShardOrder.objects.for_key(None)
    for bad in (4.5, True, Decimal("42")):
        with pytest.raises(InvalidShardKey, match="never rounded"):
            ShardOrder.objects.for_key(bad)
    with pytest.raises(InvalidShardKey, match="never rounded"):
        ShardOrder.objects.filter(customer_id=True)
    with pytest.raises(UnknownShard, match="only 3 shards"):
        ShardOrder.objects.for_id((1 << 22) | (9 << 10))
    key = keys_on("shard0")[0]
    ShardCustomer.objects.create(id=key, name="c")
    with pytest.raises(ShardMismatch) as mismatch:
        ShardOrder(customer_id=key).save(using="shard1")
    assert "explicit" not in str(mismatch.value) and "name 'shard0'" in str(mismatch.value)

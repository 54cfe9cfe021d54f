"""Fan-out queries equal the union of the same query run on each shard.

The expected *rows* are read with direct SQL from every shard; the expected *order* is
computed by PostgreSQL itself over the union (``unnest`` of the rows, same ``ORDER BY``), so
neither side of an assertion trusts the library's merge.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.models import Avg, Count, F, Max, Min, StdDev, Sum
from django.db.models.expressions import RawSQL
from django.db.models.functions import Collate, Lower

from django_dbscale import consistency, consistency_context, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import (
    FanoutNotSupported,
    current_shard,
    fanout,
    shard_for_key,
    using_shard,
)
from django_dbscale.sharding.fanout import run_on_shards
from django_dbscale.testing.harness import Services
from tests.testapp.models import ShardCoupon, ShardCustomer, ShardOrder

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SHARDS = ("shard0", "shard1", "shard2")
COLUMNS = "id, customer_id, total, rank, status, created"
T0 = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)


def sql(services: Services, alias: str, query: str, params: Any = ()) -> list[Any]:
    return services.alias_server(alias).execute(query, params, dbname=services.alias_dbname(alias))


def union_rows(services: Services, where: str = "TRUE") -> list[tuple[Any, ...]]:
    """Every order row on every shard, read with direct SQL."""
    rows: list[tuple[Any, ...]] = []
    for shard in SHARDS:
        rows += sql(services, shard, f"SELECT {COLUMNS} FROM testapp_shardorder WHERE {where}")
    return rows


def pg_order(services: Services, rows: list[tuple[Any, ...]], order_by: str) -> list[int]:
    """Return the ids of *rows* in the order PostgreSQL gives them for *order_by*."""
    if not rows:
        return []
    cols = list(zip(*rows, strict=True))
    result = services.pg1.execute(
        "SELECT id FROM unnest(%s::bigint[], %s::bigint[], %s::numeric[], %s::int[],"
        " %s::text[], %s::timestamptz[]) AS v(id, customer_id, total, rank, status, created)"
        f" ORDER BY {order_by}",
        [list(c) for c in cols],
    )
    return [r[0] for r in result]


@pytest.fixture
def dataset(services: Services) -> list[tuple[Any, ...]]:
    """~150 orders of 24 customers over the three shards, with ties and NULL ranks."""
    customers = [ShardCustomer(id=k, name=f"cust{k:03d}") for k in range(1, 25)]
    ShardCustomer.objects.bulk_create(customers)
    orders = []
    for c in customers:
        for i in range(c.id % 9 + 2):
            orders.append(
                ShardOrder(
                    customer_id=c.id,
                    total=Decimal(i * 3 % 7) + Decimal("0.50"),
                    rank=None if (c.id + i) % 5 == 0 else (c.id * 7 + i) % 11,
                    status=("open", "paid", "Shipped", "open-late")[(c.id + i) % 4],
                    created=T0 + dt.timedelta(minutes=c.id * 13 + i * 17),
                )
            )
    ShardOrder.objects.bulk_create(orders)
    rows = union_rows(services)
    per_shard = {s: sum(1 for r in rows if shard_for_key("customers", r[1]) == s) for s in SHARDS}
    assert len(rows) == len(orders) and min(per_shard.values()) > 10
    return rows


ORDERINGS = [
    (("-total", "rank", "id"), "total DESC, rank ASC, id ASC"),
    (("status", "-created"), 'status COLLATE "C" ASC, created DESC'),
    ((F("rank").asc(nulls_first=True), "id"), "rank ASC NULLS FIRST, id"),
    ((F("rank").desc(nulls_last=True), "-id"), "rank DESC NULLS LAST, id DESC"),
    (("-rank", "customer_id", "id"), "rank DESC, customer_id, id"),
    (("pk",), "id"),
]


@pytest.mark.parametrize(("order", "pg"), ORDERINGS)
def test_fanout_rows_and_order_equal_the_union_ordered_by_postgres(
    services: Services, dataset: list[tuple[Any, ...]], order: tuple[Any, ...], pg: str
) -> None:
    expected = pg_order(services, dataset, pg)

    def fan() -> Any:
        return ShardOrder.objects.order_by(*order).all_shards()

    got = list(fan())
    assert [o.pk for o in got] == expected
    # Each row came from the shard its key maps to (or that shard's replica).
    for order_row in got:
        db = dbscale_settings.primary_of.get(order_row._state.db, order_row._state.db)
        assert db == shard_for_key("customers", order_row.customer_id)
    for start, stop in ((0, 5), (7, 23), (40, None), (0, 1), (len(expected) - 3, None), (500, 600)):
        assert [o.pk for o in fan()[start:stop]] == expected[start:stop], (start, stop)
        assert fan()[start:stop].count() == len(expected[start:stop])
    assert [o.pk for o in fan()[::10]] == expected[::10]
    assert fan()[11].pk == expected[11]
    assert [o.pk for o in fan()[5:40][10:20]] == expected[15:25]


def test_fanout_equals_the_same_query_run_shard_by_shard(
    services: Services, dataset: list[tuple[Any, ...]]
) -> None:
    qs = ShardOrder.objects.filter(total__gte=Decimal("2")).exclude(status="paid")
    per_shard = {s: list(qs.on_shard(s).order_by("id")) for s in SHARDS}
    union = sorted(o.pk for rows in per_shard.values() for o in rows)
    fan = qs.all_shards()
    assert sorted(o.pk for o in fan) == union
    assert fan.count() == len(union) == len(fan)
    assert {s: sorted(o.pk for o in rows) for s, rows in fan.per_shard().items()} == {
        s: [o.pk for o in rows] for s, rows in per_shard.items()
    }
    direct = union_rows(services, "total >= 2 AND status <> 'paid'")
    assert sorted(r[0] for r in direct) == union


def test_values_shapes_merge_in_order_and_strip_helper_columns(
    services: Services, dataset: list[tuple[Any, ...]]
) -> None:
    expected = pg_order(services, dataset, "created DESC")
    by_id = {r[0]: r for r in dataset}
    base = ShardOrder.objects.order_by("-created").all_shards()
    assert list(base.values_list("id", flat=True)) == expected
    assert list(base.values("status")) == [{"status": by_id[i][4]} for i in expected]
    assert list(base.values_list("status", "customer_id")) == [
        (by_id[i][4], by_id[i][1]) for i in expected
    ]
    named = list(base.values_list("customer_id", "id", named=True)[:4])
    assert [(r.customer_id, r.id) for r in named] == [(by_id[i][1], i) for i in expected[:4]]
    assert list(base.values_list("customer_id", flat=True)[3:9]) == [
        by_id[i][1] for i in expected[3:9]
    ]


def test_distinct_values_are_unique_across_shards(
    services: Services, dataset: list[tuple[Any, ...]]
) -> None:
    rows = services.pg1.execute(
        'SELECT s FROM (SELECT DISTINCT s COLLATE "C" AS s FROM unnest(%s::text[]) s) t ORDER BY s',
        [[r[4] for r in dataset]],
    )
    statuses = [r[0] for r in rows]
    fan = (
        ShardOrder.objects.values_list("status", flat=True)
        .distinct()
        .order_by("status")
        .all_shards()
    )
    assert list(fan) == statuses == ["Shipped", "open", "open-late", "paid"]
    assert fan.count() == 4
    assert list(fan[1:3]) == statuses[1:3]


def test_count_exists_and_aggregates_combine_correctly(
    services: Services, dataset: list[tuple[Any, ...]]
) -> None:
    fan = ShardOrder.objects.all_shards()
    assert fan.count() == len(dataset)
    assert fan.filter(status="paid").count() == sum(1 for r in dataset if r[4] == "paid")
    assert fan.exists() and not fan.filter(status="nope").exists()
    assert fan.order_by("id")[len(dataset) - 1 :].exists()
    assert not fan.order_by("id")[len(dataset) :].exists()
    got = fan.aggregate(Sum("total"), Count("id"), lo=Min("created"), hi=Max("rank"))
    assert got == {
        "total__sum": sum(r[2] for r in dataset),
        "id__count": len(dataset),
        "lo": min(r[5] for r in dataset),
        "hi": max(r[3] for r in dataset if r[3] is not None),
    }
    # Defaults apply after combining: an empty shard must not drag Min down to the default.
    one = dataset[0][1]
    only_one_shard = fan.filter(customer_id=one)
    mins = only_one_shard.aggregate(m=Min("total", default=Decimal(-1)), s=Sum("total", default=0))
    mine = [r[2] for r in dataset if r[1] == one]
    assert mins == {"m": min(mine), "s": sum(mine)}
    assert fan.filter(status="nope").aggregate(
        m=Min("total", default=Decimal(-1)), c=Count("id")
    ) == {
        "m": Decimal(-1),
        "c": 0,
    }


def test_first_last_get_and_annotations(services: Services, dataset: list[tuple[Any, ...]]) -> None:
    by_pk = pg_order(services, dataset, "id")
    fan = ShardOrder.objects.all_shards()
    assert fan.first().pk == by_pk[0]
    assert fan.last().pk == by_pk[-1]
    newest = pg_order(services, dataset, "created DESC")
    assert fan.order_by("-created").first().pk == newest[0]
    assert fan.order_by("-created").last().pk == newest[-1]
    assert fan.get(pk=by_pk[5]).pk == by_pk[5]
    with pytest.raises(ShardOrder.DoesNotExist, match="any shard"):
        fan.get(pk=-1)
    with pytest.raises(ShardOrder.MultipleObjectsReturned):
        fan.get(status="paid")
    # Colocated joins run on each shard; order by the annotated value.
    names = list(
        fan.annotate(cname=F("customer__name"))
        .order_by("-cname", "id")
        .values_list("cname", flat=True)
    )
    assert names == sorted((f"cust{r[1]:03d}" for r in dataset), reverse=True)


def test_update_and_delete_fan_out_to_every_primary(
    services: Services, dataset: list[tuple[Any, ...]]
) -> None:
    paid = sum(1 for r in dataset if r[4] == "paid")
    assert ShardOrder.objects.filter(status="paid").all_shards().update(status="done") == paid
    assert (
        sum(
            len(sql(services, s, "SELECT 1 FROM testapp_shardorder WHERE status = 'done'"))
            for s in SHARDS
        )
        == paid
    )
    deleted, per_model = ShardOrder.objects.filter(status="done").all_shards().delete()
    assert deleted == paid and per_model == {"testapp.ShardOrder": paid}
    assert len(union_rows(services)) == len(dataset) - paid


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda f: f.aggregate(Avg("total")), "Avg use Sum and Count"),
        (lambda f: f.aggregate(StdDev("total")), "only Sum, Count, Min and Max"),
        (lambda f: f.aggregate(Count("status", distinct=True)), "distinct aggregates"),
        (lambda f: f.aggregate(x=Sum("total") + Max("total")), "only Sum, Count"),
        (lambda f: f[:5].aggregate(Sum("total")), "sliced"),
        (lambda f: f.values("status").distinct().aggregate(Count("status")), "twice"),
        (lambda f: list(f.values("status").annotate(n=Count("id"))), "GROUP BY"),
        (lambda f: list(f.order_by("?")), "random"),
        (lambda f: list(f.order_by("customer__name")), r"annotate\(sort_key=F"),
        (lambda f: list(f.order_by(F("total") * 2)), "Annotate the expression"),
        (lambda f: list(f.distinct("status")), "DISTINCT ON"),
        (lambda f: list(f.only("status").order_by("rank")), "only\\(\\)/defer\\(\\)"),
        (lambda f: f.in_bulk([1]), "in_bulk\\(\\) is not supported"),
        (lambda f: f[:3].filter(status="x"), r"sliced fan-out query of testapp\.ShardOrder"),
        # count() and aggregate() share the refusals of iteration.
        (lambda f: f.values("status").annotate(n=Count("id")).count(), "GROUP BY"),
        (lambda f: f.values("status").annotate(n=Count("id")).aggregate(Sum("n")), "GROUP BY"),
        (lambda f: f.extra(select={"x": "1"}).count(), "extra"),
        # Text merges by code point: refused under any other collation.
        (
            lambda f: list(f.annotate(s=Collate("status", "und-x-icu")).order_by("s")),
            "collation 'und-x-icu'",
        ),
        (
            lambda f: f.aggregate(m=Max(Collate("status", "en-x-icu"))),
            "collation 'en-x-icu'",
        ),
        (
            lambda f: list(f.annotate(s=Lower(Collate("status", "und-x-icu"))).order_by("-s")),
            "collation 'und-x-icu'",
        ),
    ],
)
def test_what_cannot_be_combined_raises_a_clear_error(call: Any, match: str) -> None:
    ShardCustomer.objects.create(id=1, name="a")
    ShardOrder.objects.create(customer_id=1)
    with pytest.raises(FanoutNotSupported, match=match):
        call(ShardOrder.objects.all_shards())


def test_distinct_on_and_group_by_set_before_the_fan_out_are_refused_by_count() -> None:
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="c") for k in range(1, 9)])
    ShardOrder.objects.bulk_create(
        [ShardOrder(customer_id=k, status=("open", "paid")[k % 2]) for k in range(1, 9)]
    )
    distinct_on = ShardOrder.objects.order_by("status").distinct("status").all_shards()
    grouped = ShardOrder.objects.values("status").annotate(n=Count("id")).all_shards()
    for fan in (distinct_on, grouped):
        with pytest.raises(FanoutNotSupported, match="cannot be combined"):
            fan.count()
        with pytest.raises(FanoutNotSupported, match="cannot be combined"):
            fan.aggregate(Count("id"))


def test_text_is_merged_only_under_a_code_point_collation(
    services: Services, dataset: list[tuple[Any, ...]]
) -> None:
    expected = pg_order(services, dataset, 'status COLLATE "C" DESC, id')
    fan = ShardOrder.objects.all_shards()
    got = fan.annotate(s=Collate("status", "C")).order_by("-s", "id")
    assert [o.pk for o in got] == expected
    assert fan.aggregate(m=Max("status"), n=Min(Collate("status", "POSIX"))) == {
        "m": max(r[4] for r in dataset),
        "n": min(r[4] for r in dataset),
    }
    # A column without db_collation sorts by the database default: read once per shard.
    ShardCoupon.objects.bulk_create(
        [ShardCoupon(customer_id=k, code=f"c{k:02d}") for k in range(1, 25)]
    )
    codes = ShardCoupon.objects.order_by("code").all_shards().values_list("code", flat=True)
    assert {fanout._database_collation(s) for s in SHARDS} == {"C"}  # the test servers
    assert list(codes) == [f"c{k:02d}" for k in range(1, 25)]
    fanout._db_collations["shard1"] = "en_US.UTF-8"
    try:
        with pytest.raises(FanoutNotSupported, match="database default collation"):
            list(ShardCoupon.objects.order_by("code").all_shards())
        with pytest.raises(FanoutNotSupported, match="database default collation"):
            ShardCoupon.objects.all_shards().aggregate(Min("code"))
    finally:
        fanout._db_collations.clear()


def test_a_shard_key_filter_limits_the_fan_out_to_its_shards(
    dataset: list[tuple[Any, ...]],
) -> None:
    keys = sorted({r[1] for r in dataset})
    by_shard = {s: [k for k in keys if shard_for_key("customers", k) == s] for s in SHARDS}
    two = [by_shard["shard0"][0], by_shard["shard2"][0]]
    fan = ShardOrder.objects.filter(customer__in=two).all_shards()
    assert fan.shards == ("shard0", "shard2")
    assert fan.count() == sum(1 for r in dataset if r[1] in two)
    assert set(fan.per_shard()) == {"shard0", "shard2"}
    assert ShardOrder.objects.for_key(two[0]).all_shards().shards == ("shard0",)
    assert ShardOrder.objects.filter(customer__in=[]).all_shards().count() == 0


def test_fan_out_workers_run_in_the_callers_context() -> None:
    seen: dict[str, Any] = {}

    def probe(alias: str) -> str | None:
        seen[alias] = threading.current_thread().name
        return current_shard("customers")

    with using_shard("customers", shard="shard1"):
        assert run_on_shards(SHARDS, probe) == ["shard1"] * 3
    assert sum(name.startswith("dbscale-fanout") for name in seen.values()) == 2


def test_fan_out_writes_of_workers_are_the_callers_own_writes() -> None:
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="c") for k in range(1, 30)])
    ShardOrder.objects.bulk_create([ShardOrder(customer_id=k) for k in range(1, 30)])

    def fresh_context() -> set[str]:
        # No consistency state exists yet in this context: the fan-out must create it
        # before the workers copy the context, or their writes are recorded elsewhere.
        assert consistency._state.get() is None
        assert ShardOrder.objects.all_shards().update(status="paid") == 29
        state = consistency._state.get()
        assert state is not None
        return set(state.pending) | set(state.positions)

    assert contextvars.Context().run(fresh_context) == set(SHARDS)


def test_fan_out_reads_its_own_writes_through_every_worker(services: Services, paused: Any) -> None:
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="c") for k in range(1, 30)])
    services.pg1_replica.wait_for_replay()
    services.pg2_replica.wait_for_replay()
    replicas.monitor.refresh()
    with consistency_context():
        assert ShardCustomer.objects.all_shards().count() == 29  # pins every shard's replica
        assert {c._state.db for c in ShardCustomer.objects.all_shards()} == {
            f"{s}_replica" for s in SHARDS
        }
        paused(services.pg1_replica)
        paused(services.pg2_replica)
        for shard in SHARDS:  # written from this thread: its context knows the positions
            ShardCustomer.objects.on_shard(shard).update(name="renamed")
        # Workers read in this context: their shards' replicas lack the writes, so they
        # read the primaries.
        assert (
            sorted(ShardCustomer.objects.all_shards().values_list("name", flat=True))
            == ["renamed"] * 29
        )


def test_fan_out_workers_close_their_connections(services: Services) -> None:
    connections_seen: dict[str, Any] = {}

    def open_connection(alias: str) -> int:
        connection = connections[alias]
        connection.ensure_connection()
        connections_seen[alias] = connection
        return threading.get_ident()

    idents = run_on_shards(SHARDS, open_connection)
    here = threading.get_ident()
    assert idents.count(here) == 1
    for alias, ident in zip(SHARDS, idents, strict=True):
        connection = connections_seen[alias]
        if ident == here:
            assert connection.connection is not None  # the caller's own stays open
        else:
            assert connection.settings_dict["CONN_MAX_AGE"] == 0
            assert connection.connection is None, alias


def test_shards_are_queried_concurrently(dataset: list[tuple[Any, ...]]) -> None:
    slow = ShardOrder.objects.annotate(
        pause=RawSQL("(SELECT 1 FROM pg_sleep(0.4))", ())
    ).all_shards()
    started = time.monotonic()
    assert slow.filter(pk=-1).count() == 0  # warm the pool threads
    assert len(list(slow)) == len(dataset)
    elapsed = time.monotonic() - started
    # Sequential would take >= 2 x 3 x 0.4s; concurrent about 2 x 0.4s.
    assert elapsed < 1.6, elapsed


def test_a_shard_in_an_atomic_block_is_read_from_the_calling_thread() -> None:
    ShardCustomer.objects.create(id=1, name="a")
    shard = shard_for_key("customers", 1)
    with transaction.atomic(using=shard):
        ShardOrder.objects.create(customer_id=1, status="uncommitted")
        fan = ShardOrder.objects.filter(status="uncommitted").all_shards()
        assert [o.status for o in fan] == ["uncommitted"]
        assert fan.count() == 1
        transaction.set_rollback(True, using=shard)
    assert ShardOrder.objects.filter(status="uncommitted").all_shards().count() == 0


def test_an_error_on_one_shard_is_raised_with_the_shard_named(services: Services) -> None:
    ShardCustomer.objects.create(id=1, name="a")
    broken = ShardOrder.objects.annotate(
        boom=RawSQL(
            "1 / (CASE WHEN current_database() = %s THEN 0 ELSE 1 END)",
            (services.alias_dbname("shard1"),),
        )
    ).all_shards()
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="x") for k in range(2, 12)])
    ShardOrder.objects.bulk_create([ShardOrder(customer_id=k) for k in range(1, 12)])
    with pytest.raises(Exception, match="division by zero") as caught:
        list(broken)
    assert "fan-out query on shard 'shard1'" in "".join(caught.value.__notes__)

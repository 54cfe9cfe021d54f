"""Global IDs: generated on each shard by dbscale_next_id(), unique, time-ordered, telling."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from django.db import connections

from django_dbscale.sharding import decode_id, shard_for_key, shard_of_id
from django_dbscale.sharding.ids import LAYOUT_53, LAYOUT_64
from django_dbscale.testing.harness import Services
from tests.testapp.models import ShardCustomer, ShardOrder, ShardTicket

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SHARDS = ("shard0", "shard1", "shard2")


def sql(services: Services, alias: str, query: str, params: Any = ()) -> list[Any]:
    return services.alias_server(alias).execute(query, params, dbname=services.alias_dbname(alias))


def key_on(shard: str, start: int = 1) -> int:
    key = start
    while shard_for_key("customers", key) != shard:
        key += 1
    return key


def test_the_id_function_is_installed_on_every_shard_with_its_number(services: Services) -> None:
    for number, shard in enumerate(SHARDS):
        assert sql(services, shard, "SELECT dbscale_shard_number()") == [(number,)]
        (value,) = sql(services, shard, "SELECT dbscale_next_id(12, 10)")[0]
        assert decode_id(value).shard_number == number
    assert sql(services, "default", "SELECT to_regproc('dbscale_next_id')") == [(None,)]


def test_unsaved_rows_have_no_pk_and_saved_rows_get_one_from_returning() -> None:
    key = key_on("shard1")
    ShardCustomer.objects.create(id=key, name="c")
    order = ShardOrder(customer_id=key)
    assert order.pk is None
    order.save()
    assert isinstance(order.pk, int) and order.pk > 0
    assert ShardOrder.objects.for_key(key).get().pk == order.pk


def test_ids_from_all_shards_are_unique_under_concurrent_inserts(services: Services) -> None:
    keys = {shard: key_on(shard) for shard in SHARDS}
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="c") for k in keys.values()])
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(SHARDS) * 4)

    def insert(key: int, bulk: bool) -> None:
        try:
            barrier.wait()
            if bulk:
                # One statement: thousands of IDs within a few milliseconds on one shard,
                # wrapping the 10-bit sequence part several times.
                ShardOrder.objects.bulk_create([ShardOrder(customer_id=key) for _ in range(3000)])
            else:
                for _ in range(150):
                    ShardOrder.objects.create(customer_id=key)
        except BaseException as exc:
            errors.append(exc)
        finally:
            for conn in connections.all(initialized_only=True):
                conn.close()

    threads = [
        threading.Thread(target=insert, args=(key, i == 0))
        for key in keys.values()
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    all_ids: list[int] = []
    for number, shard in enumerate(SHARDS):
        ids = [r[0] for r in sql(services, shard, "SELECT id FROM testapp_shardorder")]
        assert len(ids) == 3000 + 3 * 150
        assert {decode_id(i).shard_number for i in ids} == {number}
        assert {shard_of_id("customers", i) for i in ids} == {shard}
        all_ids += ids
    assert len(set(all_ids)) == len(all_ids) == 3 * 3450
    assert max(all_ids) < 2**63


@pytest.mark.parametrize(
    ("model", "threads", "rows"), [(ShardTicket, 4, 3000), (ShardOrder, 4, 5000)]
)
def test_ids_of_one_shard_are_unique_under_concurrent_bulk_inserts(
    services: Services, model: Any, threads: int, rows: int
) -> None:
    # Four sessions on one shard, each inserting thousands of rows in one statement: far
    # more than 2**seq_bits IDs per millisecond between them (128 for js_safe).
    key = key_on("shard1")
    ShardCustomer.objects.create(id=key, name="c")
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def insert() -> None:
        try:
            barrier.wait()
            model.objects.bulk_create([model(customer_id=key) for _ in range(rows)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            for conn in connections.all(initialized_only=True):
                conn.close()

    workers = [threading.Thread(target=insert) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    table = model._meta.db_table
    ids = [r[0] for r in sql(services, "shard1", f"SELECT id FROM {table}")]
    assert len(ids) == len(set(ids)) == threads * rows
    js_safe = model is ShardTicket
    assert max(ids) < (2**53 if js_safe else 2**63)
    assert {decode_id(i, js_safe=js_safe).shard_number for i in ids} == {1}


def test_ids_are_time_ordered_and_carry_their_creation_time() -> None:
    key = key_on("shard2")
    ShardCustomer.objects.create(id=key, name="c")
    before = dt.datetime.now(dt.UTC)
    ids = [ShardOrder.objects.create(customer_id=key).pk for _ in range(50)]
    after = dt.datetime.now(dt.UTC)
    assert ids == sorted(ids)
    for value in ids:
        parts = decode_id(value)
        assert before - dt.timedelta(seconds=2) <= parts.created <= after + dt.timedelta(seconds=2)
        assert parts.shard_number == 2


def test_js_safe_ids_stay_below_2_53_even_when_the_sequence_wraps(services: Services) -> None:
    for shard in SHARDS:
        key = key_on(shard)
        # 5000 rows in one statement: the 7-bit sequence part wraps 39 times.
        ShardTicket.objects.bulk_create([ShardTicket(customer_id=key) for _ in range(5000)])
    for number, shard in enumerate(SHARDS):
        ids = [r[0] for r in sql(services, shard, "SELECT id FROM testapp_shardticket")]
        assert len(ids) == len(set(ids)) == 5000
        assert max(ids) < 2**53
        assert {decode_id(i, js_safe=True).shard_number for i in ids} == {number}
        assert {shard_of_id("customers", i, js_safe=True) for i in ids} == {shard}


def test_layouts_and_decode_validation() -> None:
    assert LAYOUT_64.total_bits == 63 and LAYOUT_64.max_shards == 4096
    assert LAYOUT_53.total_bits == 53 and LAYOUT_53.max_shards == 32
    value = (5 << 22) | (3 << 10) | 7
    parts = decode_id(value)
    assert (parts.shard_number, parts.sequence) == (3, 7)
    assert parts.created == dt.datetime(2024, 1, 1, 0, 0, 0, 5000, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="non-negative int"):
        decode_id(-1)
    with pytest.raises(ValueError, match="larger than a 53-bit ID"):
        decode_id(2**53, js_safe=True)
    with pytest.raises(LookupError, match="only 3 shards"):
        shard_of_id("customers", (1 << 22) | (9 << 10))

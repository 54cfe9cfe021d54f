"""Every read's database is decided by Django's routers, whichever pillar issues it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings
from django.test import override_settings

from django_dbscale import replicas
from django_dbscale.sharding import shard_for_key
from django_dbscale.testing.harness import Services
from tests.routers import Recording
from tests.test_cache_support import cache_env, fresh_context, observe
from tests.testapp.models_cache import CCounter
from tests.testapp.models_sharding import ShardCustomer, ShardOrder

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def recording() -> Iterator[list[tuple[str, dict[str, object]]]]:
    Recording.reads = []
    with override_settings(
        DATABASE_ROUTERS=["tests.routers.Recording", *settings.DATABASE_ROUTERS]
    ):
        yield Recording.reads


def test_a_sharded_key_read_asks_the_routers_with_its_shard(
    recording: list[tuple[str, dict[str, object]]],
) -> None:
    ShardCustomer.objects.create(id=7, name="c7")
    shard = shard_for_key("customers", 7)
    recording.clear()
    assert list(ShardCustomer.objects.filter(id=7).values_list("name", flat=True)) == ["c7"]
    assert recording == [("testapp.ShardCustomer", {"shard": shard})]


def test_a_fanout_asks_the_routers_once_per_shard(
    recording: list[tuple[str, dict[str, object]]],
) -> None:
    for key in (1, 2, 3, 4, 5, 6):
        ShardCustomer.objects.create(id=key, name=f"c{key}")
    recording.clear()
    names = sorted(ShardCustomer.objects.all_shards().values_list("name", flat=True))
    assert names == [f"c{key}" for key in (1, 2, 3, 4, 5, 6)]
    asked = sorted(str(hints["shard"]) for label, hints in recording if label.endswith("Customer"))
    assert asked == ["shard0", "shard1", "shard2"]
    assert not [r for r in recording if r[0] == ShardOrder._meta.label]


@pytest.mark.usefixtures(cache_env.__name__)
def test_a_cache_hit_names_its_database_without_routing_a_read(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=3)
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    with fresh_context():
        assert CCounter.objects.cache().get(pk=row.pk).value == 3  # the fill: a real read
    replicas.route_counts.clear()
    with fresh_context() as state, observe() as seen:
        assert CCounter.objects.cache().get(pk=row.pk).value == 3
        assert state.pinned == {}  # a hit chose no replica...
    assert seen.reasons == ["hit"]
    assert sum(replicas.route_counts.values()) == 0  # ...and counted no routed read

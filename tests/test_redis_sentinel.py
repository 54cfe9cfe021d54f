"""The queryset cache on Redis under Sentinel, through a failover (issue 13).

One :class:`~django_dbscale.testing.harness.RedisSentinel` for the module: a master, one
replica and three sentinels (quorum 2, ``down-after-milliseconds`` 1000), booted in about
2 s. The cache's Redis alias uses django-redis's Sentinel client (``redis://mymaster/0``
and ``SENTINELS``); the library's own connections (:mod:`django_dbscale.cache.client`)
take their master address from the same sentinels. Redis state is checked on the nodes
themselves, not through the cache.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from django_dbscale.cache import continuity, invalidation, planning, stats
from django_dbscale.cache.client import gateway
from django_dbscale.cache.keys import generation_key
from django_dbscale.cache.options import options
from django_dbscale.testing.harness import (
    RedisNode,
    RedisSentinel,
    Services,
    start_redis_sentinel,
)
from tests.test_cache_support import fresh_context, invalidations, observe
from tests.testapp.models_cache import CCounter

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisSentinel]:
    """Boot the master, its replica and three sentinels for this module."""
    redis_sentinel = start_redis_sentinel()
    try:
        yield redis_sentinel
    finally:
        redis_sentinel.stop()


@pytest.fixture
def sentinel_cache(sentinel: RedisSentinel) -> Iterator[RedisSentinel]:
    """Point the cache's Redis alias at the sentinels' master, verified and empty.

    Every test starts from a master with a replica in sync (a previous test may have failed
    over): the old master is back as a replica first.
    """
    master = sentinel.master
    for node in sentinel.data_nodes:
        if not node.running:  # killed by a test: back as a replica, as the sentinels would
            sentinel.start_node(node)
            with node.client() as client:
                client.execute_command("REPLICAOF", master.host, master.port)
    for node in sentinel.data_nodes:
        if node is not master:
            sentinel.wait_for_replica(node)
    sentinel.wait_for_sentinels()
    caches = {
        **settings.CACHES,
        "dbscale": sentinel.cache_settings(SOCKET_CONNECT_TIMEOUT=0.5, SOCKET_TIMEOUT=0.5),
    }
    cache = {**settings.DBSCALE["CACHE"], "CIRCUIT_BREAKER": (2, 0.3), "SOCKET_TIMEOUT": 0.5}
    with override_settings(CACHES=caches, DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        invalidation.forget_pending()
        planning.clear()
        stats.reset()
        with master.client() as client:
            client.flushall()
        # The first connection to another server makes the process verify it.
        gateway().command("PING")
        assert continuity.wait_until_verified(), continuity.untrusted
        assert continuity.verified_run_id() == master.run_id()
        yield sentinel
        gateway().breaker.reset()
        invalidation.forget_pending()
    gateway().close()  # the next test's Redis is another server


def value_of(pk: int) -> int:
    return int(CCounter.objects.cache().get(pk=pk).value)


def read(pk: int) -> tuple[int, list[str]]:
    with observe() as seen:
        return value_of(pk), seen.reasons


def entries_on(node: RedisNode) -> list[bytes]:
    """Return the keys of cached payloads stored on *node* (not headers or leases)."""
    with node.client() as client:
        keys = client.keys(f"{options().prefix}:e:*")
    return sorted(k for k in keys if not k.endswith((b":h", b":l")))


def generation_on(node: RedisNode) -> bytes | None:
    with node.client() as client:
        value = client.get(generation_key(options().prefix, "default"))
    return value if value is None else bytes(value)


def wait_replicated(master: RedisNode) -> None:
    """Wait until the master's writes so far reached its replica (``WAIT 1``)."""
    with master.client() as client:
        assert client.execute_command("WAIT", 1, 5000) == 1


def write_only_the_old_master_hears_of(
    sentinel: RedisSentinel, old: RedisNode, new: RedisNode, row: CCounter
) -> None:
    """Set the row to 2 with an invalidation only *old* takes; kill *old*, promote *new*.

    *new* is frozen (SIGSTOP) and its replication link cut while the write commits and
    its invalidation is acknowledged by the master, and the master is killed before the
    replica thaws.
    """
    assert new.proc is not None
    os.kill(new.proc.pid, signal.SIGSTOP)
    try:
        # Cut the replication link while the replica cannot reconnect: what the master
        # takes from now on stays on the master (a stopped process's socket would still
        # receive the stream into its kernel buffer).
        with old.client() as client:
            assert client.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
        # Observed invalidations are delivered and their reply read before update() returns.
        with invalidations() as delivered:
            CCounter.objects.filter(pk=row.pk).update(value=2)
        assert delivered and not invalidation.has_pending()  # the old master acknowledged it
        sentinel.kill_node(old)
    finally:
        os.kill(new.proc.pid, signal.SIGCONT)
    sentinel.wait_for_master(new)


def test_the_cache_reads_fills_and_invalidates_on_the_sentinels_master(
    sentinel_cache: RedisSentinel,
) -> None:
    master = sentinel_cache.master
    assert continuity.verified_run_id() == master.run_id()
    row = CCounter.objects.create(name="c", value=1)
    assert read(row.pk) == (1, ["miss"])
    assert read(row.pk) == (1, ["hit"])
    assert len(entries_on(master)) == 1
    CCounter.objects.filter(pk=row.pk).update(value=2)
    assert read(row.pk) == (2, ["miss"])
    assert read(row.pk) == (2, ["hit"])


def test_a_write_whose_invalidation_the_failover_lost_is_never_hidden_by_the_cache(
    sentinel_cache: RedisSentinel, services: Services
) -> None:
    """The master dies with a bump its replica never got; the replica is promoted.

    The replica is frozen (SIGSTOP) and its replication link cut while the write commits
    and its invalidation is acknowledged by the master, and the master is killed before the
    replica thaws: the promoted replica holds the entry filled before the write, under
    versions that still match it. Only the run-id check (a new server: every generation is
    bumped) keeps it from being served.
    """
    old, new = sentinel_cache.master, sentinel_cache.replica
    row = CCounter.objects.create(name="c", value=1)
    assert read(row.pk) == (1, ["miss"])
    wait_replicated(old)
    assert len(entries_on(new)) == 1
    generation_before = generation_on(new)
    write_only_the_old_master_hears_of(sentinel_cache, old, new, row)
    # The promoted replica still holds the entry of value 1, under versions the write never
    # bumped there (the process may already have heard the switch and re-verified).
    assert len(entries_on(new)) >= 1
    value, _ = read(row.pk)  # Redis changed under the gateway: straight to the database
    assert value == 2
    assert continuity.wait_until_verified(timeout=15), continuity.untrusted
    assert continuity.verified_run_id() == new.run_id()
    # Another context (no floor from the write) reading once the replica has the write:
    # the entry of 1 the new master holds matches every version it was filled under.
    services.pg1_replica.wait_for_replay()
    with fresh_context():
        assert read(row.pk)[0] == 2
        assert read(row.pk) == (2, ["hit"])
    assert generation_on(new) != generation_before  # everything cached before: invalid


def test_after_a_sentinel_failover_the_new_master_is_verified_and_serves_nothing_stale(
    sentinel_cache: RedisSentinel,
) -> None:
    """``SENTINEL FAILOVER`` while both nodes run: the old master is demoted seconds later."""
    old = sentinel_cache.master
    row = CCounter.objects.create(name="c", value=1)
    assert read(row.pk) == (1, ["miss"])
    CCounter.objects.filter(pk=row.pk).update(value=2)  # acknowledged before the failover
    new = sentinel_cache.failover()
    assert new is not old
    run_id = new.run_id()
    # Until the sentinels demote the old master (and close its clients), this process
    # keeps talking to it; reads stay correct meanwhile, and afterwards on the new one.
    assert read(row.pk)[0] == 2
    sentinel_cache.wait_for_replica(old)
    assert read(row.pk)[0] == 2
    assert continuity.wait_until_verified(timeout=15), continuity.untrusted
    assert continuity.verified_run_id() == run_id
    CCounter.objects.filter(pk=row.pk).update(value=3)
    assert read(row.pk) == (3, ["miss"])
    assert read(row.pk) == (3, ["hit"])
    assert len(entries_on(new)) >= 1


def test_cache_settings_name_the_service_and_the_sentinels(sentinel: RedisSentinel) -> None:
    entry: dict[str, Any] = sentinel.cache_settings(3)
    assert entry["LOCATION"] == "redis://mymaster/3"
    assert entry["OPTIONS"]["CLIENT_CLASS"] == "django_redis.client.SentinelClient"
    assert entry["OPTIONS"]["SENTINELS"] == sentinel.sentinel_addresses
    assert len(sentinel.sentinel_addresses) == 3
    assert {node.role() for node in sentinel.sentinels} == {"sentinel"}


def test_a_new_master_another_process_verified_first_still_invalidates_everything(
    sentinel_cache: RedisSentinel, services: Services
) -> None:
    """As above, but another process reached the promoted replica first and recorded its
    run id there: the new master's run-id record matches it. This process was using the
    old master (its invalidation went there and died with it), so verifying the new one
    must still invalidate everything."""
    old, new = sentinel_cache.master, sentinel_cache.replica
    # Not hearing the switch (a process whose sentinel subscription was down): the
    # verification itself must catch it.
    watch = gateway()._watch
    assert watch is not None
    watch.stop()
    row = CCounter.objects.create(name="c", value=1)
    assert read(row.pk) == (1, ["miss"])
    wait_replicated(old)
    write_only_the_old_master_hears_of(sentinel_cache, old, new, row)
    generation_before = generation_on(new)
    with new.client() as client:  # what the other process's verification recorded
        client.set(f"{options().prefix}:run", new.run_id())
    value, _ = read(row.pk)
    assert value == 2
    assert continuity.wait_until_verified(timeout=15), continuity.untrusted
    assert continuity.verified_run_id() == new.run_id()
    services.pg1_replica.wait_for_replay()
    with fresh_context():
        assert read(row.pk) == (2, ["miss"])  # not the entry of 1 the new master holds
    assert generation_on(new) != generation_before


def test_a_master_switch_is_heard_and_the_old_master_is_dropped_before_its_demotion(
    sentinel_cache: RedisSentinel, services: Services
) -> None:
    """``SENTINEL FAILOVER`` leaves the old master a writable master for seconds. Another
    process, already on the new master, changes a row and invalidates it there: this
    process must not keep reading the old master's entry meanwhile."""
    import time

    old = sentinel_cache.master
    row = CCounter.objects.create(name="c", value=1)
    assert read(row.pk) == (1, ["miss"])
    assert read(row.pk) == (1, ["hit"])  # on the old master, through an idle connection
    new = sentinel_cache.failover()
    assert old.role() == "master"  # not demoted yet: the window this test is about
    # The other process: the row changes, and its invalidation goes to the new master.
    table = CCounter._meta.db_table
    services.pg1.execute(f"UPDATE {table} SET value = 2 WHERE id = %s", (row.pk,), dbname="dbscale")
    with new.client() as client:
        for key in client.keys(f"{options().prefix}:v:*{table}*"):
            client.set(key, b"another-process-token:" + b"0" * 16)
    services.pg1_replica.wait_for_replay()
    deadline = time.monotonic() + 5
    while continuity.verified_run_id() != new.run_id() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert continuity.verified_run_id() == new.run_id()  # heard, dropped, re-verified
    with fresh_context():
        assert read(row.pk)[0] == 2

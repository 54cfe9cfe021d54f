"""The queryset cache on a Redis Cluster of three masters (issue 13).

One :class:`~django_dbscale.testing.harness.RedisCluster` for the module (three masters,
no replicas, slots split evenly; booted in about 2 s). The cache's Redis alias names one
node and ``DBSCALE["CACHE"]["CLUSTER"]`` is on: every key of one database carries the hash
tag ``{<alias>}``, so ``default``'s cache lives on one node and ``shard0``'s on another
(asserted below from the cluster itself: ``CLUSTER KEYSLOT`` and each node's own keys).
Values read are checked against the databases with direct SQL.

A slot migration is driven with the real commands (``CLUSTER SETSLOT ... IMPORTING`` /
``MIGRATING``, ``MIGRATE``) and undone afterwards. The failover tests boot a cluster of
their own with one replica per master (``replicas=1``), as they change its roles.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import override_settings
from redis.exceptions import AskError

from django_dbscale.cache import continuity, invalidation, planning, stats
from django_dbscale.cache.client import ClusterRoute, bump_call, gateway, pack
from django_dbscale.cache.keys import generation_key, version_key
from django_dbscale.cache.options import options, parse
from django_dbscale.conf import CACHE_DEFAULTS
from django_dbscale.testing.harness import RedisCluster, RedisNode, start_redis_cluster
from tests.test_cache_support import fresh_context, observe
from tests.testapp.models_cache import CCounter

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

#: The two databases of these tests: their tags hash to slots 5718 and 14398, which the
#: harness's even split gives to different nodes (asserted in the fixture).
ALIASES = ("default", "shard0")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """Boot three cluster masters for this module."""
    redis_cluster = start_redis_cluster()
    try:
        yield redis_cluster
    finally:
        redis_cluster.stop()


@pytest.fixture
def cluster_cache(cluster: RedisCluster) -> Iterator[RedisCluster]:
    """Point the cache at the cluster (``CLUSTER`` on), empty and verified; CCounter on shard0."""
    with cache_on(cluster):
        yield cluster


@contextlib.contextmanager
def cache_on(cluster: RedisCluster, location: str | None = None) -> Iterator[None]:
    """Point the cache at *cluster* (startup node *location*, default its first node)."""
    with connections["shard0"].schema_editor() as editor:
        editor.create_model(CCounter)
    entry = cluster.cache_settings(SOCKET_CONNECT_TIMEOUT=0.5, SOCKET_TIMEOUT=0.5)
    if location is not None:
        entry["LOCATION"] = location
    caches = {**settings.CACHES, "dbscale": entry}
    cache = {
        **settings.DBSCALE["CACHE"],
        "CLUSTER": True,
        "CIRCUIT_BREAKER": (2, 0.3),
        "SOCKET_TIMEOUT": 0.5,
    }
    try:
        with override_settings(CACHES=caches, DBSCALE={**settings.DBSCALE, "CACHE": cache}):
            invalidation.forget_pending()
            planning.clear()
            stats.reset()
            cluster.flushall()
            gateway().command("PING")  # the first connection makes the process verify
            assert continuity.wait_until_verified(), continuity.untrusted
            yield
            gateway().breaker.reset()
            invalidation.forget_pending()
        gateway().close()
    finally:
        with connections["shard0"].schema_editor() as editor:
            editor.delete_model(CCounter)


def tag_node(cluster: RedisCluster, alias: str) -> RedisNode:
    """Return the node owning *alias*'s hash tag, as the cluster says."""
    return cluster.node_for_key("{" + alias + "}")


def sql_value(alias: str, pk: int) -> int:
    """Return the row's value read from *alias*'s database directly."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT value FROM {CCounter._meta.db_table} WHERE id = %s", [pk])
        return int(cursor.fetchone()[0])


def read(alias: str, pk: int) -> tuple[int, list[str]]:
    """Read through the cache in a context that has written nothing; return value, outcome."""
    invalidation.confirm()
    with fresh_context(), observe() as seen:
        value = int(CCounter.objects.cache().using(alias).get(pk=pk).value)
    return value, seen.reasons


def cache_keys_on(cluster: RedisCluster, node: RedisNode) -> list[bytes]:
    """Return the cache's keys *node* itself holds (settling what was sent without waiting)."""
    invalidation.confirm()
    gateway().drain_owed()
    return cluster.keys_on(node, f"{options().prefix}:*")


def test_each_databases_cache_lives_on_the_node_owning_its_tag(
    cluster_cache: RedisCluster,
) -> None:
    cluster = cluster_cache
    node_of = {alias: tag_node(cluster, alias) for alias in ALIASES}
    assert node_of["default"] is not node_of["shard0"]
    assert continuity.verified_run_id() == ",".join(sorted(n.run_id() for n in cluster.nodes))

    CCounter.objects.using("default").create(id=1, name="x", value=100)
    CCounter.objects.using("shard0").create(id=1, name="x", value=200)
    assert (sql_value("default", 1), sql_value("shard0", 1)) == (100, 200)
    assert read("default", 1) == (100, ["miss"])
    assert read("shard0", 1) == (200, ["miss"])
    assert read("default", 1) == (100, ["hit"])
    assert read("shard0", 1) == (200, ["hit"])

    prefix = options().prefix
    for alias in ALIASES:
        tag = "{" + alias + "}"
        slot = cluster.keyslot(tag)
        node = node_of[alias]
        held = [k.decode() for k in cache_keys_on(cluster, node) if tag.encode() in k]
        entries = [k for k in held if k.startswith(f"{prefix}:e:") and k[-2:] not in (":h",)]
        assert len([k for k in entries if not k.endswith(":l")]) == 1, held
        assert any(k.endswith(":h") for k in held), held
        assert generation_key(prefix, alias) in held
        assert version_key(prefix, alias, CCounter._meta.db_table, "a") in held
        assert {cluster.keyslot(k) for k in held} == {slot}
        for other in cluster.nodes:
            if other is not node:  # no key of this database anywhere else
                assert not [k for k in cache_keys_on(cluster, other) if tag.encode() in k]


def test_a_write_through_the_orm_invalidates_its_database_only(
    cluster_cache: RedisCluster,
) -> None:
    CCounter.objects.using("default").create(id=1, name="x", value=100)
    CCounter.objects.using("shard0").create(id=1, name="x", value=200)
    for alias in ALIASES:
        read(alias, 1)
    assert read("shard0", 1) == (200, ["hit"])

    CCounter.objects.using("shard0").filter(pk=1).update(value=201)
    assert sql_value("shard0", 1) == 201
    assert read("shard0", 1) == (201, ["miss"])  # never the stale 200
    assert read("shard0", 1) == (201, ["hit"])
    assert read("default", 1) == (100, ["hit"])  # shard0's write left default alone

    row = CCounter.objects.using("default").get(pk=1)
    row.value = 101
    row.save()
    assert sql_value("default", 1) == 101
    assert read("default", 1) == (101, ["miss"])
    assert read("default", 1) == (101, ["hit"])
    assert read("shard0", 1) == (201, ["hit"])


def test_one_batch_of_invalidations_is_split_per_node_and_answered_in_order(
    cluster_cache: RedisCluster,
) -> None:
    """What a write's delivery does (``send_held``): bumps of two databases and a counter."""
    prefix = options().prefix
    table = CCounter._meta.db_table
    keys = {alias: version_key(prefix, alias, table, "a") for alias in ALIASES}
    calls: list[tuple[Any, ...]] = [bump_call([keys[alias]], 0) for alias in ALIASES]
    calls.append(("HINCRBY", f"{prefix}:stats", "cluster-test", 5))
    gw = gateway()
    held = gw.send_held(b"".join(pack(*call) for call in calls))
    replies = gw.finish_held(held, len(calls))
    assert not [r for r in replies if isinstance(r, Exception)], replies
    assert replies[2] == 5  # the counter's reply, in its place
    for alias in ALIASES:
        node = tag_node(cluster_cache, alias)
        with node.client() as client:
            assert client.get(keys[alias]) is not None  # bumped on its own node
    with cluster_cache.node_for_key(f"{prefix}:stats").client() as client:
        assert client.hget(f"{prefix}:stats", "cluster-test") == b"5"


def test_the_verifying_connection_reaches_every_primary(cluster_cache: RedisCluster) -> None:
    route = gateway().open_connection()
    try:
        assert isinstance(route, ClusterRoute)
        ports = sorted(c.port for c in route.node_connections())
        assert ports == sorted(node.port for node in cluster_cache.nodes)
        prefix = options().prefix
        for alias in ALIASES:  # each command goes to its key's node
            route.send_command("GET", generation_key(prefix, alias))
            assert route.read_response() is not None
    finally:
        route.disconnect()


def test_a_restarted_node_invalidates_everything_cached(cluster_cache: RedisCluster) -> None:
    """A primary restarts empty (no persistence): its run id changes, so the cluster's.

    The first call on a connection to it fails, which untrusts the cache. The new
    verification sees another cluster identity: a restart may have rolled back versions (a
    snapshot), so every database's generation is bumped, whichever node it lives on, and
    nothing filled before is served (entries on the other nodes survived, and still miss).
    """
    cluster = cluster_cache
    CCounter.objects.using("default").create(id=1, name="x", value=100)
    CCounter.objects.using("shard0").create(id=1, name="x", value=200)
    for alias in ALIASES:
        read(alias, 1)
    before = continuity.verified_run_id()
    victim = tag_node(cluster, "default")
    restart_node(cluster, victim)
    # The read of default finds its node's connection closed: nothing is served from
    # Redis until the cluster is verified again.
    value, reasons = read("default", 1)
    assert value == 100 and "hit" not in reasons, reasons
    assert continuity.wait_until_verified(), continuity.untrusted
    after = continuity.verified_run_id()
    assert after is not None and after != before and victim.run_id() in after.split(",")
    assert read("shard0", 1) == (200, ["miss"])  # its entry survived, its generation did not
    assert read("default", 1) == (100, ["miss"])
    assert read("default", 1) == (100, ["hit"])


def restart_node(cluster: RedisCluster, node: RedisNode) -> None:
    """Restart *node* from its cluster config (same slots, no data, a new run id)."""
    import subprocess

    assert node.proc is not None
    node.proc.terminate()
    node.proc.wait(timeout=10)
    log = open(node.logfile, "ab")  # noqa: SIM115 - handed to the child
    try:
        node.proc = subprocess.Popen(
            [str(cluster.redis_bin), str(node.configfile)],
            cwd=cluster.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    deadline = time.monotonic() + 20
    while True:
        try:
            if cluster._healthy():
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "the cluster did not recover"
        time.sleep(0.05)


def test_a_function_reading_two_databases_bypasses_the_cache_in_a_cluster(
    cluster_cache: RedisCluster,
) -> None:
    table = CCounter._meta.db_table
    plan = planning.plan_for_function("f", "()", [("default", table), ("shard0", table)])
    assert plan.reason is not None and "different hash slots" in plan.reason
    single = planning.plan_for_function("f", "()", [("shard0", table)])
    assert single.reason is None
    assert single.entry_key.startswith(f"{options().prefix}:f:{{shard0}}:")


def test_the_cluster_option_must_be_a_boolean() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"\['CLUSTER'\] must be True or False"):
        parse({**CACHE_DEFAULTS, "CLUSTER": "yes"})
    assert parse(CACHE_DEFAULTS).cluster is False


def test_explain_and_shared_counters_work_on_the_cluster(cluster_cache: RedisCluster) -> None:
    """The pipelined paths (``Gateway.pipeline``): explain's MGET and the shared counters."""
    from django_dbscale.cache import cache_stats

    CCounter.objects.using("shard0").create(id=1, name="x", value=200)
    queryset = CCounter.objects.cache().using("shard0").filter(pk=1)
    assert queryset.explain_cache().state == "miss"
    for expected in ("miss", "hit"):
        invalidation.confirm()
        with fresh_context(), observe() as seen:
            assert [r.value for r in queryset.all()] == [200]
        assert seen.reasons == [expected]
    gateway().drain_owed()
    assert queryset.explain_cache().state == "hit"
    counts = cache_stats()[CCounter._meta.label]
    assert (counts["miss"], counts["hit"], counts["store"]) == (1, 1, 1), counts


# -- a slot migrating between two masters (ASK, TRYAGAIN) ---------------------------------


@contextlib.contextmanager
def migrating(cluster: RedisCluster, alias: str) -> Iterator[tuple[RedisNode, RedisNode]]:
    """Start moving *alias*'s slot to the master holding neither tested database, and move
    every key of the slot there (``MIGRATE``), but do not end the migration: the slot stays
    the old owner's (``MIGRATING``), the new one only takes ``ASKING`` commands for it
    (``IMPORTING``). Yield ``(old owner, new owner)``; afterwards the slot is given back to
    its owner (emptied first: a node cannot give away a slot it holds keys of).
    """
    slot = cluster.keyslot("{" + alias + "}")
    source = tag_node(cluster, alias)
    others = {tag_node(cluster, a).port for a in ALIASES}
    target = next(n for n in cluster.nodes if n.port not in others)
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    invalidation.confirm()
    gateway().drain_owed()
    with target.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with source.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert keys, "nothing cached in the slot to migrate"
        client.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    try:
        yield source, target
    finally:
        cluster.flushall()
        for node in cluster.nodes:
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", source_id)
        assert cluster.node_for_slot(slot) is source


def get_importing(node: RedisNode, key: str) -> bytes | None:
    """Return *key*'s value on *node*, which imports its slot (so only after ``ASKING``)."""
    with node.client() as client:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.get(key)
        return cast("bytes | None", pipe.execute()[1])


def test_a_read_of_a_migrating_slot_is_a_hit_through_ask(cluster_cache: RedisCluster) -> None:
    """Every key of the entry has moved: the old owner answers ``ASK``, the new one serves
    the hit after ``ASKING`` (the read script names its payload key in the lease key's
    place, as the lease key exists on neither node and Redis refuses a script with a
    missing key with ``TRYAGAIN`` while the slot migrates)."""
    CCounter.objects.using("default").create(id=1, name="x", value=100)
    assert read("default", 1) == (100, ["miss"])
    assert read("default", 1) == (100, ["hit"])
    with migrating(cluster_cache, "default") as (source, target):
        wide = version_key(options().prefix, "default", CCounter._meta.db_table, "a")
        with source.client() as client, pytest.raises(AskError):  # what a plain client gets
            client.get(wide)
        assert read("default", 1) == (100, ["hit"])
        assert read("default", 1) == (sql_value("default", 1), ["hit"])
        assert gateway().available()  # a redirection is not a failure of Redis


def test_a_write_during_a_migration_bumps_the_version_on_the_new_owner(
    cluster_cache: RedisCluster,
) -> None:
    """The bump (``a`` and ``w`` keys of the table) is sent to the old owner, answered
    ``ASK``; after ``ASKING`` the new owner refuses it with ``TRYAGAIN`` (the ``w`` key does
    not exist yet), so it is sent again one key per call: both keys are bumped there, and
    the write's invalidation is not left pending. The next read is fresh."""
    prefix = options().prefix
    table = CCounter._meta.db_table
    wide = version_key(prefix, "default", table, "a")
    CCounter.objects.using("default").create(id=1, name="x", value=100)
    assert read("default", 1) == (100, ["miss"])
    assert read("default", 1) == (100, ["hit"])
    with migrating(cluster_cache, "default") as (source, target):
        before = get_importing(target, wide)
        assert before is not None
        CCounter.objects.using("default").filter(pk=1).update(value=101)
        assert invalidation.confirm()
        assert not invalidation.has_pending()
        after = get_importing(target, wide)
        assert after is not None and after != before
        assert get_importing(target, version_key(prefix, "default", table, "w")) is not None
        assert cluster_cache.keys_on(source, f"{prefix}:*{{default}}*") == []
        value, reasons = read("default", 1)
        assert value == sql_value("default", 1) == 101
        assert "hit" not in reasons, reasons  # never the entry filled before the write


# -- failover to a replica inside the cluster ---------------------------------------------


@pytest.fixture
def replicated() -> Iterator[RedisCluster]:
    """A cluster of its own: three masters, one replica each, a short node timeout."""
    redis_cluster = start_redis_cluster(replicas=1, node_timeout_ms=1000)
    try:
        yield redis_cluster
    finally:
        redis_cluster.stop()


def cached_then_invalidated(cluster: RedisCluster) -> tuple[str, bytes]:
    """Cache default's row 1 (value 100), then update it to 101 and confirm the bump.

    Return the table version key and the value it had before the bump: what the new master
    would still hold had the bump not reached the replica before the failover.
    """
    key = version_key(options().prefix, "default", CCounter._meta.db_table, "a")
    CCounter.objects.using("default").create(id=1, name="x", value=100)
    assert read("default", 1) == (100, ["miss"])
    assert read("default", 1) == (100, ["hit"])
    with tag_node(cluster, "default").client() as client:
        before = client.get(key)
    assert before is not None
    CCounter.objects.using("default").filter(pk=1).update(value=101)
    assert invalidation.confirm() and not invalidation.has_pending()
    return key, before


def roll_back(node: RedisNode, key: str, value: bytes) -> None:
    """Give *key* its value from before the last bump on *node* (a bump never replicated)."""
    with node.client() as client:
        client.set(key, value, ex=3600)


def assert_fresh_after_failover(cluster: RedisCluster, new_master: RedisNode) -> None:
    """The first read is not served from Redis; once verified, the cluster's identity has
    the new master's run id, every generation was bumped, and reads are fresh again."""
    before = continuity.verified_run_id()
    value, reasons = read("default", 1)
    assert value == sql_value("default", 1) == 101
    assert "hit" not in reasons, reasons
    assert continuity.wait_until_verified(timeout=20), continuity.untrusted
    after = continuity.verified_run_id()
    assert after is not None and after != before
    assert new_master.run_id() in after.split(",")
    assert after == ",".join(sorted(n.run_id() for n in cluster.masters()))
    assert read("default", 1) == (101, ["miss"])  # the rolled-back entry never matches
    assert read("default", 1) == (101, ["hit"])
    assert sql_value("default", 1) == 101


def test_a_planned_failover_to_a_replica_serves_nothing_stale(replicated: RedisCluster) -> None:
    """``CLUSTER FAILOVER`` on default's replica: the first call to the old master (now a
    replica) gets ``MOVED``, the new owner's connection reports another run id, and the
    verification that follows bumps every generation. The bump acknowledged before the
    failover is rolled back on the new master (what a bump that never reached the replica
    leaves): the entry filled before it is still not served."""
    with cache_on(replicated):
        key, old_version = cached_then_invalidated(replicated)
        new_master = replicated.failover(tag_node(replicated, "default"))
        assert tag_node(replicated, "default") is new_master
        roll_back(new_master, key, old_version)
        assert_fresh_after_failover(replicated, new_master)


def test_a_killed_master_is_replaced_by_its_replica_and_nothing_stale_is_served(
    replicated: RedisCluster,
) -> None:
    """The master holding default's cache is killed, and it is also the node ``LOCATION``
    names: the cluster is rediscovered from the other nodes of the last slot map. The
    replica promoted in its place lacks the last bump (rolled back, as if never
    replicated): the changed identity still invalidates everything."""
    victim = replicated.node_for_key("{default}")
    with cache_on(replicated, location=f"redis://{victim.host}:{victim.port}/0"):
        key, old_version = cached_then_invalidated(replicated)
        new_master = replicated.kill_master(victim)
        assert tag_node(replicated, "default") is new_master
        roll_back(new_master, key, old_version)
        started = time.monotonic()
        assert_fresh_after_failover(replicated, new_master)
        assert time.monotonic() - started < 20

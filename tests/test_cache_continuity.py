"""Invalidations survive the writer's process, and Redis rollbacks never revive old entries.

* **Outbox** (``cache/outbox.py``): a write whose invalidation cannot reach Redis leaves a
  row in its database; another process drains it before it uses Redis again, even if the
  writer crashed (here: a forked process that exits hard, its retry timer with it).
* **Continuity** (``cache/continuity.py``): a Redis restored from a snapshot, or a failover
  to a replica that missed the latest bumps, is a different server (``run_id``): every
  database's generation is bumped with its primary's WAL position.

Faults are real: the harness's proxy cuts connections, Redis is stopped and started from
an RDB file, and a second redis-server is started as a lagging replica and failed over to.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction

from django_dbscale import replicas
from django_dbscale.backends.postgresql import base
from django_dbscale.cache import continuity, invalidation, outbox
from django_dbscale.cache.client import gateway
from django_dbscale.cache.options import options
from django_dbscale.testing.harness import RedisServer, Services, _free_ports, find_redis_server
from tests.test_cache_support import (
    QueryCounter,
    cache_env,
    cache_keys,
    fresh_context,
    observe,
    redis,
)
from tests.testapp.models_cache import CCounter

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]


def read(pk: int) -> tuple[int, list[str]]:
    """Read *pk* through the cache in a context that wrote nothing (replicas allowed)."""
    with fresh_context(), observe() as seen:
        return int(CCounter.objects.cache().get(pk=pk).value), seen.reasons


def prime(pk: int, value: int) -> None:
    read(pk)
    assert read(pk) == (value, ["hit"])


def outbox_rows(alias: str = "default") -> list[tuple[int, str]]:
    """Return the outbox rows of *alias*, by direct SQL."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT id, keys FROM {outbox.TABLE} ORDER BY id")
        return [(int(i), str(k)) for i, k in cursor.fetchall()]


def owe_behind_redis(pk: int, value: int) -> None:
    """Set a counter's value by direct SQL and leave its invalidation in the outbox only.

    What a writer in another process leaves when it cannot reach Redis (and then crashes,
    or is cut off alone): the database changed, Redis was not told.
    """
    table = CCounter._meta.db_table
    # A connection of its own: raw SQL through Django's cursor would invalidate by itself.
    with outbox.connect("default") as own, own.transaction():
        own.execute(f"UPDATE {table} SET value = %s WHERE id = %s", [value, pk])
        own.execute(
            f"INSERT INTO {outbox.TABLE} (keys) VALUES (%s)",
            [f"{options().prefix}:v:default:{table}:a"],
        )


def wait_for_open_breaker() -> None:
    """Wait until failed calls (this thread's and the verifying thread's) open the breaker."""
    deadline = time.monotonic() + 5
    while gateway().breaker.state != "open" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway().breaker.state == "open"


def reconnect_and_verify() -> None:
    """Read once after a fault (it finds its connection dead), then wait for verification.

    The read that meets the dead connection cannot trust Redis any more: it goes to the
    database, and the verifying thread settles everything in the background.
    """
    _, reasons = read_any()
    assert reasons == ["bypass:unverified"]
    assert continuity.wait_until_verified()


def read_any() -> tuple[int, list[str]]:
    with fresh_context(), observe() as seen:
        return int(CCounter.objects.cache().count()), seen.reasons


def in_child_process(work: Callable[[], Any]) -> Any:
    """Run *work* in a forked process that then dies without cleaning up (a crash).

    The child opens its own database and Redis connections (the parent's sockets are left
    alone: references to them are kept and the child leaves with ``os._exit``, so nothing
    is closed from its side). Returns what *work* returned, or re-raises what it raised.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        inherited = [c.connection for c in connections.all()]
        for wrapper in connections.all():
            wrapper.connection = None
        try:
            outcome: tuple[str, Any] = ("ok", work())
        except BaseException as exc:
            outcome = ("error", repr(exc))
        with os.fdopen(write_end, "wb") as out:
            pickle.dump(outcome, out)
        del inherited
        os._exit(0)  # no atexit, no finally, no retry timer: as if the process crashed
    os.close(write_end)
    with os.fdopen(read_end, "rb") as incoming:
        data = incoming.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"child process failed: {value}")
    return value


# -- the outbox ----------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_breaker")
def test_a_crashed_writers_invalidation_reaches_other_processes(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    proxy = services.proxies["redis"]

    def crashing_writer() -> list[bool]:
        CCounter.objects.filter(pk=row.pk).update(value=2)  # delivery fails: Redis cut off
        return [invalidation.has_pending()]

    with proxy.cut_off():
        assert in_child_process(crashing_writer) == [True]
        # The writer is gone, and with it its in-memory queue and retry timer; the row it
        # left in the outbox is all that remains of the invalidation.
        ((_, keys),) = outbox_rows()
        assert f"{CCounter._meta.db_table}:a" in keys
    # This process never saw the outage: its connections were cut while idle. Its next
    # read finds that out and stops trusting Redis until the outbox is drained.
    assert not invalidation.has_pending()
    reconnect_and_verify()
    assert read(row.pk) == (2, ["miss"])
    assert outbox_rows() == []
    assert read(row.pk) == (2, ["hit"])


@pytest.mark.usefixtures("fast_breaker")
def test_with_the_breaker_open_the_outbox_commits_with_the_write(services: Services) -> None:
    """A writer killed right after COMMIT, before delivering anything, loses nothing."""
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)

    def writer_killed_after_commit() -> None:
        read(row.pk)
        wait_for_open_breaker()
        # Die right after COMMIT, before any receiver of the commit event delivers anything.
        commit = base.DatabaseWrapper._commit

        def commit_then_die(self: Any) -> None:
            commit(self)
            os._exit(0)

        base.DatabaseWrapper._commit = commit_then_die  # type: ignore[method-assign]
        with transaction.atomic():
            CCounter.objects.filter(pk=row.pk).update(value=5)

    with services.proxies["redis"].cut_off():
        with pytest.raises(EOFError):  # the child died mid-commit: no reply
            in_child_process(writer_killed_after_commit)
        assert CCounter.objects.using("default").get(pk=row.pk).value == 5  # committed
        assert len(outbox_rows()) == 1  # ... together with its outbox row
    reconnect_and_verify()
    assert read(row.pk) == (5, ["miss"])
    assert outbox_rows() == []


@pytest.mark.usefixtures("fast_breaker")
def test_a_rolled_back_transaction_leaves_no_outbox_row(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    with services.proxies["redis"].cut_off():
        read(row.pk)
        wait_for_open_breaker()  # so the outbox row is written inside the transaction
        with pytest.raises(RuntimeError), transaction.atomic():
            CCounter.objects.filter(pk=row.pk).update(value=9)
            raise RuntimeError("abandon")
        assert outbox_rows() == []
    assert read(row.pk)[0] == 1


@pytest.mark.usefixtures("fast_breaker")
def test_outbox_rows_of_sharded_writes_live_on_their_shard(services: Services) -> None:
    from django_dbscale import using_shard
    from django_dbscale.cache import cached_queryset
    from tests.testapp.models_sharding import ShardCustomer

    @cached_queryset(depends_on=[ShardCustomer])
    def names() -> list[str]:
        return sorted(ShardCustomer.objects.values_list("name", flat=True))

    customer = ShardCustomer.objects.create(id=1001, name="a")
    shard = customer._state.db
    assert shard in {"shard0", "shard1", "shard2"}
    for _ in range(2):
        with fresh_context(), using_shard("customers", shard=shard):
            assert names() == ["a"]
    with services.proxies["redis"].cut_off():
        ShardCustomer.objects.filter(id=1001).update(name="b")
        # The bump failed to send, or was sent into a connection the cut had not reset yet
        # and is found lost when its reply is read (within 50 ms; here at once).
        invalidation.confirm()
        assert len(outbox_rows(shard)) == 1 and outbox_rows("default") == []
    assert continuity.wait_until_verified()  # the writer drains what it owes
    with fresh_context(), using_shard("customers", shard=shard), observe() as seen:
        assert names() == ["b"]
    assert seen.reasons == ["miss"]
    assert outbox_rows(shard) == []


@pytest.mark.usefixtures("fast_breaker")
def test_an_outbox_that_cannot_be_read_keeps_its_database_untrusted() -> None:
    from django_dbscale import using_shard
    from django_dbscale.cache import cached_queryset
    from tests.testapp.models_sharding import ShardCustomer

    @cached_queryset(depends_on=[ShardCustomer])
    def names() -> list[str]:
        return sorted(ShardCustomer.objects.values_list("name", flat=True))

    def shard_read() -> tuple[list[str], list[str]]:
        with fresh_context(), using_shard("customers", shard="shard1"), observe() as seen:
            return names(), seen.reasons

    row = CCounter.objects.create(name="c", value=1)
    gateway().connections_lost()  # verify now: the fixture wiped the recorded run id
    assert continuity.wait_until_verified()
    prime(row.pk, 1)
    shard_read()
    assert shard_read() == ([], ["hit"])
    with connections["default"].cursor() as cursor:
        cursor.execute(f"ALTER TABLE {outbox.TABLE} RENAME TO dbscale_outbox_moved")
    try:
        # A missing table is "nothing owed" (migrate was never run): reads go on.
        gateway().connections_lost()
        assert continuity.wait_until_verified()
        assert read(row.pk) == (1, ["hit"])
    finally:
        with connections["default"].cursor() as cursor:
            cursor.execute(f"ALTER TABLE dbscale_outbox_moved RENAME TO {outbox.TABLE}")
    # Another session holds the table locked: the drain times out (2 s), "default" stays
    # untrusted and its cached reads go to the database; the other databases are trusted.
    locker = outbox.connect("default")
    locker.autocommit = False
    locker.execute(f"LOCK TABLE {outbox.TABLE} IN ACCESS EXCLUSIVE MODE")
    try:
        gateway().connections_lost()
        assert not continuity.wait_until_verified(timeout=3)
        assert continuity.untrusted == {"default"}
        assert read(row.pk) == (1, ["bypass:unverified"])
        assert shard_read() == ([], ["hit"])  # the other databases are trusted meanwhile
    finally:
        locker.rollback()
        locker.close()
    assert continuity.wait_until_verified()  # retried every BREAKER_COOLDOWN
    assert read(row.pk) == (1, ["hit"])


# -- continuity: the server behind the connection ----------------------------------------


def _versions() -> dict[str, bytes]:
    return {k: redis().get(k) for k in cache_keys("v:*")}


def test_a_redis_restored_from_a_snapshot_serves_nothing_filled_before_it(
    services: Services, paused: Any
) -> None:
    import redis as redis_py

    if services.redis.external:
        pytest.fail("needs a harness-booted Redis (it is stopped and restarted)")
    row = CCounter.objects.create(name="c", value=1)
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    prime(row.pk, 1)
    snapshot = _versions()
    redis().save()  # the RDB file holds the entry and the versions it matches
    dump = Path(services.redis.workdir or ".") / "dump.rdb"
    try:
        paused(services.pg1_replica)  # the replica will not have the write below
        CCounter.objects.filter(pk=row.pk).update(value=2)
        assert _versions() != snapshot
        services.redis.stop()
        services.redis.start(keep_data=True)  # loads dump.rdb: versions and entries roll back
        direct = redis_py.Redis(host=services.redis.host, port=services.redis.port)
        assert {k: direct.get(k) for k in snapshot} == snapshot  # really rolled back
        reconnect_and_verify()
        replicas.monitor.refresh()
        with QueryCounter(["default", "default_replica"]) as q:
            value, reasons = read(row.pk)
        assert (value, reasons) == (2, ["miss"])
        # The generation carries the primary's position: the lagging replica is not used.
        # The fill and the primary's WAL position (the floor its hits raise).
        assert q.counts == {"default": 2, "default_replica": 0}
        assert read(row.pk) == (2, ["hit"])
    finally:
        dump.unlink(missing_ok=True)


def test_a_failover_to_a_lagging_redis_replica_serves_nothing_it_missed(
    services: Services, tmp_path: Path
) -> None:
    import redis as redis_py

    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    (port,) = _free_ports(1)
    standby = RedisServer(services.redis.host, port, binary=find_redis_server(), workdir=tmp_path)
    standby.start()
    try:
        replica = redis_py.Redis(host=standby.host, port=standby.port)
        replica.replicaof(services.redis.host, services.redis.port)
        deadline = time.monotonic() + 10
        while replica.dbsize() < len(cache_keys()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica.dbsize() >= len(cache_keys())
        replica.replicaof("NO", "ONE")  # replication stops: it misses the bump below
        CCounter.objects.filter(pk=row.pk).update(value=3)
        services.proxies["redis"].retarget(standby.host, standby.port)  # the failover
        # Its connections are gone without an error being seen (as when DNS moves):
        # the next one opened finds another server behind the address.
        gateway().close()
        try:
            reconnect_and_verify()
            assert read(row.pk) == (3, ["miss"])
            assert read(row.pk) == (3, ["hit"])
        finally:
            services.proxies["redis"].retarget(services.redis.host, services.redis.port)
            gateway().connections_lost()  # fail back, and verify the original again
            assert continuity.wait_until_verified()
    finally:
        standby.stop()


def test_a_new_connection_to_the_same_server_costs_one_info(services: Services) -> None:
    import redis as redis_py

    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    assert continuity.verified_run_id() is not None
    direct = redis_py.Redis(host=services.redis.host, port=services.redis.port)

    def calls() -> dict[str, int]:
        stats = direct.info("commandstats")
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in NAMES}

    NAMES = ("info", "eval", "evalsha", "get", "set")
    before = calls()  # counted after it ran: one INFO of its own
    gateway().close()  # new connections, same server, no error: nothing to settle
    assert read(row.pk) == (1, ["hit"])
    after = calls()
    delta = {name: after[name] - before[name] for name in NAMES}
    # The measuring INFO, the new connection's INFO and its run id refresh (one EVAL, whose
    # GET is counted too), the hit (EVALSHA); no generation or outbox bumps, no SET.
    assert delta == {"info": 2, "eval": 1, "evalsha": 1, "get": 1, "set": 0}


def test_run_id_is_recorded_with_a_time_to_live() -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    gateway().connections_lost()
    assert continuity.wait_until_verified()
    key = f"{options().prefix}:run"
    assert redis().get(key).decode() == continuity.verified_run_id()
    assert 0 < redis().ttl(key) <= options().version_timeout


def test_a_long_outbox_is_drained_whole_with_dimension_keys_collapsed() -> None:
    """Thousands of rows, each with hundreds of dimension keys: drained in one verification.

    Dimension versions collapse into their table's wide version (one key per table), and
    batches continue until the table is empty, so the row written last is drained too.
    """
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    CCounter.objects.using("default").filter(pk=row.pk).nocache().update(value=2)
    prime(row.pk, 2)
    prefix = options().prefix
    dims = "\n".join(f"{prefix}:v:default:testapp_other:d:x={i}" for i in range(300))
    with connections["default"].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {outbox.TABLE} (keys) SELECT %s FROM generate_series(1, 2500)", [dims]
        )
    owe_behind_redis(row.pk, 3)  # last, a real write's owed invalidation
    assert read(row.pk) == (2, ["hit"])  # stale until someone drains the outbox
    started = time.monotonic()
    gateway().connections_lost()
    assert continuity.wait_until_verified(timeout=30)
    elapsed = time.monotonic() - started
    assert outbox_rows() == []
    assert read(row.pk) == (3, ["miss"])
    assert redis().exists(f"{prefix}:v:default:testapp_other:w") == 1  # the collapse
    assert redis().exists(f"{prefix}:v:default:testapp_other:d:x=7") == 0
    assert elapsed < 10, elapsed


def test_the_recorded_run_id_is_refreshed_by_new_connections() -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    key = f"{options().prefix}:run"
    gateway().connections_lost()
    assert continuity.wait_until_verified()
    redis().expire(key, 100)
    gateway().close()  # new connections to the verified server
    assert read(row.pk)[0] == 1
    assert redis().ttl(key) > 100


def test_a_forked_worker_verifies_for_itself() -> None:
    row = CCounter.objects.create(name="c", value=1)
    gateway().connections_lost()  # record the run id (the fixture wiped it)
    assert continuity.wait_until_verified()
    prime(row.pk, 1)

    def worker() -> list[Any]:
        first = sorted(continuity.untrusted)
        uncached = read(row.pk)
        verified = continuity.wait_until_verified()
        return [first, uncached, verified, read(row.pk)]

    expected = [[continuity.ALL], (1, ["bypass:unverified"]), True, (1, ["hit"])]
    assert in_child_process(worker) == expected


def test_a_hit_read_while_trust_was_lost_is_not_served(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read meets a dead connection, and the verification ends before the read does.

    What Redis returned on the new connection predates the drain, even though everything
    is trusted again by the time the read looks: the read must not serve it.
    """
    import pickle as real_pickle

    import redis as redis_py

    from django_dbscale.cache import engine

    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    owe_behind_redis(row.pk, 2)  # a crashed writer's owed invalidation
    direct = redis_py.Redis(host=services.redis.host, port=services.redis.port)
    direct.client_kill_filter(_type="normal", skipme=True)  # reset every client connection

    class SlowUnpickle:
        """Unpickling that lasts until the verification is over (a large entry, a GC pause)."""

        HIGHEST_PROTOCOL = real_pickle.HIGHEST_PROTOCOL
        dumps = staticmethod(real_pickle.dumps)

        @staticmethod
        def loads(data: bytes) -> Any:
            assert continuity.wait_until_verified()
            return real_pickle.loads(data)

    monkeypatch.setattr(engine, "pickle", SlowUnpickle)
    assert read(row.pk) == (2, ["bypass:unverified"])
    monkeypatch.setattr(engine, "pickle", real_pickle)
    assert outbox_rows() == []
    assert read(row.pk) == (2, ["miss"])


def test_an_outbox_poll_finds_what_no_redis_error_revealed() -> None:
    """Another process owes an invalidation; this one saw no error (a black hole, say).

    Without ``OUTBOX_POLL_INTERVAL`` it keeps serving the entry (the documented limit);
    with it, the poll finds the row, the database is untrusted, and the row is drained.
    """
    from django.conf import settings
    from django.test import override_settings

    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    owe_behind_redis(row.pk, 2)
    time.sleep(0.3)
    assert read(row.pk) == (1, ["hit"])  # no poll: stale until some process drains it
    cache = {**settings.DBSCALE["CACHE"], "OUTBOX_POLL_INTERVAL": 0.1}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        deadline = time.monotonic() + 5
        while outbox_rows() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outbox_rows() == []
        assert continuity.wait_until_verified()
        assert read(row.pk) == (2, ["miss"])


def test_generation_bumps_owed_by_a_restart_survive_an_interrupted_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round that detected another server is interrupted (a new outbox row) after one
    database: the generations of the others are still bumped before they are trusted."""
    import threading

    from django_dbscale import using_shard
    from django_dbscale.cache import cached_queryset
    from tests.testapp.models_sharding import ShardCustomer

    @cached_queryset(depends_on=[ShardCustomer])
    def names() -> list[str]:
        return sorted(ShardCustomer.objects.values_list("name", flat=True))

    def shard_read(shard: str) -> tuple[list[str], list[str]]:
        with fresh_context(), using_shard("customers", shard=shard), observe() as seen:
            return names(), seen.reasons

    gateway().connections_lost()
    assert continuity.wait_until_verified()
    customer = ShardCustomer.objects.create(id=1001, name="a")
    shard = customer._state.db
    shard_read(shard)
    assert shard_read(shard) == (["a"], ["hit"])
    prefix = options().prefix
    # As after a restart from a snapshot: a bump Redis lost, and another run id recorded.
    with connections[shard].cursor() as cursor:
        cursor.execute(f"UPDATE {ShardCustomer._meta.db_table} SET name = 'b' WHERE id = 1001")
    redis().set(f"{prefix}:run", "an-older-server")
    real_connect = outbox.connect
    interrupted: list[str] = []

    def connect(alias: str) -> Any:
        if threading.current_thread().name == "dbscale-cache-verify" and not interrupted:
            interrupted.append(alias)
            continuity.owe("default")  # a writer's outbox row, mid-round
        return real_connect(alias)

    monkeypatch.setattr(outbox, "connect", connect)
    gateway().connections_lost()
    assert continuity.wait_until_verified()
    assert interrupted == ["default"]
    assert shard_read(shard) == (["b"], ["miss"])
    assert redis().get(f"{prefix}:run").decode() == continuity.verified_run_id()


@pytest.mark.usefixtures("fast_breaker")
def test_a_cut_is_noticed_without_an_idle_connection_of_the_caller(services: Services) -> None:
    """The process had no idle connection of its own: its next read opens a new one to the
    same server, which looks fine. The verifying thread's kept connection was reset by the
    cut, and that is what tells this process it may have missed an invalidation."""
    row = CCounter.objects.create(name="c", value=1)
    gateway().connections_lost()  # record the run id (the fixture wiped it)
    assert continuity.wait_until_verified()
    prime(row.pk, 1)
    gateway().close()  # no idle connection of the caller's own
    with services.proxies["redis"].cut_off():
        # Meanwhile another process writes, cannot deliver, and leaves an outbox row.
        owe_behind_redis(row.pk, 2)
    services.pg1_replica.wait_for_replay()  # the bypassing read is routed to the replica
    assert read(row.pk) == (2, ["bypass:unverified"])
    assert continuity.wait_until_verified()
    assert outbox_rows() == []
    assert read(row.pk) == (2, ["miss"])

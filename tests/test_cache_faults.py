"""Redis cut off, black-holed, restarted or holding garbage: reads stay correct and fast.

Faults are injected for real through the harness's TCP proxy in front of Redis and by
stopping and starting the Redis server.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from django_dbscale import replicas
from django_dbscale.cache import continuity, invalidation
from django_dbscale.cache.breaker import CircuitBreaker
from django_dbscale.cache.client import gateway
from django_dbscale.testing.harness import Services
from tests.test_cache_support import (
    COOLDOWN,
    QueryCounter,
    cache_env,
    entry_keys,
    fresh_context,
    observe,
    redis,
)
from tests.testapp.models_cache import CCounter

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]


def value_of(pk: int) -> int:
    return int(CCounter.objects.cache().get(pk=pk).value)


def read(pk: int) -> tuple[int, list[str]]:
    """Read in the test's own context, which did the writes.

    Reads that bypass the cache are routed like any uncached read; only in the writer's
    context is the router bound to return what that context wrote (read-your-writes).
    """
    with observe() as seen:
        return value_of(pk), seen.reasons


def prime(pk: int, value: int) -> None:
    assert read(pk)[0] == value
    assert read(pk) == (value, ["hit"])


@pytest.mark.usefixtures("fast_breaker")
def test_invalidations_lost_to_a_cut_are_delivered_before_the_cache_is_used_again(
    services: Services,
) -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    proxy = services.proxies["redis"]
    with proxy.cut_off():
        CCounter.objects.filter(pk=row.pk).update(value=2)  # the write succeeds
        assert invalidation.has_pending()
        value, reasons = read(row.pk)
        assert value == 2 and reasons[0].startswith("bypass:")
    # Healed: the entry filled before the outage is still in Redis, under old versions.
    assert entry_keys()
    assert continuity.wait_until_verified()
    value, reasons = read(row.pk)
    assert value == 2
    assert reasons == ["miss"]  # the pending invalidation went out first
    assert not invalidation.has_pending()
    assert read(row.pk) == (2, ["hit"])


@pytest.mark.usefixtures("fast_breaker")
def test_writes_inside_transactions_during_a_cut_are_not_forgotten(services: Services) -> None:
    from django.db import transaction

    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    with services.proxies["redis"].cut_off():
        with transaction.atomic():
            CCounter.objects.filter(pk=row.pk).update(value=3)
        assert read(row.pk)[0] == 3
    assert continuity.wait_until_verified()
    assert read(row.pk) == (3, ["miss"])


@pytest.mark.usefixtures("fast_breaker")
def test_a_black_holed_redis_costs_no_timeout_once_the_breaker_opens(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    with services.proxies["redis"].blackholed():
        # The first read pays one socket timeout; after it nothing is trusted, so reads
        # skip Redis, and the verifying thread's failed attempt opens the breaker.
        assert read(row.pk) == (1, ["bypass:redis error"])
        assert read(row.pk) == (1, ["bypass:unverified"])
        deadline = time.monotonic() + 5
        while gateway().breaker.state != "open" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gateway().breaker.state == "open"
        started = time.monotonic()
        for i in range(20):
            CCounter.objects.filter(pk=row.pk).update(value=10 + i)
            # Read in the writer's own context: a fresh one could be routed to a replica
            # still replaying the write (read-your-writes is the router's business).
            assert value_of(row.pk) == 10 + i
        elapsed = time.monotonic() - started
        assert elapsed < 0.1 * 4, elapsed  # 40 operations in well under a few timeouts
    assert continuity.wait_until_verified()
    assert read(row.pk) == (29, ["miss"])


def test_redis_restart_reloads_scripts_and_fills_from_the_primary(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    prime(row.pk, 1)
    services.redis.stop()
    try:
        assert read(row.pk)[0] == 1  # Redis down: straight to the database
    finally:
        services.redis.start()
    gateway().breaker.reset()
    assert continuity.wait_until_verified()
    # Empty Redis, no scripts: versions are recreated as "position unknown", so the fill
    # reads the primary even though the replica has replayed everything.
    with fresh_context(), observe() as seen, QueryCounter(["default", "default_replica"]) as q:
        assert value_of(row.pk) == 1
    assert seen.reasons == ["miss"]
    # The fill and the primary's WAL position (the floor its hits raise).
    assert q.counts == {"default": 2, "default_replica": 0}
    assert read(row.pk) == (1, ["hit"])


def test_an_entry_that_fails_to_unpickle_is_a_miss_and_is_refilled() -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    (entry,) = entry_keys()
    redis().set(entry, b"\x80\x05garbage", keepttl=True)  # header untouched: still "valid"
    value, reasons = read(row.pk)
    assert value == 1 and reasons == ["miss"]
    assert read(row.pk) == (1, ["hit"])


def test_results_above_the_size_cap_are_not_stored() -> None:
    row = CCounter.objects.create(name="c" * 40, value=1)
    cache = {**settings.DBSCALE["CACHE"], "MAX_RESULT_BYTES": 64}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        assert read(row.pk) == (1, ["bypass:too big"])
        assert read(row.pk) == (1, ["bypass:too big"])
    assert not entry_keys()


# -- the breaker on its own ---------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    breaker = CircuitBreaker(2, 0.05)
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()
    assert breaker.allow()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()  # this caller is the probe
    assert not breaker.allow()  # everyone else still bypasses
    breaker.failure()  # the probe failed: open again
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


@pytest.mark.parametrize(("failures", "cooldown"), [(0, 1.0), (1, 0.0)])
def test_breaker_rejects_bad_parameters(failures: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match="failures >= 1 and cooldown > 0"):
        CircuitBreaker(failures, cooldown)


@pytest.mark.usefixtures("fast_breaker")
def test_one_flush_gives_every_key_of_every_alias_a_distinct_token(services: Services) -> None:
    from django_dbscale.cache import invalidate_model
    from tests.test_cache_support import cache_keys

    with services.proxies["redis"].cut_off():
        invalidate_model(CCounter, using="default")
        invalidate_model(CCounter, using="shard0")
    time.sleep(COOLDOWN + 0.05)
    assert invalidation.flush_pending()  # both aliases in one pipelined flush
    values = {k: redis().get(k) for k in cache_keys("v:*")}
    assert len(values) >= 4
    tokens = {v.decode().rpartition(":")[0] for v in values.values()}
    assert len(tokens) == len(values), values


def test_bump_keeps_the_highest_position_but_never_an_unknown_one() -> None:
    from django_dbscale.cache.client import BUMP

    key = f"{invalidation.options().prefix}:v:default:t:a"
    low, high, unknown = f"{1:016x}", f"{2:016x}", f"{invalidation.UNKNOWN_LSN:016x}"
    gw = gateway()
    gw.evalsha(BUMP, [key], ["x1.", high, 60, 60])
    gw.evalsha(BUMP, [key], ["x2.", low, 60, 60])
    assert redis().get(key).decode().endswith(":" + high)  # an older position never wins
    gw.evalsha(BUMP, [key], ["x3.", unknown, 60, 60])
    assert redis().get(key).decode().endswith(":" + unknown)  # fill from the primary...
    gw.evalsha(BUMP, [key], ["x4.", low, 60, 60])
    assert redis().get(key).decode().endswith(":" + low)  # ...until the next known position


def test_an_interrupted_hit_never_leaves_its_connection_for_reuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    gw = gateway()
    connection = gw._free[-1]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # mid-reply: the reply would be left unread on the socket

    monkeypatch.setattr(connection, "read_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read(row.pk)
    assert connection not in gw._free
    monkeypatch.undo()
    assert read(row.pk) == (1, ["hit"])


@pytest.mark.usefixtures("fast_breaker")
def test_undelivered_invalidations_are_retried_in_the_background(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    prime(row.pk, 1)
    with services.proxies["redis"].cut_off():
        CCounter.objects.filter(pk=row.pk).update(value=2)
        assert invalidation.has_pending()
    deadline = time.monotonic() + 5
    while invalidation.has_pending() and time.monotonic() < deadline:
        time.sleep(0.05)  # no cache call in this process meanwhile
    assert not invalidation.has_pending()
    # The cut dropped this process's trust; its verifier restores it on its own round.
    assert continuity.wait_until_verified()
    # What another process sees: the entry's versions were bumped in Redis.
    assert read(row.pk) == (2, ["miss"])


def test_redis_failures_while_the_interpreter_exits_are_not_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Services closing under a background thread at exit are not the site's problem."""
    failure = ConnectionError("Connection closed by server.")
    gw = gateway()
    with caplog.at_level("DEBUG", logger="django_dbscale"):
        gw.failed(failure, "verify")
        assert [r.levelname for r in caplog.records if "verify failed" in r.message] == ["WARNING"]
        caplog.clear()
        continuity._exiting.set()
        try:
            gw.failed(failure, "verify")
        finally:
            continuity._exiting.clear()
        assert [r.levelname for r in caplog.records if "verify failed" in r.message] == ["DEBUG"]
    gw.breaker.success()


@pytest.mark.usefixtures("fast_breaker")
def test_a_bump_sent_without_waiting_and_lost_is_outboxed_then_delivered(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write returns once its bumps are sent; here they never reach Redis (black hole).
    monkeypatch.setattr(invalidation, "CONFIRM_WITHIN", 60.0)  # the test confirms itself
    row = CCounter.objects.create(name="lost", value=1)
    prime(row.pk, 1)
    with services.proxies["redis"].blackholed():
        CCounter.objects.filter(pk=row.pk).update(value=2)  # returns after the send
        assert invalidation.has_pending()  # in flight: this process's reads must wait
        assert not invalidation.confirm()  # no reply within the socket timeout
        assert invalidation.has_pending()  # still owed, and written to the outbox:
        outboxed = services.pg1.execute(
            "SELECT keys FROM dbscale_cache_outbox", dbname=services.databases()["default"]["NAME"]
        )
        assert len(outboxed) == 1 and "testapp_ccounter" in str(outboxed[0][0]), outboxed
        value, reasons = read(row.pk)
        assert value == 2 and reasons[0].startswith("bypass:")
    assert continuity.wait_until_verified()
    with fresh_context():  # another context, which holds no token of the write
        assert read(row.pk) == (2, ["miss"])
    assert not invalidation.has_pending()


def test_a_consistency_token_is_issued_only_after_the_bumps_are_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django_dbscale import consistency_token

    monkeypatch.setattr(invalidation, "CONFIRM_WITHIN", 60.0)
    row = CCounter.objects.create(name="token", value=1)
    prime(row.pk, 1)
    CCounter.objects.filter(pk=row.pk).update(value=2)
    assert invalidation.has_pending()  # sent, reply not read yet
    consistency_token()  # what a response cookie or a task header carries
    assert not invalidation.has_pending()
    with fresh_context():
        assert read(row.pk) == (2, ["miss"])


def test_another_threads_pending_invalidations_do_not_outbox_this_transaction(
    services: Services,
) -> None:
    # A thread between queueing its invalidations and sending them (here: waiting for the
    # send lock, which this thread holds) says nothing about Redis: a transaction that
    # commits meanwhile must not write an outbox row as if Redis were failing.
    import threading

    from django.db import transaction

    mine = CCounter.objects.create(name="mine", value=1)
    theirs = CCounter.objects.create(name="theirs", value=1)
    assert invalidation.confirm() and not invalidation.has_pending()
    dbname = services.databases()["default"]["NAME"]

    def outbox_rows() -> int:
        return len(services.pg1.execute("SELECT 1 FROM dbscale_cache_outbox", dbname=dbname))

    before = outbox_rows()
    with invalidation._flush_lock:
        other = threading.Thread(
            target=lambda: CCounter.objects.filter(pk=theirs.pk).update(value=2)
        )
        other.start()
        deadline = time.monotonic() + 10
        while not invalidation.has_pending() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert invalidation.has_pending()  # the other thread's keys, queued, not sent
        with transaction.atomic():
            CCounter.objects.filter(pk=mine.pk).update(value=2)
        assert outbox_rows() == before  # checked before anything could drain a row
    other.join(10)
    assert invalidation.confirm() and not invalidation.has_pending()
    assert value_of(mine.pk) == 2 and value_of(theirs.pk) == 2

"""Every pillar through PgBouncer in transaction pooling mode (issue 13).

The ``through_pgbouncer`` fixture points every alias of the suite at one PgBouncer
(:func:`~django_dbscale.testing.harness.start_pgbouncer`) for this module: ``pool_mode =
transaction``, three server sessions per database and ``server_round_robin = 1``, so two
consecutive transactions of one client run on *different* server sessions. Whatever relies
on session state breaks here, as it would under production load: the first test proves the
rotation, the others prove that each pillar does not rely on it (or fails with an error that
names the fix). Rows are checked with direct SQL on the servers behind the pooler.

Skipped, saying what to install, where PgBouncer is missing (an embedded-only machine).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.core.signals import setting_changed
from django.db import connections

from django_dbscale import consistency, consistency_context, replicas
from django_dbscale.cache import continuity, outbox
from django_dbscale.own_connections import connect
from django_dbscale.sharding import decode_id, shard_for_key
from django_dbscale.testing.harness import (
    PGBOUNCER_MISSING,
    HarnessError,
    PgBouncer,
    Services,
    find_pgbouncer,
    start_pgbouncer,
)
from tests.test_cache_support import cache_env, entry_keys, observe
from tests.testapp.models import Note, ShardCustomer, ShardOrder
from tests.testapp.models_cache import CCounter

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(scope="module")
def pgbouncer(services: Services) -> Iterator[PgBouncer]:
    """Start PgBouncer (transaction pooling) in front of every server, for this module."""
    try:
        find_pgbouncer()
    except HarnessError:
        pytest.skip(PGBOUNCER_MISSING)
    bouncer = start_pgbouncer(services)
    try:
        yield bouncer
    finally:
        bouncer.stop()


def _address(entry: dict[str, Any]) -> tuple[str, str, str]:
    return (str(entry.get("HOST")), str(entry.get("PORT")), str(entry.get("NAME")))


@pytest.fixture(scope="module")
def through_pgbouncer(
    pgbouncer: PgBouncer, services: Services, django_db_setup: None, django_db_blocker: Any
) -> Iterator[PgBouncer]:
    """Point every alias of ``DATABASES`` at PgBouncer for this module, then back.

    An alias is pointed at the PgBouncer database of the harness alias that reaches the
    same server and database (directly or through the harness's fault proxy), so aliases
    sharing a database (``default_twin``, ``default_plain``) still share one. The settings
    dicts are changed in place: Django's connections hold the same dicts, and overriding
    ``DATABASES`` is not supported by Django's test tools. The library's derived settings
    are reloaded, and every connection (Django's, the replica monitor's) reopens.
    """
    bounced = pgbouncer.databases()
    by_address: dict[tuple[str, str, str], str] = {}
    for alias, entry in services.databases().items():
        server = services.alias_server(alias)
        by_address[_address(entry)] = alias
        by_address[(server.host, str(server.port), services.alias_dbname(alias))] = alias
    saved: dict[str, dict[str, Any]] = {}
    for alias, entry in settings.DATABASES.items():
        target = by_address.get(_address(entry))
        if target is None:
            continue
        saved[alias] = {key: entry.get(key) for key in bounced[target]}
        entry.update({key: value for key, value in bounced[target].items() if key != "TEST"})
    _reconnect()
    try:
        yield pgbouncer
    finally:
        for alias, old in saved.items():
            entry = settings.DATABASES[alias]
            for key, value in old.items():
                if value is None:
                    entry.pop(key, None)
                else:
                    entry[key] = value
        _reconnect()


def _reconnect() -> None:
    connections.close_all()
    replicas.monitor.reset()
    # What a settings change does to the library's derived state (rings, probes, gateway).
    setting_changed.send(sender=None, setting="DBSCALE", value=settings.DBSCALE, enter=True)


@pytest.fixture(autouse=True)
def _bounced(through_pgbouncer: PgBouncer) -> PgBouncer:
    return through_pgbouncer


def backend_pids(alias: str, count: int) -> list[int]:
    with connections[alias].cursor() as cursor:
        pids = []
        for _ in range(count):
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
    return pids


def on_server(services: Services, alias: str, sql: str, params: Any = ()) -> list[Any]:
    """Run *sql* directly on the server behind *alias* (not through PgBouncer)."""
    return services.alias_server(alias).execute(sql, params, dbname=services.alias_dbname(alias))


def test_consecutive_transactions_of_one_connection_run_on_different_server_sessions(
    through_pgbouncer: PgBouncer,
) -> None:
    assert settings.DATABASES["default"]["PORT"] == str(through_pgbouncer.port)
    pids = backend_pids("default", 6)
    assert len(set(pids)) == through_pgbouncer.pool_size, pids
    pool = next(p for p in through_pgbouncer.show("pools") if p["database"] == "default")
    assert pool["pool_mode"] == "transaction"


# -- read/write splitting -----------------------------------------------------------------


def primed() -> None:
    replicas.monitor.refresh()
    status = replicas.monitor.status("default_replica")
    assert status.usable(time.monotonic()), status


def wal_position(services: Services) -> int:
    """Return pg1's WAL insert position, read directly."""
    (text,) = on_server(services, "default", "SELECT pg_current_wal_insert_lsn()::text")[0]
    return consistency.parse_lsn(text)


def test_own_write_is_read_from_the_primary_while_the_replica_lags(
    services: Services, paused: Any
) -> None:
    primed()
    paused(services.pg1_replica)
    before = wal_position(services)
    note = Note.objects.create(title="mine")
    # The replica behind the pooler really lacks it.
    assert on_server(services, "default_replica", "SELECT id FROM testapp_note") == []
    got = Note.objects.filter(pk=note.pk).first()
    assert got is not None and (got.title, got._state.db) == ("mine", "default")
    assert replicas.route_counts[("default", "read_your_writes")] == 1
    # The position was fetched through the pooler, on another server session than the
    # write's: WAL positions are the server's, so it is past the write all the same.
    position = consistency.required_position("default")
    assert position is not None and before < position <= wal_position(services)
    (replayed,) = on_server(services, "default_replica", "SELECT pg_last_wal_replay_lsn()::text")[0]
    assert consistency.parse_lsn(replayed) < position
    with consistency_context():
        assert Note.objects.filter(pk=note.pk).first() is None
    assert replicas.route_counts[("default_replica", "replica")] == 1


def test_own_write_is_read_from_the_replica_once_it_has_replayed(services: Services) -> None:
    primed()
    note = Note.objects.create(title="caught up")
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    got = Note.objects.filter(pk=note.pk).first()
    assert got is not None and (got.title, got._state.db) == ("caught up", "default_replica")


def test_replica_probes_keep_working_across_server_sessions(services: Services) -> None:
    """The monitor's long-lived probe connection runs the same query round after round."""
    Note.objects.create(title="moves the primary")
    services.pg1_replica.wait_for_replay()
    for _ in range(12):  # past psycopg's automatic prepare threshold (5)
        replicas.monitor.refresh()
        status = replicas.monitor.status("default_replica")
        assert status.healthy and status.in_recovery and status.failures == 0, status
    (replayed,) = on_server(services, "default_replica", "SELECT pg_last_wal_replay_lsn()::text")[0]
    assert status.replay_lsn == consistency.parse_lsn(replayed)
    assert status.usable(time.monotonic())


# -- the library's own connections ---------------------------------------------------------


def test_the_librarys_own_connections_run_repeated_statements_across_sessions() -> None:
    with connect("default") as own:
        pids = {own.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(12)}  # type: ignore[index]
        assert len(pids) > 1  # really rotated, yet no prepared statement went missing
        for _ in range(12):
            assert outbox.has_rows(own) in (True, False)


# -- the queryset cache --------------------------------------------------------------------


@pytest.mark.usefixtures(cache_env.__name__)
def test_cached_reads_are_invalidated_by_writes_through_the_pooler(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    with observe() as seen:
        assert CCounter.objects.cache().get(pk=row.pk).value == 1
        assert CCounter.objects.cache().get(pk=row.pk).value == 1
    assert seen.reasons == ["miss", "hit"]
    CCounter.objects.filter(pk=row.pk).update(value=2)
    with observe() as seen:
        assert CCounter.objects.cache().get(pk=row.pk).value == 2
    assert seen.reasons == ["miss"]
    assert on_server(
        services, "default", "SELECT value FROM testapp_ccounter WHERE id = %s", [row.pk]
    ) == [(2,)]


@pytest.mark.usefixtures(cache_env.__name__, "fast_breaker")
def test_the_outbox_is_written_and_drained_through_the_pooler(services: Services) -> None:
    row = CCounter.objects.create(name="c", value=1)
    assert CCounter.objects.cache().get(pk=row.pk).value == 1
    assert entry_keys()
    with services.proxies["redis"].cut_off():
        CCounter.objects.filter(pk=row.pk).update(value=5)
        # The owed invalidation sits in the primary's outbox, written through the pooler.
        rows = on_server(services, "default", f"SELECT keys FROM {outbox.TABLE}")
        assert len(rows) == 1 and "ccounter" in rows[0][0]
    assert continuity.wait_until_verified()
    assert on_server(services, "default", f"SELECT count(*) FROM {outbox.TABLE}") == [(0,)]
    with observe() as seen:
        assert CCounter.objects.cache().get(pk=row.pk).value == 5
    assert seen.reasons == ["miss"]


# -- sharding: global IDs -----------------------------------------------------------------


def test_global_ids_are_unique_under_concurrent_inserts_and_leave_no_lock(
    services: Services,
) -> None:
    key = 1
    while shard_for_key("customers", key) != "shard1":
        key += 1
    ShardCustomer.objects.create(id=key, name="c")
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def insert() -> None:
        try:
            barrier.wait()
            for _ in range(20):
                ShardOrder.objects.create(customer_id=key)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=insert) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ids = [
        pk
        for (pk,) in on_server(
            services, "shard1", "SELECT id FROM testapp_shardorder WHERE customer_id = %s", [key]
        )
    ]
    assert len(ids) == len(set(ids)) == 120
    assert {decode_id(pk).shard_number for pk in ids} == {1}
    # The session-level lock dbscale_next_id() takes is released within its statement, so
    # no server session PgBouncer hands to another client keeps it.
    assert on_server(
        services, "shard1", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    ) == [(0,)]


# -- session state the library must not rely on --------------------------------------------


def test_a_session_setting_is_lost_between_transactions_but_set_local_is_kept() -> None:
    """Why the library uses ``SET LOCAL`` (the outbox's timeouts), never ``SET``."""
    with connect("default") as own:
        own.execute("SET statement_timeout = 1234")
        seen = {own.execute("SHOW statement_timeout").fetchone()[0] for _ in range(6)}  # type: ignore[index]
        assert len(seen) > 1  # some sessions have it, others not: session state is unusable
        with own.transaction():
            own.execute("SET LOCAL statement_timeout = 2000")
            assert own.execute("SHOW statement_timeout").fetchone() == ("2s",)
        own.execute("RESET statement_timeout")


def test_reshard_refuses_a_transaction_pooler_naming_the_fix(services: Services) -> None:
    """Its session advisory locks and ``dbscale.resharding`` setting need a direct session."""
    with pytest.raises(CommandError) as info:
        call_command("dbscale", "reshard", "ledgers", "--plan", "--remove", "shard2")
    message = str(info.value)
    assert "does not reach PostgreSQL through a direct connection" in message
    assert "Point DATABASES['shard2'] at the PostgreSQL server itself (not PgBouncer)" in message
    with pytest.raises(CommandError, match=r"DATABASES\['default'\] does not reach PostgreSQL"):
        call_command("dbscale", "reshard", "ledgers", "--remove", "shard2")
    # The job lock was refused with its connection: no pooled server session keeps it.
    assert on_server(
        services, "default", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    ) == [(0,)]


def test_iterator_works_with_server_side_cursors_disabled() -> None:
    Note.objects.bulk_create([Note(title=f"n{i}") for i in range(30)])
    assert settings.DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] is True
    titles = [n.title for n in Note.objects.using("default").order_by("pk").iterator(chunk_size=7)]
    assert titles == [f"n{i}" for i in range(30)]


def test_a_named_cursor_outside_a_transaction_fails_through_the_pooler(
    through_pgbouncer: PgBouncer,
) -> None:
    """What ``DISABLE_SERVER_SIDE_CURSORS`` avoids: a ``WITH HOLD`` cursor is session state."""
    with through_pgbouncer.connect("default") as conn:
        conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 10)")
        failures = 0
        for _ in range(through_pgbouncer.pool_size):
            try:
                conn.execute("FETCH 2 FROM c").fetchall()
            except psycopg.errors.InvalidCursorName:
                failures += 1
        assert failures > 0

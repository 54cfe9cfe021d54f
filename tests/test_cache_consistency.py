"""The cache never serves or stores data older than the last write committed before a read.

Races are made deterministic with Django's ``execute_wrapper``: a reader thread is held
right after its database query, before it stores the fill, while another thread commits a
write. Lagging replicas are real: replay is paused on the harness's streaming replica.
"""

from __future__ import annotations

import pickle
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections, transaction

from django_dbscale import replicas
from django_dbscale.cache import cached_queryset, invalidation
from django_dbscale.testing.harness import Services
from tests.test_cache_support import (
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


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start *target* in a thread with its own connections; collect result or error."""
    box: list[Any] = []

    def main() -> None:
        try:
            box.append(target())
        except BaseException as exc:
            box.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=main)
    thread.start()
    return thread, box


def result(thread: threading.Thread, box: list[Any]) -> Any:
    thread.join(timeout=30)
    assert not thread.is_alive()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def value_of(pk: int) -> int:
    return int(CCounter.objects.cache().get(pk=pk).value)


def counter_selects(sql: str) -> bool:
    return sql.lstrip().upper().startswith("SELECT") and "testapp_ccounter" in sql


@pytest.fixture
def counter() -> CCounter:
    row: CCounter = CCounter.objects.create(name="c", value=1)
    connections.close_all()
    return row


def test_a_fill_read_before_a_commit_and_stored_after_it_is_rejected(counter: CCounter) -> None:
    queried, proceed = threading.Event(), threading.Event()

    def hold_after_query(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if counter_selects(sql):
            queried.set()
            assert proceed.wait(10)
        return result

    def reader() -> tuple[int, list[str]]:
        with (
            fresh_context(),
            observe() as seen,
            connections["default"].execute_wrapper(hold_after_query),
            connections["default_replica"].execute_wrapper(hold_after_query),
        ):
            return value_of(counter.pk), seen.reasons

    thread, box = run_in_thread(reader)
    assert queried.wait(10)
    CCounter.objects.filter(pk=counter.pk).update(value=2)  # commits and bumps meanwhile
    # The bump is sent without waiting; Redis serves its connections in no fixed order, so
    # the fill (another connection) could otherwise run first and store an entry the bump
    # then outdates at once (never served: its versions no longer match). Here the bump
    # has been applied, as it has for whoever holds the writer's token.
    assert invalidation.confirm()
    proceed.set()
    old_value, reasons = result(thread, box)
    assert old_value == 1  # it started before the write: the old value is fine to return...
    assert reasons == ["rejected"]  # ...but not to store
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 2
    assert seen.reasons == ["miss"]


def test_repeatable_read_snapshot_older_than_a_commit_is_not_stored(counter: CCounter) -> None:
    snapshot_taken, written = threading.Event(), threading.Event()

    def reader() -> tuple[int, list[str]]:
        with fresh_context(), transaction.atomic():
            with connections["default"].cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cursor.execute("SELECT 1")  # the snapshot is taken here
            snapshot_taken.set()
            assert written.wait(10)
            with observe() as seen:
                return value_of(counter.pk), seen.reasons

    thread, box = run_in_thread(reader)
    assert snapshot_taken.wait(10)
    CCounter.objects.filter(pk=counter.pk).update(value=2)
    written.set()
    value, reasons = result(thread, box)
    assert value == 1  # the snapshot predates the write
    assert reasons == ["bypass:snapshot isolation: the snapshot may predate the header"]
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 2
    assert seen.reasons == ["miss"]


def test_a_fill_never_comes_from_a_replica_behind_the_last_invalidation(
    counter: CCounter, services: Services, paused: Callable[[Any], Any]
) -> None:
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    with fresh_context(), QueryCounter(["default", "default_replica"]) as q:
        assert value_of(counter.pk) == 1
    assert q.counts["default_replica"] == 1 and q.counts["default"] == 0  # a replica fill
    paused(services.pg1_replica)
    CCounter.objects.filter(pk=counter.pk).update(value=2)
    replicas.monitor.refresh()
    with fresh_context():
        assert replicas.read_alias("default") == "default_replica"  # routing still says replica
    stale = services.pg1_replica.execute(
        "SELECT value FROM testapp_ccounter WHERE id = %s", (counter.pk,), dbname="dbscale"
    )
    assert stale == [(1,)]  # the replica really is behind
    with fresh_context(), observe() as seen, QueryCounter(["default", "default_replica"]) as q:
        assert value_of(counter.pk) == 2
    assert seen.reasons == ["miss"]
    # The fill on the primary, then the primary's WAL position: the floor its hits raise.
    assert q.counts == {"default": 2, "default_replica": 0}
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 2
    assert seen.reasons == ["hit"]
    services.pg1_replica.resume_replay()
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 2
    assert seen.reasons == ["hit"]
    # Nothing stale left in Redis: every stored payload holds the new value.
    stored = [pickle.loads(redis().get(key))[1] for key in entry_keys()]  # (floor, rows)
    assert stored and all(rows[0].value == 2 for rows in stored), stored


def test_readers_racing_writers_never_see_a_value_older_than_the_last_commit(
    counter: CCounter,
) -> None:
    duration = 3.0
    deadline = time.monotonic() + duration
    lock = threading.Lock()
    committed: list[tuple[float, int]] = [(0.0, 1)]
    observations: list[tuple[float, int]] = []
    hits = [0]

    def writer() -> int:
        value = 1
        rng = random.Random(7)
        with fresh_context():
            while time.monotonic() < deadline:
                value += 1
                how = rng.randrange(3)
                if how == 0:
                    CCounter.objects.filter(pk=counter.pk).update(value=value)
                elif how == 1:
                    with transaction.atomic():
                        row = CCounter.objects.select_for_update().get(pk=counter.pk)
                        row.value = value
                        row.save()
                else:
                    row = CCounter.objects.get(pk=counter.pk)
                    row.value = value
                    row.save(update_fields=["value"])
                with lock:
                    committed.append((time.monotonic(), value))
                time.sleep(rng.uniform(0.001, 0.02))
        return value

    def reader() -> int:
        count = 0
        while time.monotonic() < deadline:
            with fresh_context(), observe() as seen:
                started = time.monotonic()
                value = value_of(counter.pk)
            with lock:
                observations.append((started, value))
                hits[0] += seen.hits
            count += 1
        return count

    threads = [run_in_thread(writer)] + [run_in_thread(reader) for _ in range(3)]
    for thread, box in threads:
        result(thread, box)
    assert len(observations) > 100
    assert hits[0] > 10  # the cache did serve reads
    committed.sort()
    for started, value in observations:
        floor = max(v for t, v in committed if t <= started)
        assert value >= floor, (started, value, floor)


def test_concurrent_misses_of_one_key_run_one_query(counter: CCounter) -> None:
    workers = 6
    barrier = threading.Barrier(workers)
    selects: list[int] = []
    lock = threading.Lock()

    def slow_select(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if counter_selects(sql):
            with lock:
                selects.append(1)
            time.sleep(0.15)
        return result

    def reader() -> int:
        with (
            fresh_context(),
            connections["default"].execute_wrapper(slow_select),
            connections["default_replica"].execute_wrapper(slow_select),
        ):
            barrier.wait()
            return value_of(counter.pk)

    threads = [run_in_thread(reader) for _ in range(workers)]
    assert [result(t, b) for t, b in threads] == [1] * workers
    assert len(selects) == 1


# -- manual transactions and commit ordering ----------------------------------------------------


def prime(pk: int) -> None:
    with fresh_context():
        value_of(pk)
    with fresh_context(), observe() as seen:
        value_of(pk)
    assert seen.reasons == ["hit"]


def test_on_commit_callbacks_registered_before_the_write_read_fresh_data(
    counter: CCounter,
) -> None:
    prime(counter.pk)
    seen: list[int] = []
    with transaction.atomic():
        transaction.on_commit(lambda: seen.append(value_of(counter.pk)))
        CCounter.objects.filter(pk=counter.pk).update(value=2)
    assert seen == [2]


def test_a_manual_transaction_neither_serves_nor_leaks_uncommitted_rows(
    counter: CCounter,
) -> None:
    prime(counter.pk)
    conn = connections["default"]
    conn.set_autocommit(False)
    try:
        CCounter.objects.filter(pk=counter.pk).update(value=666)
        with observe() as seen:
            assert value_of(counter.pk) == 666  # its own write, from the database
        assert seen.reasons == ["bypass:table written in this transaction"]

        def other_reader() -> tuple[int, list[str]]:
            with fresh_context(), observe() as other:
                return value_of(counter.pk), other.reasons

        # Nothing was bumped before COMMIT: other readers keep hitting the committed value.
        assert result(*run_in_thread(other_reader)) == (1, ["hit"])
        conn.rollback()
    finally:
        conn.set_autocommit(True)
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 1
    assert seen.reasons == ["hit"]  # the rollback bumped nothing either


def test_a_manual_transaction_invalidates_right_after_commit(counter: CCounter) -> None:
    prime(counter.pk)
    conn = connections["default"]
    conn.set_autocommit(False)
    try:
        CCounter.objects.filter(pk=counter.pk).update(value=2)
        conn.commit()
        assert conn.get_autocommit() is False
        with fresh_context(), observe() as seen:
            assert value_of(counter.pk) == 2
        assert seen.reasons == ["miss"]  # bumped at COMMIT, refilled (read committed)
        conn.commit()
    finally:
        conn.set_autocommit(True)
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 2
    assert seen.reasons == ["hit"]


def test_a_manual_repeatable_read_transaction_does_not_store_its_snapshot(
    counter: CCounter,
) -> None:
    taken, written = threading.Event(), threading.Event()

    def reader() -> tuple[int, list[str]]:
        conn = connections["default"]
        with fresh_context():
            conn.set_autocommit(False)
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    cursor.execute("SELECT 1")
                taken.set()
                assert written.wait(10)
                with observe() as seen:
                    return value_of(counter.pk), seen.reasons
            finally:
                conn.rollback()
                conn.set_autocommit(True)

    thread, box = run_in_thread(reader)
    assert taken.wait(10)
    CCounter.objects.filter(pk=counter.pk).update(value=2)
    written.set()
    value, reasons = result(thread, box)
    assert value == 1
    assert reasons == ["bypass:snapshot isolation: the snapshot may predate the header"]
    with fresh_context():
        assert value_of(counter.pk) == 2


def test_a_connection_configured_for_repeatable_read_bypasses_inside_transactions(
    counter: CCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    prime(counter.pk)
    conn = connections["default"]
    conn.ensure_connection()
    monkeypatch.setattr(conn, "isolation_level", 3, raising=False)  # OPTIONS isolation_level
    with fresh_context(), transaction.atomic(), observe() as seen:
        assert value_of(counter.pk) == 1
    assert seen.reasons == ["bypass:repeatable read transaction"]
    with fresh_context(), observe() as seen:
        assert value_of(counter.pk) == 1
    assert seen.reasons == ["hit"]  # outside a transaction the snapshot is per statement


@cached_queryset(depends_on=[CCounter])
def _raw_values() -> list[int]:
    return [c.value for c in CCounter.objects.raw("SELECT id, name, value FROM testapp_ccounter")]


@cached_queryset(depends_on=[CCounter])
def _replica_cursor_values() -> list[int]:
    with connections["default_replica"].cursor() as cursor:
        cursor.execute("SELECT value FROM testapp_ccounter ORDER BY id")
        return [row[0] for row in cursor.fetchall()]


@pytest.fixture
def updated_behind_replay(
    counter: CCounter, services: Services, paused: Callable[[Any], Any]
) -> CCounter:
    """The counter updated to 2 on the primary while the replica's replay is paused at 1."""
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    paused(services.pg1_replica)
    CCounter.objects.filter(pk=counter.pk).update(value=2)
    replicas.monitor.refresh()
    return counter


def test_a_raw_read_in_a_fill_is_routed_past_a_lagging_replica(
    updated_behind_replay: CCounter,
) -> None:
    with fresh_context(), observe() as seen, QueryCounter(["default", "default_replica"]) as q:
        assert _raw_values() == [2]  # raw() asks the router, which knows the fill's floor
    assert seen.reasons == ["miss"]
    assert q.counts["default_replica"] == 0
    assert replicas.route_counts[("default", "cache_fill")] == 1


def test_a_cursor_read_from_a_lagging_replica_is_never_stored(
    updated_behind_replay: CCounter, services: Services
) -> None:
    with fresh_context(), observe() as seen:
        assert _replica_cursor_values() == [1]  # the cursor names the replica itself...
    assert seen.reasons == [
        "bypass:read from replica 'default_replica', behind the last invalidation"
    ]  # ...so the result is served but not stored
    services.pg1_replica.resume_replay()
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    with fresh_context():
        assert _replica_cursor_values() == [2]

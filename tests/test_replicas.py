"""Read/write splitting against a real primary and a real streaming replica (pg1/pg1_replica).

Every test states where a read went (``_state.db``) and checks with direct SQL on the
servers what each one holds, so a read that "passes" by accident from the wrong database
fails.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections, transaction
from django.test import AsyncClient, Client, override_settings
from django.test.utils import CaptureQueriesContext

from django_dbscale import (
    InvalidConsistencyToken,
    consistency,
    consistency_context,
    consistency_token,
    read_at_least,
    replicas,
    use_database,
    use_primary,
    use_replica,
)
from django_dbscale.consistency import format_lsn, insert_position
from django_dbscale.testing.harness import Services
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def on_server(services: Services, alias: str, pk: int) -> list[tuple[Any, ...]]:
    """Return the ``testapp_note`` row *pk* as stored on the server behind *alias*."""
    return services.alias_server(alias).execute(
        "SELECT id, title FROM testapp_note WHERE id = %s",
        (pk,),
        dbname=services.alias_dbname(alias),
    )


def read(pk: int) -> Note | None:
    return Note.objects.filter(pk=pk).first()


def create_in_thread(title: str) -> None:
    """Write from another thread (its own connection and context), then close up."""
    try:
        Note.objects.create(title=title)
    finally:
        connections.close_all()


def primed() -> None:
    replicas.monitor.refresh()
    status = replicas.monitor.status("default_replica")
    assert status.usable(time.monotonic()), status


@pytest.fixture
def quiet_prober() -> Iterator[None]:
    """Let the probing thread run one round per 30 s, so the test's query sees a fault first.

    The monitor probes continuously, so without this a failure may be noticed by a probe
    (the read then goes to the primary as "down") before the query under test hits it.
    """
    with override_settings(DBSCALE={**settings.DBSCALE, "REPLICA_CHECK_INTERVAL": 30.0}):
        yield


def test_reads_go_to_the_replica_and_writes_to_the_primary(services: Services) -> None:
    with consistency_context():
        note = Note.objects.create(title="replicated")
    services.pg1_replica.wait_for_replay()
    assert on_server(services, "default_replica", note.pk) == [(note.pk, "replicated")]
    primed()
    with consistency_context():
        got = read(note.pk)
    assert got is not None and got.title == "replicated"
    assert got._state.db == "default_replica"
    assert replicas.route_counts[("default_replica", "replica")] == 1


def test_own_write_is_read_from_primary_while_replica_lags(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)
    note = Note.objects.create(title="mine")
    # The replica really does not have it: a read there would be stale.
    assert on_server(services, "default_replica", note.pk) == []
    got = read(note.pk)
    assert got is not None and got.title == "mine" and got._state.db == "default"
    assert replicas.route_counts[("default", "read_your_writes")] == 1
    # Another context, without the position, still reads the replica (within budget).
    with consistency_context():
        assert read(note.pk) is None
    assert replicas.route_counts[("default_replica", "replica")] == 1


def test_own_write_is_read_from_replica_once_it_has_replayed(services: Services) -> None:
    primed()
    note = Note.objects.create(title="caught up")
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    got = read(note.pk)
    assert got is not None and got._state.db == "default_replica"


def test_update_without_signals_is_a_tracked_write(services: Services, paused: Any) -> None:
    note = Note.objects.create(title="before")
    services.pg1_replica.wait_for_replay()
    primed()
    with consistency_context():
        paused(services.pg1_replica)
        Note.objects.filter(pk=note.pk).update(title="after")
        got = read(note.pk)
    assert got is not None and (got.title, got._state.db) == ("after", "default")
    assert on_server(services, "default_replica", note.pk) == [(note.pk, "before")]


def test_token_carries_own_writes_to_another_thread(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)
    note = Note.objects.create(title="for the task")
    token = consistency_token()
    results: dict[str, Any] = {}

    def task(name: str, tok: str | None) -> None:
        try:
            with read_at_least(tok):
                qs = Note.objects.filter(pk=note.pk)
                got = qs.first()
                results[name] = (got.title if got else None, qs.db)
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=task, args=("with_token", token)),
        threading.Thread(target=task, args=("without_token", None)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["with_token"] == ("for the task", "default")
    assert results["without_token"] == (None, "default_replica")


def test_read_at_least_primary_mode_reads_primary(services: Services) -> None:
    primed()
    with consistency_context():
        token = consistency_token()
    with read_at_least(token, mode="primary"):
        Note.objects.create(title="x")
        assert Note.objects.all().first()._state.db == "default"  # type: ignore[union-attr]


def test_read_at_least_wait_mode_waits_for_the_replica(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)
    note = Note.objects.create(title="waited")
    token = consistency_token()
    timer = threading.Timer(0.5, services.pg1_replica.resume_replay)
    timer.start()
    try:
        with consistency_context(), read_at_least(token, mode="wait", timeout=10):
            started = time.monotonic()
            got = read(note.pk)
            waited = time.monotonic() - started
    finally:
        timer.join()
    assert got is not None and (got.title, got._state.db) == ("waited", "default_replica")
    assert 0.3 < waited < 10


def test_lag_beyond_budget_stops_replica_reads_until_resumed(
    services: Services, paused: Any
) -> None:
    with override_settings(
        DBSCALE={**settings.DBSCALE, "MAX_REPLICA_LAG": 0.5, "MAX_REPLICA_LAG_BYTES": 64 * 1024}
    ):
        primed()
        paused(services.pg1_replica)
        # The primary keeps writing: over 64 KiB of WAL and more than 0.5 s of lag.
        for i in range(20):
            Note.objects.create(title=f"bulk {i}", body=os.urandom(4000).hex())
        time.sleep(0.6)
        replicas.monitor.refresh()
        status = replicas.monitor.status("default_replica")
        assert status.lag_bytes is not None and status.lag_bytes > 64 * 1024
        with consistency_context():
            assert Note.objects.order_by("pk").first()._state.db == "default"  # type: ignore[union-attr]
        assert replicas.route_counts[("default", "lagging")] == 1

        services.pg1_replica.resume_replay()
        services.pg1_replica.wait_for_replay()
        replicas.monitor.refresh()
        with consistency_context():
            first = Note.objects.order_by("pk").first()
        assert first is not None and first._state.db == "default_replica"


def test_stopped_replica_costs_no_error_and_is_readmitted(
    services: Services, quiet_prober: None
) -> None:
    note = Note.objects.create(title="durable")
    services.pg1_replica.wait_for_replay()
    primed()
    with consistency_context():
        assert read(note.pk)._state.db == "default_replica"  # type: ignore[union-attr]
    services.pg1_replica.stop()
    try:
        # Mid-traffic: the open replica connection is now dead. The read in flight is
        # re-run on the primary (its instance keeps the alias the router chose).
        with consistency_context():
            got = read(note.pk)
        assert got is not None and got.title == "durable"
        assert replicas.route_counts[("default", "failover")] == 1
        served_by = set()
        for _ in range(20):  # later reads are routed to the primary straight away
            with consistency_context():
                got = read(note.pk)
            assert got is not None and got.title == "durable"
            served_by.add(got._state.db)
        assert served_by == {"default"}
        assert replicas.monitor.status("default_replica").healthy is False
    finally:
        services.pg1_replica.start()
    services.pg1_replica.wait_for_replay()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        replicas.monitor.refresh()
        if replicas.monitor.status("default_replica").usable(time.monotonic()):
            break
        time.sleep(0.2)
    with consistency_context():
        assert read(note.pk)._state.db == "default_replica"  # type: ignore[union-attr]


def test_cut_network_to_replica_fails_over_mid_query(
    services: Services, quiet_prober: None
) -> None:
    note = Note.objects.create(title="cut")
    services.pg1_replica.wait_for_replay()
    primed()
    with consistency_context():
        assert read(note.pk)._state.db == "default_replica"  # type: ignore[union-attr]
    with services.proxies["pg1_replica"].cut_off():
        with consistency_context():
            got = read(note.pk)
        assert got is not None and got.title == "cut"
        assert replicas.route_counts[("default", "failover")] == 1
        for _ in range(5):
            with consistency_context():
                got = read(note.pk)
            assert got is not None and (got.title, got._state.db) == ("cut", "default")
    assert replicas.monitor.status("default_replica").failures >= 1


def test_reads_inside_atomic_see_uncommitted_rows(services: Services) -> None:
    primed()
    with transaction.atomic():
        note = Note.objects.create(title="uncommitted")
        got = read(note.pk)
        assert got is not None and got._state.db == "default"
    assert replicas.route_counts[("default", "in_transaction")] == 1


def test_monotonic_reads_stick_to_one_replica_then_primary(services: Services, paused: Any) -> None:
    primed()
    state = consistency.current_state()
    list(Note.objects.all())
    assert state.pinned == {"default": "default_replica"}
    with transaction.atomic():
        list(Note.objects.all())
    # Having read the primary, the context never goes back to an older replica...
    assert state.pinned == {"default": "default"}
    assert Note.objects.all().db == "default"
    # ...but returns to one that has replayed what the primary had when last read.
    paused(services.pg1_replica)
    other = threading.Thread(target=create_in_thread, args=("later",))
    other.start()
    other.join()
    replicas.monitor.refresh()
    assert Note.objects.all().db == "default"  # replica paused: behind the primary
    services.pg1_replica.resume_replay()
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    assert Note.objects.all().db == "default_replica"
    assert state.pinned == {"default": "default_replica"}


def test_use_primary_and_use_replica_nest(services: Services) -> None:
    primed()
    with use_primary():
        assert Note.objects.all().db == "default"
        with use_replica():
            assert Note.objects.all().db == "default_replica"
            with use_database("default"):
                assert Note.objects.all().db == "default"
            assert Note.objects.all().db == "default_replica"
        assert Note.objects.all().db == "default"


def test_use_primary_decorates_sync_and_async_functions(services: Services) -> None:
    primed()

    @use_primary()
    def sync_read() -> str:
        return Note.objects.all().db

    @use_primary()
    async def async_read() -> str:
        return await sync_to_async(lambda: Note.objects.all().db)()

    with consistency_context():
        assert sync_read() == "default"
        assert asyncio.run(async_read()) == "default"
        # Having seen the primary, the context stays there until a probe shows a replica
        # holding everything the primary had then (nothing was written: the next probe).
        assert Note.objects.all().db == "default"
        replicas.monitor.refresh()
        assert Note.objects.all().db == "default_replica"


def test_use_database_rejects_unknown_alias() -> None:
    with pytest.raises(ValueError, match="'nope'.*DATABASES"):
        use_database("nope")


def test_middleware_carries_position_across_requests(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)
    client = Client()
    response = client.post("/notes/", {"title": "form"})
    pk = response.json()["id"]
    assert "dbscale_pos" in response.cookies
    assert response.headers["X-DBScale-Position"] == response.cookies["dbscale_pos"].value
    # Next page, same browser: reads its write from the primary.
    assert client.get(f"/notes/{pk}/").json() == {"title": "form", "db": "default"}
    # API client with the header instead of a cookie.
    api = Client(headers={"X-DBScale-Position": response.headers["X-DBScale-Position"]})
    assert api.get(f"/notes/{pk}/").json() == {"title": "form", "db": "default"}
    # Another user, no position: the replica, which lacks the row.
    assert Client().get(f"/notes/{pk}/").json() == {"title": None, "db": None}


def test_forged_or_malformed_cookie_is_ignored(services: Services) -> None:
    note = Note.objects.create(title="public")
    services.pg1_replica.wait_for_replay()
    primed()
    for bad in ["garbage", consistency_token()[:-3] + "abc", "a:b:c", ""]:
        client = Client()
        client.cookies["dbscale_pos"] = bad
        response = client.get(f"/notes/{note.pk}/", headers={"X-DBScale-Position": bad})
        assert response.status_code == 200
        assert response.json() == {"title": "public", "db": "default_replica"}


def test_token_for_unknown_primary_is_rejected_with_clear_error() -> None:
    from django.core import signing

    forged = signing.dumps(
        {"p": {"mars": "0/1"}, "t": {}}, salt=consistency.TOKEN_SALT, compress=True
    )
    with pytest.raises(InvalidConsistencyToken, match="'mars'.*not in DATABASES"):
        read_at_least(forged)
    with pytest.raises(InvalidConsistencyToken, match="signature"):
        read_at_least(forged + "x")
    with pytest.raises(ValueError, match="mode='soon'"):
        read_at_least(None, mode="soon")  # type: ignore[arg-type]


def test_async_view_reads_its_own_write(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)

    async def scenario() -> tuple[Any, Any]:
        client = AsyncClient()
        created = await client.get("/async/notes/", {"title": "async"})
        pk_title = created.json()
        return pk_title, created

    body, response = asyncio.run(scenario())
    assert body == {"title": "async", "db": "default"}
    assert "dbscale_pos" in response.cookies


def test_contexts_do_not_leak_between_concurrent_tasks(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)
    seen: dict[str, str] = {}

    async def writer() -> None:
        with consistency_context():
            await Note.objects.acreate(title="w")
            await asyncio.sleep(0.05)
            seen["writer"] = await sync_to_async(lambda: Note.objects.all().db)()

    async def reader() -> None:
        with consistency_context():
            await asyncio.sleep(0.02)
            seen["reader"] = await sync_to_async(lambda: Note.objects.all().db)()

    async def main() -> None:
        await asyncio.gather(writer(), reader())

    asyncio.run(main())
    assert seen == {"writer": "default", "reader": "default_replica"}


def test_time_based_stickiness_fallback(services: Services) -> None:
    with override_settings(
        DBSCALE={**settings.DBSCALE, "READ_YOUR_WRITES": "time", "STICKY_SECONDS": 0.5}
    ):
        primed()
        Note.objects.create(title="t")
        assert Note.objects.all().db == "default"
    with (
        consistency_context(),
        override_settings(
            DBSCALE={**settings.DBSCALE, "READ_YOUR_WRITES": "time", "STICKY_SECONDS": 0.3}
        ),
    ):
        primed()
        Note.objects.create(title="t2")
        time.sleep(0.35)
        assert Note.objects.all().db == "default_replica"


def test_a_replica_read_costs_exactly_one_statement(services: Services) -> None:
    note = Note.objects.create(title="counted")
    services.pg1_replica.wait_for_replay()
    primed()
    with consistency_context():
        read(note.pk)  # connect and pin
        with (
            CaptureQueriesContext(connections["default_replica"]) as on_replica,
            CaptureQueriesContext(connections["default"]) as on_primary,
        ):
            for _ in range(50):
                read(note.pk)
    assert len(on_replica.captured_queries) == 50
    assert len(on_primary.captured_queries) == 0


def test_write_costs_at_most_one_lsn_query_per_transaction(services: Services) -> None:
    primed()
    with CaptureQueriesContext(connections["default"]) as q:
        with transaction.atomic():
            for i in range(5):
                Note.objects.create(title=f"n{i}")
        read_pk: Callable[[], Any] = lambda: list(Note.objects.all())  # noqa: E731
        read_pk()
        read_pk()
    lsn_queries = [x for x in q.captured_queries if "pg_current_wal_insert_lsn" in x["sql"]]
    assert len(lsn_queries) == 1


def test_router_contract_for_relations_and_migrations() -> None:
    from django.db import router

    on_primary, on_replica = Note(title="a"), Note(title="b")
    on_primary._state.db, on_replica._state.db = "default", "default_replica"
    assert router.allow_relation(on_primary, on_replica) is True
    assert router.allow_migrate("default_replica", "testapp", model_name="note") is False
    assert router.allow_migrate("default", "testapp", model_name="note") is True
    # A write through an instance read from a replica goes to its primary.
    assert router.db_for_write(Note, instance=on_replica) == "default"


def test_reads_spread_over_replicas_by_weight(services: Services) -> None:
    weighted = {
        **settings.DBSCALE["REPLICAS"],
        "default": [
            {"ALIAS": "default_replica", "WEIGHT": 3},
            {"ALIAS": "default_replica_direct", "WEIGHT": 1},
        ],
    }
    with override_settings(DBSCALE={**settings.DBSCALE, "REPLICAS": weighted}):
        replicas.monitor.refresh()
        chosen = []
        for _ in range(800):
            with consistency_context():
                chosen.append(Note.objects.all().db)
                # Pinned: the same context keeps its replica.
                assert Note.objects.all().db == chosen[-1]
    share = chosen.count("default_replica") / len(chosen)
    assert set(chosen) == {"default_replica", "default_replica_direct"}
    assert 0.68 < share < 0.82, share


def test_round_robin_alternates_between_replicas(services: Services) -> None:
    two = {**settings.DBSCALE["REPLICAS"], "default": ["default_replica", "default_replica_direct"]}
    with override_settings(
        DBSCALE={**settings.DBSCALE, "REPLICAS": two, "REPLICA_SELECTION": "round_robin"}
    ):
        replicas.monitor.refresh()
        chosen = []
        for _ in range(6):
            with consistency_context():
                chosen.append(Note.objects.all().db)
    assert chosen[0::2] == [chosen[0]] * 3 and chosen[1::2] == [chosen[1]] * 3
    assert chosen[0] != chosen[1]


def test_disconnected_wal_receiver_counts_as_lagging(services: Services) -> None:
    replica = services.pg1_replica
    (conninfo,) = replica.execute("SHOW primary_conninfo")[0]
    primed()
    replica.execute("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'")
    replica.execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 15
        while replica.execute(
            "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        )[0][0]:
            assert time.monotonic() < deadline, "the WAL receiver did not disconnect"
            time.sleep(0.1)
        replicas.monitor.refresh()
        status = replicas.monitor.status("default_replica")
        assert status.healthy and not status.receiver_streaming
        with consistency_context():
            assert Note.objects.all().db == "default"
        assert replicas.route_counts[("default", "lagging")] == 1
    finally:
        # pg_basebackup -R wrote the original into postgresql.auto.conf: put it back.
        replica.execute(
            f"ALTER SYSTEM SET primary_conninfo = '{conninfo.replace(chr(39), chr(39) * 2)}'"
        )
        replica.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 15
    while not replicas.monitor.status("default_replica").usable(time.monotonic()):
        assert time.monotonic() < deadline, "the WAL receiver did not reconnect"
        time.sleep(0.2)
        replicas.monitor.refresh()


def test_status_command_reports_health_and_lag(services: Services, paused: Any) -> None:
    import io
    import json

    from django.core.management import call_command

    buffer = io.StringIO()
    call_command("dbscale", "status", "--json", stdout=buffer)
    report = json.loads(buffer.getvalue())
    assert set(report) == {
        "primaries",
        "routes",
        "cache",
        "cache_continuity",
        "shard_groups",
        "budget",
    }
    rows = {row["primary"]: row for row in report["primaries"]}
    assert set(rows) == {"default", "shard0", "shard1", "shard2"}
    default = rows["default"]
    assert default["reads_go_to"] == "default_replica"
    (replica,) = default["replicas"]
    assert replica["alias"] == "default_replica" and replica["eligible"] is True
    assert replica["lag_bytes"] is not None and replica["lag_seconds"] is not None
    with services.proxies["pg1_replica"].cut_off():
        replicas.monitor.reset()
        buffer = io.StringIO()
        call_command("dbscale", "status", stdout=buffer)
    text = buffer.getvalue()
    assert "primary default: reads go to default" in text
    assert "default_replica" in text and "DOWN" in text


def test_blackholed_replica_probe_is_bounded_and_marks_it_down(services: Services) -> None:
    primed()
    with services.proxies["pg1_replica"].blackholed():
        started = time.monotonic()
        replicas.monitor.refresh()  # the open probe connection now hangs
        elapsed = time.monotonic() - started
        status = replicas.monitor.status("default_replica")
        assert not status.usable(time.monotonic())
        assert "timed out" in status.last_error or "probe failed" in status.last_error
        started = time.monotonic()
        replicas.monitor.refresh()  # the hung probe still holds its connection: fail fast
        second = time.monotonic() - started
    limit = settings.DBSCALE.get("REPLICA_PROBE_TIMEOUT", 0.5) * 4 + 1.5
    assert elapsed < limit and second < limit, (elapsed, second)
    with consistency_context():
        assert Note.objects.all().db == "default"


# -- read-your-writes against a pinned replica, and every write path ------------------------


def test_write_after_reading_a_replica_is_read_back_from_the_primary(
    services: Services, paused: Any
) -> None:
    """The usual web flow: read (pins the replica), write, read again."""
    note = Note.objects.create(title="v1")
    services.pg1_replica.wait_for_replay()
    with consistency_context():
        primed()
        assert read(note.pk)._state.db == "default_replica"  # type: ignore[union-attr]
        paused(services.pg1_replica)
        Note.objects.filter(pk=note.pk).update(title="v2")
        got = read(note.pk)
    assert got is not None and (got.title, got._state.db) == ("v2", "default")


def _write_paths() -> dict[str, Callable[[], None]]:
    from django.db import connection
    from psycopg import sql as pgsql

    def executemany() -> None:
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO testapp_note (title, body) VALUES (%s, '')", [("w",), ("w",)]
            )

    def copy() -> None:
        with (
            connection.cursor() as cursor,
            cursor.copy("COPY testapp_note (title, body) FROM STDIN") as cp,
        ):
            cp.write_row(("w", ""))

    def multi_statement() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1; INSERT INTO testapp_note (title, body) VALUES ('w', '')")

    def writing_cte() -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "WITH n AS (INSERT INTO testapp_note (title, body) VALUES ('w', '') "
                "RETURNING id) SELECT id FROM n"
            )

    def composed() -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                pgsql.SQL("INSERT INTO {} (title, body) VALUES ('w', '')").format(
                    pgsql.Identifier("testapp_note")
                )
            )

    def manual_transaction() -> None:
        from django.db import transaction as tx

        tx.set_autocommit(False)
        try:
            Note.objects.create(title="w")
            tx.commit()
        finally:
            tx.set_autocommit(True)

    return {
        "executemany": executemany,
        "copy": copy,
        "multi_statement": multi_statement,
        "writing_cte": writing_cte,
        "composed": composed,
        "manual_transaction": manual_transaction,
        "bulk_create": lambda: Note.objects.bulk_create([Note(title="w")]) and None,
    }


@pytest.mark.parametrize("path", sorted(_write_paths()))
def test_every_write_path_is_read_back_from_the_primary(
    services: Services, paused: Any, path: str
) -> None:
    primed()
    paused(services.pg1_replica)
    with consistency_context():
        _write_paths()[path]()
        qs = Note.objects.filter(title="w")
        rows = len(qs)
        assert qs.db == "default", path
    assert rows >= 1
    # The replica really lacks them: reading it would have been stale.
    assert services.pg1_replica.execute(
        "SELECT count(*) FROM testapp_note WHERE title = 'w'", dbname="dbscale"
    ) == [(0,)]


def test_queryset_delete_is_read_back_from_the_primary(services: Services, paused: Any) -> None:
    note = Note.objects.create(title="doomed")
    services.pg1_replica.wait_for_replay()
    primed()
    paused(services.pg1_replica)
    with consistency_context():
        Note.objects.filter(pk=note.pk).delete()
        qs = Note.objects.filter(pk=note.pk)
        assert (qs.first(), qs.db) == (None, "default")
    assert on_server(services, "default_replica", note.pk) == [(note.pk, "doomed")]


def test_reads_on_a_replica_are_never_taken_for_writes(services: Services) -> None:
    primed()
    with consistency_context() as state:
        with use_database("default_replica"), connections["default_replica"].cursor() as cursor:
            cursor.execute("WITH x AS (SELECT 1 AS a) SELECT a FROM x")
            cursor.execute("/* comment */ SELECT 1")
        assert not state.wrote and not state.pending
        token = consistency_token()
    assert replicas.monitor.status("default_replica").usable(time.monotonic())
    assert replicas.route_counts[("default", "failover")] == 0
    assert decode(token).positions == {}


def decode(token: str) -> Any:
    return consistency.decode_token(token)


def test_set_autocommit_false_transaction_reads_its_own_rows(services: Services) -> None:
    from django.db import transaction as tx

    primed()
    tx.set_autocommit(False)
    try:
        note = Note.objects.create(title="uncommitted manual")
        got = read(note.pk)
        assert got is not None and got._state.db == "default"
        tx.rollback()
    finally:
        tx.set_autocommit(True)
    assert replicas.route_counts[("default", "in_transaction")] == 1


def test_failed_position_fetch_keeps_the_write_pending(services: Services, paused: Any) -> None:
    primed()
    paused(services.pg1_replica)
    # Without the cache: its invalidation of the raw INSERT would fetch the position itself.
    no_cache = {k: v for k, v in settings.DBSCALE.items() if k != "CACHE"}
    with override_settings(DBSCALE=no_cache), consistency_context() as state:
        with connections["default"].cursor() as cursor:  # raw SQL: only the backend sees it
            cursor.execute(
                "INSERT INTO testapp_note (title, body) VALUES ('pending', '') RETURNING id"
            )
            (pk,) = cursor.fetchone()
        note = Note(pk=pk)
        assert state.pending == {"default"}
        # Kill this connection's backend: the position fetch fails.
        pid = connections["default"].connection.info.backend_pid
        services.pg1.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(Exception):  # noqa: B017 - whatever psycopg raises for a killed backend
            read(note.pk)
        assert state.pending == {"default"}
        connections["default"].close()
        got = read(note.pk)
    assert got is not None and (got.title, got._state.db) == ("pending", "default")


# -- failover safety ------------------------------------------------------------------------


def test_failover_pins_the_context_to_the_primary(services: Services, paused: Any) -> None:
    note = Note.objects.create(title="before cut")
    services.pg1_replica.wait_for_replay()
    primed()
    with consistency_context() as state:
        assert read(note.pk)._state.db == "default_replica"  # type: ignore[union-attr]
        paused(services.pg1_replica)
        writer = threading.Thread(target=create_in_thread, args=("after cut",))
        writer.start()
        writer.join()
        with services.proxies["pg1_replica"].cut_off():
            assert Note.objects.filter(title="after cut").count() == 1  # failed over
        assert state.pinned["default"] == "default"
        time.sleep(0.3)  # quarantine over; the replica is healthy again but behind
        replicas.monitor.refresh()
        assert Note.objects.filter(title="after cut").count() == 1
    # The cut was seen by the failing query (failover) or first by the prober (down).
    assert (
        replicas.route_counts[("default", "failover")] + replicas.route_counts[("default", "down")]
        >= 1
    )


def test_statement_timeout_on_replica_is_not_a_failover(services: Services) -> None:
    from django.db import OperationalError

    primed()
    with consistency_context(), connections["default_replica"].cursor() as cursor:
        cursor.execute("SET statement_timeout = 50")
        try:
            with pytest.raises(OperationalError, match="statement timeout"):
                cursor.execute("SELECT pg_sleep(1)")
        finally:
            cursor.execute("SET statement_timeout = 0")
    assert replicas.route_counts[("default", "failover")] == 0
    assert replicas.monitor.status("default_replica").usable(time.monotonic())


def test_no_failover_inside_a_transaction_on_the_replica(services: Services) -> None:
    from django.db import OperationalError

    primed()
    with pytest.raises(OperationalError), transaction.atomic(using="default_replica"):
        list(Note.objects.using("default_replica").all())
        services.proxies["pg1_replica"].cut()
        try:
            list(Note.objects.using("default_replica").all())
        finally:
            services.proxies["pg1_replica"].heal()
    assert replicas.route_counts[("default", "failover")] == 0
    connections["default_replica"].close()


# -- controls -------------------------------------------------------------------------------


def test_read_at_least_primary_mode_forces_primary_without_writing(services: Services) -> None:
    primed()
    with consistency_context():
        token = consistency_token()
    with read_at_least(token, mode="primary"):
        assert Note.objects.all().db == "default"
    with read_at_least(token):
        assert Note.objects.all().db == "default_replica"


def test_expired_token_is_rejected(services: Services) -> None:
    with override_settings(DBSCALE={**settings.DBSCALE, "CONSISTENCY_MAX_AGE": 1}):
        token = consistency_token()
        read_at_least(token)
        time.sleep(2.1)
        with pytest.raises(InvalidConsistencyToken, match="expired"):
            read_at_least(token)


def test_token_naming_a_replica_is_rejected() -> None:
    from django.core import signing

    forged = signing.dumps(
        {"p": {"default_replica": "0/1"}, "t": {}}, salt=consistency.TOKEN_SALT, compress=True
    )
    with pytest.raises(InvalidConsistencyToken, match="replica"):
        read_at_least(forged)


def test_replica_wait_setting_waits_for_catch_up(services: Services, paused: Any) -> None:
    with override_settings(DBSCALE={**settings.DBSCALE, "REPLICA_WAIT": 10.0}):
        primed()
        paused(services.pg1_replica)
        note = Note.objects.create(title="waited for")
        timer = threading.Timer(0.4, services.pg1_replica.resume_replay)
        timer.start()
        try:
            got = read(note.pk)
        finally:
            timer.join()
    assert got is not None and got._state.db == "default_replica"


def test_use_database_applies_to_its_own_primary_only(services: Services) -> None:
    two = {**settings.DBSCALE["REPLICAS"], "default": ["default_replica", "default_replica_direct"]}
    with override_settings(DBSCALE={**settings.DBSCALE, "REPLICAS": two}):
        replicas.monitor.refresh()
        for alias in ("default_replica_direct", "default_replica", "default"):
            with consistency_context(), use_database(alias):
                assert [Note.objects.all().db for _ in range(3)] == [alias] * 3
        with (
            consistency_context(),
            use_database("default_replica_direct"),
            transaction.atomic(),
        ):
            Note.objects.create(title="in tx")
            assert Note.objects.all().db == "default"  # the transaction wins
        with consistency_context(), use_database("shard1"):
            # Another primary's alias: Note is routed as usual, to a replica of default.
            assert Note.objects.all().db in {"default_replica", "default_replica_direct"}


def test_use_primary_works_without_parentheses_and_shared(services: Services) -> None:
    primed()

    @use_primary
    def plain() -> str:
        return Note.objects.all().db

    shared = use_primary()

    async def task(delay: float) -> str:
        with shared:
            await asyncio.sleep(delay)
            return await sync_to_async(lambda: Note.objects.all().db)()

    async def both() -> list[str]:
        return list(await asyncio.gather(task(0.02), task(0.01)))

    assert plain() == "default"
    assert asyncio.run(both()) == ["default", "default"]


def test_quarantine_backs_off_exponentially() -> None:
    first, maximum = settings.DBSCALE["REPLICA_QUARANTINE"]
    backoffs = []
    for _ in range(6):
        replicas.report_failure("default_replica", "test")
        status = replicas.monitor.status("default_replica")
        backoffs.append(round(status.quarantined_until - time.monotonic(), 1))
    assert backoffs == [min(maximum, first * 2**i) for i in range(6)]


def test_implicit_context_of_a_worker_thread_returns_to_the_replica(services: Services) -> None:
    """A fresh process's first read waits for the first probe and reads the replica.

    Before start-up probing it went to the primary (reason "unknown") and pinned the
    worker's implicit context there until a later probe; now it never leaves the replica.
    """
    seen: list[str] = []

    def worker() -> None:
        try:
            replicas.monitor.reset()  # as in a fresh process: nothing probed yet
            seen.append(Note.objects.all().db)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and seen[-1] != "default_replica":
                time.sleep(0.1)
                seen.append(Note.objects.all().db)
        finally:
            connections.close_all()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == ["default_replica"], seen


def test_time_fallback_tracks_writes_on_a_foreign_engine_primary(services: Services) -> None:
    """A primary on Django's own backend: no LSNs, but time stickiness still works."""
    plain = {**settings.DBSCALE["REPLICAS"], "default_plain": ["default_replica_direct"]}
    with override_settings(
        DBSCALE={
            **settings.DBSCALE,
            "REPLICAS": plain,
            "READ_YOUR_WRITES": "time",
            "STICKY_SECONDS": 0.5,
        }
    ):
        replicas.monitor.refresh()
        connections["default_plain"].close()  # reconnect: connection_created installs tracking
        with consistency_context() as state:
            assert replicas.read_alias("default_plain") == "default_replica_direct"
        with consistency_context() as state:
            with connections["default_plain"].cursor() as cursor:
                cursor.execute("INSERT INTO testapp_note (title, body) VALUES ('plain', '')")
            assert "default_plain" in state.write_times and not state.pending
            assert replicas.read_alias("default_plain") == "default_plain"
            token = consistency_token()  # no LSN query against a primary without LSNs
        assert decode(token).positions == {}
        with consistency_context():
            time.sleep(0.55)
            assert replicas.read_alias("default_plain") == "default_replica_direct"
    connections["default_plain"].close()


def test_writes_to_a_primary_without_replicas_cost_no_position_query(services: Services) -> None:
    no_replicas = {k: v for k, v in settings.DBSCALE["REPLICAS"].items() if k != "default"}
    with override_settings(DBSCALE={**settings.DBSCALE, "REPLICAS": no_replicas}):
        with consistency_context() as state, CaptureQueriesContext(connections["default"]) as q:
            Note.objects.create(title="lonely")
            assert Note.objects.all().db == "default"
            token = consistency_token()
        assert state.wrote and not state.pending
    assert not [x for x in q.captured_queries if "pg_current_wal" in x["sql"]]
    assert decode(token).positions == {}


def test_closing_a_probe_in_use_waits_for_its_query(services: Services) -> None:
    """Closing a psycopg connection under a running query crashes the process (libpq).

    Settings changes and each test's monitor reset close probes while background probes
    may be running on them: the close must leave the connection to the running query and
    happen when it ends.
    """
    from django_dbscale.replicas.monitor import _Probe

    probe = _Probe("default_replica")
    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(probe.query("SELECT 1 FROM pg_sleep(0.3)", 2.0))
    )
    worker.start()
    time.sleep(0.1)  # the query is running
    probe.close()  # from another thread, as monitor.reset() does
    worker.join(5)
    assert result == [(1,)]
    assert probe.conn is None  # closed by the query's own thread when it ended
    with pytest.raises(RuntimeError, match="was closed"):
        probe.query("SELECT 1", 1.0)


def test_reset_while_probes_are_being_opened_raises_nothing() -> None:
    # Settings changing (reset) while the prober's threads open probes: seen in the suite
    # as "dictionary changed size during iteration" out of reset().
    import sys

    from django_dbscale.replicas import ReplicaMonitor

    monitor = ReplicaMonitor()
    stop = threading.Event()
    errors: list[BaseException] = []

    def open_probes() -> None:
        i = 0
        while not stop.is_set():
            monitor._probe(f"db{i % 5000}")
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    opener = threading.Thread(target=open_probes)
    opener.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                monitor.reset()
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        opener.join()
        sys.setswitchinterval(interval)
    assert errors == []
    monitor.reset()
    assert monitor._probes == {}


def test_an_autocommitted_update_reads_its_wal_position_in_its_own_round_trip(
    services: Services,
) -> None:
    # "UPDATE ...; COMMIT; SELECT pg_current_wal_insert_lsn()" in one message: the SELECT
    # runs after the commit record, so the position covers the write, without a second
    # round trip.
    note = Note.objects.create(title="before")
    before = insert_position(services.pg1.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])
    with consistency_context() as state, CaptureQueriesContext(connections["default"]) as q:
        Note.objects.filter(pk=note.pk).update(title="after")
        assert not state.pending  # nothing left to fetch for read-your-writes
        position = state.positions["default"]
    after = insert_position(services.pg1.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])
    assert [x["sql"].split(None, 1)[0] for x in q.captured_queries] == ["UPDATE"]
    assert before < position == after  # the UPDATE and its COMMIT record are both behind it
    services.pg1_replica.wait_for_replay(format_lsn(position))
    assert services.pg1_replica.execute(
        "SELECT title FROM testapp_note WHERE id = %s", (note.pk,), dbname="dbscale"
    ) == [("after",)]

"""The replica monitor as owned machinery, against a real primary, replicas and faults.

Measurements that are too old never admit a replica; a quarantined replica is not dialled
again on any path; a fresh process probes before its first read instead of sending it to
the primary; and one long-lived thread keeps probing, idle or not, and after a fork.
Every test checks with direct SQL which server holds the rows it read.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connections, transaction
from django.test import override_settings

from django_dbscale import consistency_context, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.testing.harness import Services
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

#: A lag budget that 20 rows of 8 KB and half a second of paused replay exceed.
TIGHT_BUDGET = {"MAX_REPLICA_LAG": 0.5, "MAX_REPLICA_LAG_BYTES": 64 * 1024}


def on_replica(services: Services, pk: int) -> list[tuple[Any, ...]]:
    """Return row *pk* as stored on the replica server itself (not through its proxy)."""
    return services.pg1_replica.execute(
        "SELECT id, title FROM testapp_note WHERE id = %s", (pk,), dbname="dbscale"
    )


def read(pk: int) -> Note | None:
    with consistency_context():  # a reader that wrote nothing: no read-your-writes
        return Note.objects.filter(pk=pk).first()


def outrun_the_budget() -> Note:
    """Write more WAL than TIGHT_BUDGET allows; return the last row."""
    notes = [Note.objects.create(title=f"bulk {i}", body=os.urandom(4000).hex()) for i in range(20)]
    return notes[-1]


def fetch_title(alias: str, pk: int) -> list[tuple[Any, ...]]:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT title FROM testapp_note WHERE id = %s", [pk])
        return list(cursor.fetchall())


@pytest.fixture
def stopped_monitor() -> Iterator[replicas.ReplicaMonitor]:
    """Stop this process's probing thread for the test (only refresh() probes)."""
    replicas.monitor.stop()
    try:
        yield replicas.monitor
    finally:
        replicas.monitor.start()


@pytest.fixture
def fresh_monitor(monkeypatch: pytest.MonkeyPatch) -> Iterator[replicas.ReplicaMonitor]:
    """A monitor as in a freshly started process: nothing probed, no thread running."""
    fresh = replicas.ReplicaMonitor()
    monkeypatch.setattr(replicas, "monitor", fresh)
    try:
        yield fresh
    finally:
        fresh.shutdown()


# -- 4: no routing on old measurements ------------------------------------------------------


def test_first_read_after_an_idle_period_does_not_trust_old_measurements(
    services: Services, paused: Any
) -> None:
    with override_settings(DBSCALE={**settings.DBSCALE, **TIGHT_BUDGET}):
        replicas.monitor.refresh()
        with consistency_context():
            assert Note.objects.all().db == "default_replica"  # measured healthy, used
        paused(services.pg1_replica)
        last = outrun_the_budget()
        time.sleep(1.0)  # idle, no reads: > REPLICA_CHECK_INTERVAL and > MAX_REPLICA_LAG
        got = read(last.pk)
    assert got is not None and (got.title, got._state.db) == ("bulk 19", "default")
    assert on_replica(services, last.pk) == []  # the replica would have served no row
    assert replicas.route_counts[("default_replica", "replica")] == 1
    assert (
        replicas.route_counts[("default", "lagging")] + replicas.route_counts[("default", "stale")]
        == 1
    )


def test_measurements_older_than_the_bound_send_reads_to_the_primary(
    services: Services, paused: Any, stopped_monitor: replicas.ReplicaMonitor
) -> None:
    """With no thread delivering, only the staleness bound keeps reads off the replica."""
    with override_settings(DBSCALE={**settings.DBSCALE, **TIGHT_BUDGET}):
        stopped_monitor.refresh()
        with consistency_context():
            assert Note.objects.all().db == "default_replica"
        paused(services.pg1_replica)
        last = outrun_the_budget()
        bound = replicas.stale_after()
        assert bound == 2 * (0.2 + 0.5)  # 2 * (REPLICA_CHECK_INTERVAL + REPLICA_PROBE_TIMEOUT)
        time.sleep(bound + 0.1)
        assert not stopped_monitor.running  # nobody probed meanwhile
        got = read(last.pk)
        assert got is not None and (got.title, got._state.db) == ("bulk 19", "default")
        assert replicas.route_counts[("default", "stale")] == 1
        assert on_replica(services, last.pk) == []
        stopped_monitor.refresh()  # fresh measurements: now it is known to be lagging
        assert read(last.pk)._state.db == "default"  # type: ignore[union-attr]
        assert replicas.route_counts[("default", "lagging")] == 1


# -- 5: quarantine holds on every path that opens a connection ------------------------------


def test_quarantined_replica_is_not_dialled_again_on_any_path(
    services: Services, paused: Any
) -> None:
    with override_settings(DBSCALE={**settings.DBSCALE, "REPLICA_QUARANTINE": (30.0, 60.0)}):
        replicas.monitor.refresh()
        paused(services.pg1_replica)
        note = Note.objects.create(title="only on the primary")
        assert on_replica(services, note.pk) == []
        connections["default_replica"].close()
        with services.proxies["pg1_replica"].blackholed():
            started = time.monotonic()
            with consistency_context():
                first = fetch_title("default_replica", note.pk)
            first_took = time.monotonic() - started
            failures = replicas.monitor.status("default_replica").failures

            timings = {}
            started = time.monotonic()
            with consistency_context():
                second = fetch_title("default_replica", note.pk)
            timings["cursor"] = time.monotonic() - started
            assert timings["cursor"] < 0.5, timings  # not dialled: no 2 s connect timeout

            started = time.monotonic()
            with consistency_context():
                via_using = Note.objects.using("default_replica").get(pk=note.pk)
            timings["using"] = time.monotonic() - started

            # An instance whose _state.db names the replica, reloaded from that alias.
            instance = Note(pk=note.pk, title="stale copy")
            instance._state.db = "default_replica"
            started = time.monotonic()
            with consistency_context():
                instance.refresh_from_db(using=instance._state.db)
            timings["instance"] = time.monotonic() - started

            started = time.monotonic()
            with (
                pytest.raises(
                    replicas.ReplicaQuarantined, match="'default_replica' is quarantined"
                ),
                transaction.atomic(using="default_replica"),
            ):
                list(Note.objects.using("default_replica").all())
            timings["atomic"] = time.monotonic() - started
            after = replicas.monitor.status("default_replica").failures
    # The first use paid the connect timeout (2 s) and failed over; none did after it.
    assert first == second == [("only on the primary",)]
    assert via_using.title == instance.title == "only on the primary"
    assert first_took > 1.5, first_took
    assert all(took < 0.5 for took in timings.values()), timings
    assert replicas.route_counts[("default", "failover")] == 1
    assert replicas.route_counts[("default", "quarantined")] == 3  # once per diverted read
    assert after == failures  # diverted reads are not new failures: no longer quarantine
    connections["default_replica"].close()


# -- 7: a fresh process probes before its first read ---------------------------------------


def test_first_read_of_a_fresh_process_goes_to_the_replica(
    services: Services, fresh_monitor: replicas.ReplicaMonitor
) -> None:
    note = Note.objects.create(title="replicated")
    services.pg1_replica.wait_for_replay()
    assert on_replica(services, note.pk) == [(note.pk, "replicated")]
    started = time.monotonic()
    got = read(note.pk)
    took = time.monotonic() - started
    assert got is not None and (got.title, got._state.db) == ("replicated", "default_replica")
    assert dict(replicas.route_counts) == {("default_replica", "replica"): 1}
    assert took < settings.DBSCALE.get("REPLICA_PROBE_TIMEOUT", 0.5) + 0.5, took


def test_first_read_with_a_black_holed_replica_waits_at_most_the_probe_timeout(
    services: Services, paused: Any, fresh_monitor: replicas.ReplicaMonitor
) -> None:
    paused(services.pg1_replica)
    note = Note.objects.create(title="only on the primary")
    with services.proxies["pg1_replica"].blackholed():
        started = time.monotonic()
        got = read(note.pk)
        took = time.monotonic() - started
    timeout = settings.DBSCALE.get("REPLICA_PROBE_TIMEOUT", 0.5)
    assert got is not None and (got.title, got._state.db) == ("only on the primary", "default")
    assert on_replica(services, note.pk) == []
    assert replicas.route_counts[("default", "down")] == 1  # silent for the timeout: down
    assert timeout - 0.05 < took < timeout + 0.3, took


# -- the monitor: one long-lived thread, probing while idle, and after a fork ---------------


def dbscale_threads() -> set[tuple[str, int | None]]:
    return {(t.name, t.ident) for t in threading.enumerate() if t.name.startswith("dbscale-")}


def test_probing_goes_on_while_idle_and_a_hung_replica_stalls_no_other(
    services: Services,
) -> None:
    list(Note.objects.all())  # the first read starts this process's probing thread
    monitor = replicas.monitor
    ticks = []
    samples = []
    with services.proxies["pg1_replica"].blackholed():
        for _ in range(10):  # 2 s without a single read
            time.sleep(0.2)
            samples.append(monitor.status("shard1_replica").probed_at)  # on pg2: not cut off
            ticks.append(dbscale_threads())
        assert not monitor.status("default_replica").usable(time.monotonic())
        assert "timed out" in monitor.status("default_replica").last_error
    # Measurements kept coming every interval while idle, the hung replica notwithstanding...
    assert len(set(samples)) >= 6, samples
    assert samples[-1] > time.monotonic() - 1.0
    # ...from the same long-lived threads: none was started after the first tick.
    assert set().union(*ticks[1:]) - ticks[0] == set()
    names = [name for name, _ in ticks[-1]]
    assert names.count("dbscale-replica-monitor") == 1, names
    probed = set(dbscale_settings.replicas) | set(dbscale_settings.primary_of)
    assert {f"dbscale-probe[{alias}]" for alias in probed} <= set(names), names


def test_a_forked_child_probes_with_its_own_thread(services: Services) -> None:
    list(Note.objects.all())  # our probing thread runs
    (parent_thread,) = [t for t in threading.enumerate() if t.name == "dbscale-replica-monitor"]
    connections.close_all()  # the child must share no connection with us
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            signal.alarm(20)
            os.close(read_end)
            with consistency_context():
                alias = Note.objects.all().db  # starts the child's own thread
            time.sleep(0.3)
            before = replicas.monitor.status("default_replica").probed_at
            time.sleep(0.7)  # idle: only a thread of the child's own can probe now
            monitors = [t for t in threading.enumerate() if t.name == "dbscale-replica-monitor"]
            report = {
                "alias": alias,
                "own_thread": len(monitors) == 1 and monitors[0].ident != parent_thread.ident,
                "probed": replicas.monitor.status("default_replica").probed_at > before,
            }
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(data) == {"alias": "default_replica", "own_thread": True, "probed": True}
    # The child took nothing of ours with it: our probe connections still answer.
    replicas.monitor.refresh()
    status_after = replicas.monitor.status("default_replica")
    assert status_after.usable(time.monotonic()) and status_after.failures == 0
    assert parent_thread.is_alive()


def test_probes_follow_target_session_attrs_of_a_multi_host_alias(
    services: Services, stopped_monitor: replicas.ReplicaMonitor
) -> None:
    # A replica alias naming the primary first and the standby second, as an alias that
    # must keep working after a failover does: libpq connects Django's reads to the standby,
    # and the probe must measure that same server, not the first host that answers.
    from django.core.signals import setting_changed

    entry = settings.DATABASES["default_replica"]
    saved = {key: entry.get(key) for key in ("HOST", "PORT", "OPTIONS")}
    primary, standby = services.pg1, services.pg1_replica
    entry.update(
        HOST=f"{primary.host},{standby.host}",
        PORT=f"{primary.port},{standby.port}",
        OPTIONS={**(saved["OPTIONS"] or {}), "target_session_attrs": "standby"},
    )

    def reconnect() -> None:
        connections["default_replica"].close()
        replicas.monitor.reset()
        setting_changed.send(sender=None, setting="DBSCALE", value=settings.DBSCALE, enter=True)

    reconnect()
    try:
        note = Note.objects.create(title="multi-host")
        standby.wait_for_replay()
        stopped_monitor.refresh()
        status = stopped_monitor.status("default_replica")
        assert status.healthy and status.in_recovery, status  # measured the standby
        with consistency_context():
            got = Note.objects.filter(pk=note.pk).first()
        assert got is not None and (got.title, got._state.db) == ("multi-host", "default_replica")
        with connections["default_replica"].cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery(), inet_server_port()")
            assert cursor.fetchone() == (True, standby.port)
    finally:
        entry.update(saved)
        reconnect()

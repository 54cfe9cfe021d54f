"""A replica is promoted and the primary dies: writes resume, old tokens stay harmless.

A throwaway cluster (:class:`~django_dbscale.testing.harness.PgFailoverCluster`: a primary
and two streaming replicas) stands in for ``pg1`` during this module, so the shared
servers are never promoted. ``default`` names two hosts, the primary and the replica that
will be promoted, with ``target_session_attrs=read-write``: libpq connects to whichever of
them accepts writes. ``default_replica`` is the other replica, which is re-pointed at the
promoted server afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.signals import setting_changed
from django.db import OperationalError, connections

from django_dbscale import consistency, consistency_context, read_at_least, replicas
from django_dbscale.testing.harness import (
    PgFailoverCluster,
    PgServer,
    Services,
    start_failover_cluster,
)
from tests.test_cache_support import cache_env
from tests.testapp.models import Note
from tests.testapp.models_cache import CCounter

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

_KEYS = ("HOST", "PORT", "OPTIONS")


def _reconnect() -> None:
    connections.close_all()
    replicas.monitor.reset()
    setting_changed.send(sender=None, setting="DBSCALE", value=settings.DBSCALE, enter=True)


@pytest.fixture(scope="module")
def cluster(
    services: Services, django_db_setup: None, django_db_blocker: Any
) -> Iterator[PgFailoverCluster]:
    """Point ``default``/``default_replica`` at a fresh, migrated cluster for this module.

    The settings dicts are changed in place (Django's connections hold them), as
    ``tests/test_pgbouncer.py`` does, and restored afterwards.
    """
    if services.external:
        pytest.skip("failover needs servers the harness boots (DBSCALE_TEST_EXTERNAL=1 is set)")
    booted = start_failover_cluster(services, replicas=2)
    primary = booted.primary
    promoted, follower = booted.replicas
    saved = {
        alias: {key: settings.DATABASES[alias].get(key) for key in _KEYS}
        for alias in ("default", "default_replica")
    }
    settings.DATABASES["default"].update(
        HOST=f"{primary.host},{promoted.host}",
        PORT=f"{primary.port},{promoted.port}",
        OPTIONS={"target_session_attrs": "read-write", "connect_timeout": 2},
    )
    settings.DATABASES["default_replica"].update(
        HOST=follower.host, PORT=str(follower.port), OPTIONS={"connect_timeout": 2}
    )
    _reconnect()
    try:
        with django_db_blocker.unblock():
            call_command(
                "migrate", database="default", run_syncdb=True, verbosity=0, interactive=False
            )
        booted.wait_for_replay()
        yield booted
    finally:
        for alias, old in saved.items():
            settings.DATABASES[alias].update(old)
        _reconnect()
        booted.stop()


def _timeline(server: PgServer) -> int:
    """Return the timeline a primary writes on (the first 8 hex digits of its WAL file)."""
    row = server.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")
    return int(str(row[0][0])[:8], 16)


def _lsn(server: PgServer, function: str) -> int:
    """Return the LSN *function* (``pg_current_wal_lsn()``...) gives on *server*, as an int."""
    return consistency.parse_lsn(str(server.execute(f"SELECT {function}::text")[0][0]))


def _titles(server: PgServer) -> list[str]:
    rows = server.execute("SELECT title FROM testapp_note ORDER BY id", dbname="dbscale")
    return [str(row[0]) for row in rows]


def _disconnect(replica: PgServer) -> None:
    """Stop *replica*'s WAL receiver (empty ``primary_conninfo``): it receives no more."""
    replica.execute("ALTER SYSTEM SET primary_conninfo = ''")
    replica.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while replica.execute("SELECT 1 FROM pg_stat_wal_receiver"):
        assert time.monotonic() < deadline, f"{replica.name} still receives WAL"
        time.sleep(0.02)


@pytest.mark.usefixtures(cache_env.__name__)  # an empty Redis: this "default" is a new database
def test_writes_resume_on_the_promoted_replica_and_old_tokens_are_served(
    cluster: PgFailoverCluster,
) -> None:
    old = cluster.primary
    promoted, follower = cluster.replicas

    # 1. A write everyone has, and its token.
    with consistency_context():
        kept = Note.objects.create(title="replicated")
        kept_token = consistency.consistency_token()
    kept_lsn = consistency.decode_token(kept_token).positions["default"]
    cluster.wait_for_replay()
    assert _titles(promoted) == _titles(follower) == ["replicated"]
    # A cached row, then a write of it acknowledged (and replicated) before the failover.
    counter = CCounter.objects.create(name="failover", value=1)
    cluster.wait_for_replay()
    with consistency_context():
        assert CCounter.objects.cache().get(pk=counter.pk).value == 1
    with consistency_context():
        assert CCounter.objects.cache().get(pk=counter.pk).value == 1  # served by Redis
    CCounter.objects.filter(pk=counter.pk).update(value=2)
    cluster.wait_for_replay()

    # 2. A write only the old primary has (asynchronous replication loses it at the crash).
    for replica in (promoted, follower):
        _disconnect(replica)
    with consistency_context():
        Note.objects.create(title="lost in the failover")
        lost_token = consistency.consistency_token()
    lost_lsn = consistency.decode_token(lost_token).positions["default"]
    assert _titles(old) == ["replicated", "lost in the failover"]
    assert _timeline(old) == 1

    # 3. Promote one replica, crash the old primary, re-point the other replica.
    cluster.promote(promoted)
    cluster.kill(old)
    cluster.follow(follower, promoted)
    assert cluster.primary is promoted
    assert _timeline(promoted) == 2
    # The new timeline continues from the promotion point: every LSN the old primary
    # handed out for replicated data is <= the new primary's position; the lost write's
    # LSN is past the promotion point, until new writes carry the new timeline beyond it.
    assert kept_lsn <= _lsn(promoted, "pg_current_wal_lsn()")

    # 4. The first statement on the broken connection fails fast; the next one, in the
    # same request (no close_old_connections()), gets a new connection: the same alias
    # reaches the promoted server, with no restart and no settings change.
    started = time.monotonic()
    with pytest.raises(OperationalError):
        Note.objects.create(title="during the failover")
    assert time.monotonic() - started < 3

    # 5. The lost write's token names a position past the promotion point, which no
    # server has reached yet: a read in "wait" mode waits its timeout for a replica, then
    # the new primary serves it. No hang, no error.
    assert _lsn(promoted, "pg_current_wal_lsn()") < lost_lsn
    started = time.monotonic()
    with read_at_least(lost_token, mode="wait", timeout=0.5):
        got = Note.objects.get(pk=kept.pk)
    assert time.monotonic() - started < 2.5
    assert (got.title, got._state.db) == ("replicated", "default")

    with consistency_context():
        after = Note.objects.create(title="after the failover")
        after_token = consistency.consistency_token()
    assert connections["default"].connection.info.port == promoted.port
    assert _titles(promoted) == ["replicated", "after the failover"]
    after_lsn = consistency.decode_token(after_token).positions["default"]
    assert after_lsn > kept_lsn

    # 6. Old tokens: the replicated write's token is served by the follower, which has
    # replayed past it on the new timeline; the lost write's is served without hanging.
    follower.wait_for_replay()
    replicas.monitor.refresh()
    assert replicas.monitor.status("default_replica").eligible
    with read_at_least(kept_token):
        got = Note.objects.get(pk=kept.pk)
    assert (got.title, got._state.db) == ("replicated", "default_replica")
    assert _titles(follower) == ["replicated", "after the failover"]

    # Once new writes carry the new timeline past the lost write's LSN, its token is
    # satisfied like any other (the write itself is gone everywhere).
    expected = (
        "default_replica" if _lsn(follower, "pg_last_wal_replay_lsn()") >= lost_lsn else "default"
    )
    started = time.monotonic()
    with read_at_least(lost_token, mode="wait", timeout=1.0):
        got = Note.objects.get(pk=after.pk)
    assert time.monotonic() - started < 2
    assert (got.title, got._state.db) == ("after the failover", expected)

    # The cache serves nothing older than the write acknowledged before the failover.
    with consistency_context():
        assert CCounter.objects.cache().get(pk=counter.pk).value == 2
    assert promoted.execute(
        "SELECT value FROM testapp_ccounter WHERE id = %s", (counter.pk,), dbname="dbscale"
    ) == [(2,)]

    # 7. Tokenless reads go back to the replica, and the new write's token too.
    with consistency_context():
        assert Note.objects.get(pk=after.pk)._state.db == "default_replica"
    with read_at_least(after_token):
        got = Note.objects.get(pk=after.pk)
    assert (got.title, got._state.db) == ("after the failover", "default_replica")

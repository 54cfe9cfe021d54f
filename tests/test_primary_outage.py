"""While the primary is down, reads a replica can serve are served; writes fail fast.

The primary server is really stopped (``pg_ctl stop -m fast``) and started again; its
streaming replica stays up, in recovery, with its WAL receiver disconnected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connections

from django_dbscale import consistency, consistency_context, read_at_least, replicas, use_primary
from django_dbscale.testing.harness import Services
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def primary_down(services: Services) -> Iterator[Note]:
    """A note every server has, then the primary stopped (started again afterwards)."""
    note = Note.objects.create(title="before the outage")
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    assert replicas.monitor.status("default_replica").eligible
    connections.close_all()
    services.pg1.stop()
    try:
        replicas.monitor.refresh()  # the primary does not answer this round
        yield note
    finally:
        connections.close_all()
        # Code run by sync_to_async outside any async_to_sync (asgiref's one shared
        # thread-sensitive thread) has connections of its own: the restart killed them too.
        asyncio.run(sync_to_async(connections.close_all)())
        services.pg1.start()
        services.pg1_replica.wait_for_streaming()
        replicas.monitor.refresh()


def test_tokenless_reads_are_served_by_the_replica_while_the_primary_is_down(
    primary_down: Note, services: Services
) -> None:
    status = replicas.monitor.status("default_replica")
    assert status.primary_unreachable and not status.receiver_streaming
    with consistency_context():
        got = Note.objects.get(pk=primary_down.pk)
    assert (got.title, got._state.db) == ("before the outage", "default_replica")
    assert services.pg1_replica.execute(
        "SELECT title FROM testapp_note WHERE id = %s", (primary_down.pk,), dbname="dbscale"
    ) == [("before the outage",)]


def test_a_token_the_replica_has_replayed_is_served_by_it(
    primary_down: Note, services: Services
) -> None:
    replayed = replicas.replayed_lsn("default_replica")
    assert replayed is not None
    with consistency_context() as state:
        state.merge_positions({"default": replayed})
        token = consistency.consistency_token()
    with read_at_least(token):
        got = Note.objects.get(pk=primary_down.pk)
    assert got._state.db == "default_replica"


def test_writes_fail_fast_with_the_primary_down(primary_down: Note) -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError):
        Note.objects.create(title="lost?")
    assert time.monotonic() - started < 3


def test_the_grace_period_ends_after_max_replica_lag(primary_down: Note, settings: Any) -> None:
    status = replicas.monitor.status("default_replica")
    status.assess(now=status.in_budget_with_primary_at + settings.DBSCALE["MAX_REPLICA_LAG"] + 1)
    assert not status.eligible  # beyond the budget: no longer trusted to be current enough


def test_a_read_the_router_sent_to_the_primary_as_it_went_down_is_served_by_a_caught_up_replica(
    services: Services,
) -> None:
    # The monitor last probed before the write (its thread is stopped for the test): it
    # does not know the replica has replayed the token's position, so the router sends
    # the token's read to the primary, which stops before the monitor's next round.
    replicas.monitor.stop()
    replicas.monitor.refresh()
    with consistency_context():
        note = Note.objects.create(title="written just before")
        token = consistency.consistency_token()
    services.pg1_replica.wait_for_replay()
    connections.close_all()
    services.pg1.stop()
    try:
        before = consistency.route_counts.get(("default_replica", replicas.PRIMARY_DOWN), 0)
        with read_at_least(token):
            assert replicas.read_alias("default") == "default"  # what the router decides
            got = Note.objects.get(pk=note.pk)
        assert got.title == "written just before"
        after = consistency.route_counts.get(("default_replica", replicas.PRIMARY_DOWN), 0)
        assert after == before + 1  # re-run on the replica, counted
        with read_at_least(token), use_primary(), pytest.raises(OperationalError):
            Note.objects.get(pk=note.pk)  # asked for the primary itself: no replica
    finally:
        connections.close_all()
        asyncio.run(sync_to_async(connections.close_all)())
        services.pg1.start()
        services.pg1_replica.wait_for_streaming()
        replicas.monitor.start()
        replicas.monitor.refresh()
